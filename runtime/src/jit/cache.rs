//! The disk cache: one file per kernel, `<key>.cubin`, written atomically and checked on every read.
//!
//! File layout (integers little-endian):
//! `magic[8] | format u32 | key_len u32 | key | entry_len u32 | entry | stats 5 x u32 |
//!  log_len u32 | log | payload_len u64 | checksum u64 | payload`.
//! The full key text is stored so that a hash collision (or a stale file) is detected rather than
//! trusted; the checksum (FNV-1a 64) covers every byte before it and the payload.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::nvrtc::KernelStats;
use crate::jit::hash::Fnv64;

const MAGIC: &[u8; 8] = b"FRRCUBIN";
/// Bump when the layout above (or the meaning of a key) changes; old files are then recompiled.
pub const FORMAT_VERSION: u32 = 1;

/// The default cache directory: `$FERRINFER_CACHE_DIR`, else `$XDG_CACHE_HOME/ferrinfer`, else
/// `~/.cache/ferrinfer`. `lookup` reads an environment variable (a parameter, for tests).
pub fn default_dir(lookup: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let var = |k: &str| lookup(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("FERRINFER_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("ferrinfer")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/ferrinfer")))
}

/// One cached kernel as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key text it was compiled for.
    pub key_text: String,
    /// The `extern "C"` entry function.
    pub entry: String,
    /// ptxas' numbers.
    pub stats: KernelStats,
    /// NVRTC's log at compile time.
    pub log: String,
    /// The CUBIN image.
    pub cubin: Vec<u8>,
}

/// Serialise an entry.
pub fn encode(e: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + e.key_text.len() + e.log.len() + e.cubin.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for text in [&e.key_text, &e.entry] {
        put_bytes(&mut out, text.as_bytes());
    }
    let s = &e.stats;
    for n in [
        s.registers,
        s.spill_stores,
        s.spill_loads,
        s.stack_frame,
        s.shared_static,
    ] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    put_bytes(&mut out, e.log.as_bytes());
    out.extend_from_slice(&(e.cubin.len() as u64).to_le_bytes());
    let sum = checksum(&out, &e.cubin);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(&e.cubin);
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn checksum(header: &[u8], payload: &[u8]) -> u64 {
    let mut h = Fnv64::new();
    h.write(header);
    h.write(payload);
    h.finish()
}

/// Parse and check an entry; `Err` says what is wrong with it.
pub fn decode(bytes: &[u8], expected_key: &str) -> Result<Entry, String> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(8)? != MAGIC {
        return Err("not a ferrinfer cache file (bad magic)".into());
    }
    let version = r.u32()?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, expected {FORMAT_VERSION}"
        ));
    }
    let key_text = r.text()?;
    if key_text != expected_key {
        return Err("stored key differs (hash collision or stale file)".into());
    }
    let entry = r.text()?;
    let stats = KernelStats {
        registers: r.u32()?,
        spill_stores: r.u32()?,
        spill_loads: r.u32()?,
        stack_frame: r.u32()?,
        shared_static: r.u32()?,
    };
    let log = r.text()?;
    let len = usize::try_from(r.u64()?).map_err(|_| "payload length overflows".to_string())?;
    let header_end = r.pos;
    let sum = r.u64()?;
    let cubin = r.take(len)?;
    if r.pos != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - r.pos));
    }
    if sum != checksum(&bytes[..header_end], cubin) {
        return Err("checksum mismatch".into());
    }
    Ok(Entry {
        key_text,
        entry,
        stats,
        log,
        cubin: cubin.to_vec(),
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            format!(
                "truncated at byte {} of {}",
                self.bytes.len(),
                self.pos.saturating_add(n)
            )
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn text(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "text field is not UTF-8".to_string())
    }
}

/// A cache directory known to be writable.
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// Create `dir` if needed and check that a file can be written there.
    pub fn open(dir: &Path) -> std::io::Result<DiskCache> {
        std::fs::create_dir_all(dir)?;
        let probe = temp_path(dir, "probe");
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(&probe)?;
        Ok(DiskCache {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry for `key` (a hash) lives.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.cubin"))
    }

    /// `Ok(None)`: no entry. `Err`: an entry that must not be trusted, and why.
    pub fn load(&self, key: &str, key_text: &str) -> Result<Option<Entry>, String> {
        match std::fs::read(self.path(key)) {
            Ok(bytes) => decode(&bytes, key_text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Write the entry under a unique temporary name, then rename it into place: readers (and other
    /// processes writing the same kernel) only ever see a whole file.
    pub fn store(&self, key: &str, entry: &Entry) -> std::io::Result<()> {
        let tmp = temp_path(&self.dir, key);
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&encode(entry)))
            .and_then(|()| std::fs::rename(&tmp, self.path(key)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// A name no other thread or process uses at the same time.
fn temp_path(dir: &Path, stem: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    dir.join(format!(".{stem}.{}.{n}.{nanos}.tmp", std::process::id()))
}
