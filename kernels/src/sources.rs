//! The template headers: compiled in, or read from `FERRINFER_KERNEL_DIR` while developing.

/// Names of the template headers, in include order.
pub const HEADER_NAMES: &[&str] = &["abi.cuh"];

/// The text of one header (stub).
pub fn header(name: &str) -> Option<String> {
    match name {
        "abi.cuh" => Some(include_str!("../cuda/abi.cuh").to_string()),
        _ => None,
    }
}
