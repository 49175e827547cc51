//! FNV-1a, 64 bit: a stable hash for cache keys (std's hasher may change between Rust releases).

/// Incremental FNV-1a 64.
pub struct Fnv64(u64);

impl Fnv64 {
    /// The hash of nothing (FNV's offset basis).
    pub fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    /// Add one part: its bytes, then a separator.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
    /// The hash of the parts written so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

/// Hash of several byte strings, as 16 hex digits.
pub fn hex(parts: &[&[u8]]) -> String {
    let mut h = Fnv64::new();
    for p in parts {
        h.write(p);
    }
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_parts() {
        assert_ne!(hex(&[b"ab", b"c"]), hex(&[b"a", b"bc"]));
        assert_eq!(hex(&[b"x"]), hex(&[b"x"]));
    }
}
