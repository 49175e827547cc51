//! The template headers: compiled in, or read from `FERRINFER_KERNEL_DIR` while developing. Headers
//! are named by their path under `kernels/cuda` (`core/abi.cuh`), which is also how they include
//! each other. One header is generated rather than read: [`crate::workspace::CUDA_HEADER`], the
//! plan workspace's wire format, always comes from the Rust that writes the workspace.

use std::path::PathBuf;

/// The environment variable that points at a directory of headers (a checkout's `kernels/cuda`)
/// to read instead of the compiled-in ones, so templates can be edited without rebuilding.
pub const KERNEL_DIR_VAR: &str = "FERRINFER_KERNEL_DIR";

/// One list of the header files under `kernels/cuda`, in dependency order (each after the headers
/// it includes), makes both tables: [`HEADER_NAMES`] and the embedded texts.
macro_rules! headers {
    ($($name:literal),* $(,)?) => {
        /// Names of the template headers (paths under `kernels/cuda`), in dependency order. The
        /// generated workspace header comes first: it includes nothing.
        pub const HEADER_NAMES: &[&str] = &[crate::workspace::CUDA_HEADER, $($name),*];
        /// `(name, text)` of each header file, embedded at build time.
        const BUILT_IN: &[(&str, &str)] = &[$(($name, include_str!(concat!("../cuda/", $name)))),*];
    };
}

headers![
    "core/abi.cuh",
    "core/math.cuh",
    "core/dtype.cuh",
    "core/warp.cuh",
    "core/grid_order.cuh",
    "sm80/mma.cuh",
    "sm80/ldmatrix.cuh",
    "sm80/cp_async.cuh",
    "sm80/smem.cuh",
    "sm90/barrier.cuh",
    "sm90/tma.cuh",
    "sm90/wgmma.cuh",
    "sm90/warpgroup.cuh",
    "variant/numeric.cuh",
    "variant/tile.cuh",
    "variant/dsl.cuh",
    "variant/hooks.cuh",
    "attention/kv.cuh",
    "attention/work.cuh",
    "attention/causal.cuh",
    "attention/epilogue.cuh",
    "attention/prefill.cuh",
    "attention/prefill_sm90.cuh",
    "attention/decode_vec.cuh",
    "attention/decode.cuh",
    "attention/merge.cuh",
    "ops/merge_states.cuh",
    "ops/norm.cuh",
    "ops/activation.cuh",
    "ops/philox.cuh",
    "ops/sampling.cuh",
    "ops/kv_append.cuh",
    "ops/rope.cuh",
];

/// Where header text comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Sources {
    /// The headers compiled into this crate.
    BuiltIn,
    /// `<dir>/<name>`, read on every call.
    Dir(PathBuf),
}

/// Whether `name` is a relative path that stays inside the header directory: `/`-separated
/// components, none empty, `.`-led (which covers `.` and `..`) or holding a backslash or a colon
/// (a Windows separator or drive). A leading `/` makes an empty first component.
fn is_inside(name: &str) -> bool {
    name.split('/')
        .all(|c| !c.is_empty() && !c.starts_with('.') && !c.contains(['\\', ':']))
}

impl Sources {
    /// `Dir` when `FERRINFER_KERNEL_DIR` is set and not empty.
    pub(crate) fn from_env() -> Self {
        match std::env::var_os(KERNEL_DIR_VAR) {
            Some(dir) if !dir.is_empty() => Sources::Dir(dir.into()),
            _ => Sources::BuiltIn,
        }
    }

    pub(crate) fn header(&self, name: &str) -> Result<String, String> {
        if name == crate::workspace::CUDA_HEADER {
            // Generated in both modes: a copy on disk could disagree with the plan's writer.
            return Ok(crate::workspace::cuda_header());
        }
        match self {
            Sources::BuiltIn => BUILT_IN
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, text)| (*text).to_string())
                .ok_or_else(|| {
                    format!(
                        "no kernel header named {name:?} (known: {})",
                        HEADER_NAMES.join(", ")
                    )
                }),
            Sources::Dir(dir) => {
                // An include must not reach outside the directory.
                if !is_inside(name) {
                    return Err(format!(
                        "kernel header name {name:?} is not a relative path inside \
                         {KERNEL_DIR_VAR} (such as \"core/abi.cuh\": no `..`, no leading `/` or \
                         `.`, no backslash)"
                    ));
                }
                let path = dir.join(name);
                std::fs::read_to_string(&path).map_err(|e| {
                    format!(
                        "cannot read kernel header {} ({e}); {KERNEL_DIR_VAR}={} should name a \
                         directory with every header (a checkout's kernels/cuda), or be unset to \
                         use the compiled-in headers",
                        path.display(),
                        dir.display()
                    )
                })
            }
        }
    }
}

/// The text of one header: compiled in, or `$FERRINFER_KERNEL_DIR/<name>` when that is set (the
/// workspace header is generated either way).
///
/// The error says which file is missing or which names exist.
pub fn header(name: &str) -> Result<String, String> {
    Sources::from_env().header(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.cuh` file under `dir`, as a path relative to it with `/` separators.
    fn cuh_files(dir: &std::path::Path, prefix: &str, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let rel = format!("{prefix}{name}");
            if entry.file_type().unwrap().is_dir() {
                cuh_files(&entry.path(), &format!("{rel}/"), out);
            } else if name.ends_with(".cuh") {
                out.push(rel);
            }
        }
    }

    #[test]
    fn every_header_is_built_in_and_every_file_is_listed() {
        for name in HEADER_NAMES {
            assert!(Sources::BuiltIn.header(name).is_ok(), "{name}");
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
        let mut files = Vec::new();
        cuh_files(std::path::Path::new(dir), "", &mut files);
        assert!(files.len() > 10, "{files:?}");
        for name in &files {
            assert!(
                HEADER_NAMES.contains(&name.as_str()),
                "{name} is not in HEADER_NAMES"
            );
            assert!(
                BUILT_IN.iter().any(|(n, _)| n == name),
                "{name} is not built in"
            );
        }
        // The generated header is the only name without a file.
        assert!(!files.iter().any(|f| f == crate::workspace::CUDA_HEADER));
        assert_eq!(BUILT_IN.len() + 1, HEADER_NAMES.len());
    }

    #[test]
    fn header_names_are_in_dependency_order() {
        for (k, name) in HEADER_NAMES.iter().enumerate() {
            let text = Sources::BuiltIn.header(name).unwrap();
            for line in text.lines() {
                if let Some(rest) = line.trim().strip_prefix("#include") {
                    let target = rest.trim().trim_matches('"');
                    let at = HEADER_NAMES.iter().position(|n| *n == target);
                    assert!(
                        at.is_some_and(|at| at < k),
                        "{name} includes {target}, which is not listed before it"
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_and_missing_headers_are_clear_errors() {
        let e = Sources::BuiltIn.header("nope.cuh").unwrap_err();
        assert!(e.contains("nope.cuh") && e.contains("core/abi.cuh"), "{e}");
        let dir =
            std::env::temp_dir().join(format!("ferrinfer-kernels-missing-{}", std::process::id()));
        let e = Sources::Dir(dir.clone())
            .header("core/abi.cuh")
            .unwrap_err();
        assert!(
            e.contains(&dir.join("core/abi.cuh").display().to_string()),
            "{e}"
        );
        assert!(e.contains(KERNEL_DIR_VAR), "{e}");
        assert!(Sources::Dir(dir).header("../abi.cuh").is_err());
    }

    #[test]
    fn kernel_dir_names_stay_inside_the_directory() {
        // A real directory holding a file outside the header directory.
        let root =
            std::env::temp_dir().join(format!("ferrinfer-kernels-escape-{}", std::process::id()));
        let inner = root.join("cuda");
        std::fs::create_dir_all(inner.join("core")).unwrap();
        std::fs::write(root.join("secret.cuh"), "outside").unwrap();
        std::fs::write(inner.join("core/abi.cuh"), "inside").unwrap();
        let sources = Sources::Dir(inner.clone());
        assert_eq!(sources.header("core/abi.cuh").unwrap(), "inside");
        let outside = root.join("secret.cuh").display().to_string();
        for name in [
            "../secret.cuh",
            "core/../../secret.cuh",
            "core/../abi.cuh",
            "./core/abi.cuh",
            "core/./abi.cuh",
            &outside,
            "/etc/passwd",
            "core\\abi.cuh",
            "..\\secret.cuh",
            "C:/secret.cuh",
            "core//abi.cuh",
            "core/",
            "",
            ".hidden.cuh",
        ] {
            let e = sources.header(name).unwrap_err();
            assert!(e.contains("not a relative path inside"), "{name}: {e}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
