//! The command's output goes to readers that may stop early (`ferrinfer list | head`,
//! `grep -q`): a closed pipe must neither panic nor turn a success into a failure.

use std::process::{Command, Stdio};

/// Runs `ferrinfer ARGS` with stdout a pipe whose reading end is already closed, so every write
/// fails with EPIPE (Rust ignores SIGPIPE, so the write returns the error).
fn run_into_closed_pipe(args: &[&str]) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_ferrinfer"))
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("the ferrinfer binary runs");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    let dir = std::env::temp_dir().join(format!("ferrinfer-closed-stdout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_arg = dir.to_str().unwrap();
    for args in [
        &["help"][..],
        &["variants"],
        &["list", "--cache-dir", dir_arg],
    ] {
        let (status, stderr) = run_into_closed_pipe(args);
        assert!(
            status.success(),
            "ferrinfer {args:?}: {status}, stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "ferrinfer {args:?}:\n{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
