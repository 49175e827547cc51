//! The template headers: compiled in, or read from `FERRINFER_KERNEL_DIR` while developing.

use std::path::PathBuf;

/// The environment variable that points at a directory of headers (a checkout's `kernels/cuda`)
/// to read instead of the compiled-in ones, so templates can be edited without rebuilding.
pub const KERNEL_DIR_VAR: &str = "FERRINFER_KERNEL_DIR";

/// Names of the template headers, in dependency order (each after the headers it includes).
pub const HEADER_NAMES: &[&str] = &[
    "abi.cuh",
    "dsl.cuh",
    "dtype.cuh",
    "warp.cuh",
    "kv.cuh",
    "hooks.cuh",
    "causal.cuh",
    "mma.cuh",
    "cp_async.cuh",
    "smem.cuh",
    "work.cuh",
    "prefill.cuh",
    "decode_vec.cuh",
    "decode.cuh",
    "merge.cuh",
    "merge_states.cuh",
];

const BUILT_IN: &[(&str, &str)] = &[
    ("abi.cuh", include_str!("../cuda/abi.cuh")),
    ("dsl.cuh", include_str!("../cuda/dsl.cuh")),
    ("dtype.cuh", include_str!("../cuda/dtype.cuh")),
    ("warp.cuh", include_str!("../cuda/warp.cuh")),
    ("kv.cuh", include_str!("../cuda/kv.cuh")),
    ("hooks.cuh", include_str!("../cuda/hooks.cuh")),
    ("causal.cuh", include_str!("../cuda/causal.cuh")),
    ("mma.cuh", include_str!("../cuda/mma.cuh")),
    ("cp_async.cuh", include_str!("../cuda/cp_async.cuh")),
    ("smem.cuh", include_str!("../cuda/smem.cuh")),
    ("work.cuh", include_str!("../cuda/work.cuh")),
    ("prefill.cuh", include_str!("../cuda/prefill.cuh")),
    ("decode_vec.cuh", include_str!("../cuda/decode_vec.cuh")),
    ("decode.cuh", include_str!("../cuda/decode.cuh")),
    ("merge.cuh", include_str!("../cuda/merge.cuh")),
    ("merge_states.cuh", include_str!("../cuda/merge_states.cuh")),
];

/// Where header text comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Sources {
    /// The headers compiled into this crate.
    BuiltIn,
    /// `<dir>/<name>`, read on every call.
    Dir(PathBuf),
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
                // A plain file name: an include must not reach outside the directory.
                if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                    return Err(format!(
                        "kernel header name {name:?} is not a plain file name"
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

/// The text of one header: compiled in, or `$FERRINFER_KERNEL_DIR/<name>` when that is set.
///
/// The error says which file is missing or which names exist.
pub fn header(name: &str) -> Result<String, String> {
    Sources::from_env().header(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_header_is_built_in_and_every_file_is_listed() {
        for name in HEADER_NAMES {
            assert!(Sources::BuiltIn.header(name).is_ok(), "{name}");
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".cuh") {
                assert!(
                    HEADER_NAMES.contains(&name.as_str()),
                    "{name} is not in HEADER_NAMES"
                );
            }
        }
        assert_eq!(BUILT_IN.len(), HEADER_NAMES.len());
    }

    #[test]
    fn unknown_and_missing_headers_are_clear_errors() {
        let e = Sources::BuiltIn.header("nope.cuh").unwrap_err();
        assert!(e.contains("nope.cuh") && e.contains("abi.cuh"), "{e}");
        let dir =
            std::env::temp_dir().join(format!("ferrinfer-kernels-missing-{}", std::process::id()));
        let e = Sources::Dir(dir.clone()).header("abi.cuh").unwrap_err();
        assert!(
            e.contains(&dir.join("abi.cuh").display().to_string()),
            "{e}"
        );
        assert!(e.contains(KERNEL_DIR_VAR), "{e}");
        assert!(Sources::Dir(dir).header("../abi.cuh").is_err());
    }
}
