//! A GPU architecture: a leaf that imports nothing of ours.

use std::fmt;

/// A GPU architecture (compute capability).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    /// Compute capability major version (8 for Ampere, 9 for Hopper).
    pub major: u32,
    /// Compute capability minor version.
    pub minor: u32,
}

impl Arch {
    /// Ampere A100.
    pub const SM80: Arch = Arch::new(8, 0);
    /// Hopper H100/H200.
    pub const SM90: Arch = Arch::new(9, 0);

    /// The architecture of compute capability `major.minor`.
    pub const fn new(major: u32, minor: u32) -> Self {
        Arch { major, minor }
    }

    /// NVRTC's name for it. 9.0 and 10.0 get the `a` variant: wgmma, setmaxnreg and tcgen05 exist
    /// only there, and a CUBIN for the exact arch is what we load anyway.
    pub fn sm_name(&self) -> String {
        let suffix = match (self.major, self.minor) {
            (9, 0) | (10, 0) => "a",
            _ => "",
        };
        format!("sm_{}{}{suffix}", self.major, self.minor)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sm_name())
    }
}
