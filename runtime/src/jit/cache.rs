//! The disk cache: one file per kernel, `<key>.cubin`, written atomically and checked on every read.
//!
//! File layout (integers little-endian):
//! `magic[8] | format u32 | key_len u32 | key | entry_len u32 | entry | stats 5 x u32 |
//!  nvrtc major u32 | nvrtc minor u32 | log_len u32 | log | payload_len u64 | checksum u64 | payload`.
//! The key does not hold NVRTC's version, so a warm cache is found without loading NVRTC
//! (`FERRINFER_NO_JIT=1` on a machine with none); the entry records which NVRTC made it.
//! The full key text is stored so that a hash collision (or a stale file) is detected rather than
//! trusted; the checksum (FNV-1a 64) covers every byte before it and the payload.
//!
//! A directory that exists but cannot be written (a read-only image, another user's cache) is
//! still used for loading; only stores are skipped (see [`DiskCache::read_only`]).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::nvrtc::KernelStats;
use crate::jit::hash::Fnv64;

const MAGIC: &[u8; 8] = b"FRRCUBIN";
/// Bump when the layout above (or the meaning of a key) changes; old files are then recompiled.
pub const FORMAT_VERSION: u32 = 2;

/// The default cache directory: `$FERRINFER_CACHE_DIR`, else `$XDG_CACHE_HOME/ferrinfer`, else
/// `~/.cache/ferrinfer`. `lookup` reads an environment variable (a parameter, for tests).
pub fn default_dir(lookup: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let var = |k: &str| lookup(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("FERRINFER_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("ferrinfer")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/ferrinfer")))
}

/// Why a kernel was not loaded from the disk cache: absent, or present and not trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Miss {
    /// No cache directory is configured, so there was nothing to look in.
    NoCacheDir,
    /// The cache directory does not exist and could not be created, or cannot be read; holds why.
    DirUnusable(String),
    /// The directory is there; the file is not.
    NoFile,
    /// The file could not be opened or read (permissions, I/O error); holds the OS error.
    Unreadable(String),
    /// Not a whole, intact cache file: truncated, bad magic, bad checksum...; holds what is wrong.
    Corrupt(String),
    /// A cache file of another format version (written by another ferrinfer release).
    OtherVersion {
        /// The version in the file.
        found: u32,
    },
    /// An intact entry compiled by another NVRTC than the one this process compiles with (only
    /// checked when compiling is allowed: it is then recompiled).
    OtherNvrtc {
        /// The NVRTC version recorded in the entry.
        found: (u32, u32),
        /// The NVRTC version in use.
        current: (u32, u32),
    },
    /// An intact entry whose NVRTC is newer than the driver can load; holds the explanation.
    DriverTooOld(String),
    /// An intact file made for a different key text: a stale file copied under this name, or a
    /// collision of the 64-bit hash. Never trusted.
    KeyDiffers,
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Miss::NoCacheDir => f.write_str(
                "no disk cache is configured (JitConfig::cache_dir is None; from the \
                 environment it is $FERRINFER_CACHE_DIR, else $XDG_CACHE_HOME/ferrinfer, else \
                 ~/.cache/ferrinfer)",
            ),
            Miss::DirUnusable(why) => write!(
                f,
                "the cache directory does not exist or cannot be read ({why})"
            ),
            Miss::NoFile => f.write_str("no such file"),
            Miss::Unreadable(why) => write!(
                f,
                "the file cannot be read ({why}); check the permissions of the file and of \
                 its directory"
            ),
            Miss::Corrupt(why) => write!(f, "the file is corrupt ({why})"),
            Miss::OtherVersion { found } => write!(
                f,
                "the file is from another cache format version ({found}; this build reads version \
                 {FORMAT_VERSION})"
            ),
            Miss::OtherNvrtc { found, current } => write!(
                f,
                "the entry was compiled by NVRTC {}.{}, and this process compiles with NVRTC {}.{}",
                found.0, found.1, current.0, current.1
            ),
            Miss::DriverTooOld(why) => f.write_str(why),
            Miss::KeyDiffers => f.write_str(
                "the file was made for a different key text (a stale file, or a collision of the \
                 64-bit hash), so it is not trusted",
            ),
        }
    }
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
    /// The version of the NVRTC that compiled it, (major, minor).
    pub nvrtc: (u32, u32),
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
    out.extend_from_slice(&e.nvrtc.0.to_le_bytes());
    out.extend_from_slice(&e.nvrtc.1.to_le_bytes());
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

/// Parse and check an entry made for `expected_key`; `Err` says what is wrong with it
/// ([`Miss::Corrupt`], [`Miss::OtherVersion`] or [`Miss::KeyDiffers`]).
pub fn decode(bytes: &[u8], expected_key: &str) -> Result<Entry, Miss> {
    let entry = decode_any(bytes)?;
    if entry.key_text != expected_key {
        return Err(Miss::KeyDiffers);
    }
    Ok(entry)
}

/// Parse and check an entry whatever its key (for listing and verifying a cache).
pub fn decode_any(bytes: &[u8]) -> Result<Entry, Miss> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(8)? != MAGIC {
        return Err(corrupt("not a ferrinfer cache file: bad magic"));
    }
    let version = r.u32()?;
    if version != FORMAT_VERSION {
        return Err(Miss::OtherVersion { found: version });
    }
    let key_text = r.text()?;
    let entry = r.text()?;
    let stats = KernelStats {
        registers: r.u32()?,
        spill_stores: r.u32()?,
        spill_loads: r.u32()?,
        stack_frame: r.u32()?,
        shared_static: r.u32()?,
    };
    let nvrtc = (r.u32()?, r.u32()?);
    let log = r.text()?;
    let len = usize::try_from(r.u64()?).map_err(|_| corrupt("payload length overflows"))?;
    let header_end = r.pos;
    let sum = r.u64()?;
    let cubin = r.take(len)?;
    if r.pos != bytes.len() {
        return Err(corrupt(format!("{} trailing bytes", bytes.len() - r.pos)));
    }
    if sum != checksum(&bytes[..header_end], cubin) {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(Entry {
        key_text,
        entry,
        stats,
        nvrtc,
        log,
        cubin: cubin.to_vec(),
    })
}

fn corrupt(why: impl Into<String>) -> Miss {
    Miss::Corrupt(why.into())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Miss> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            corrupt(format!(
                "truncated at byte {} of {}",
                self.bytes.len(),
                self.pos.saturating_add(n)
            ))
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, Miss> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, Miss> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn text(&mut self) -> Result<String, Miss> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| corrupt("text field is not UTF-8"))
    }
}

/// A cache directory that exists; writable, or read-only (loads only).
pub struct DiskCache {
    dir: PathBuf,
    /// Why files cannot be written there; `None` when they can.
    read_only: Option<String>,
}

impl DiskCache {
    /// Open `dir`, creating it if needed, and check whether a file can be written there. Fails
    /// only when the directory is not there and cannot be created: one that exists but cannot be
    /// written opens read-only (see [`read_only`](Self::read_only)), for loading a cache filled
    /// ahead of time.
    pub fn open(dir: &Path) -> std::io::Result<DiskCache> {
        let created = std::fs::create_dir_all(dir);
        if !dir.is_dir() {
            return Err(created.err().unwrap_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory")
            }));
        }
        let probe = temp_path(dir, "probe");
        let writable = std::fs::write(&probe, b"").and_then(|()| std::fs::remove_file(&probe));
        if writable.is_err() {
            let _ = std::fs::remove_file(&probe);
        }
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            read_only: writable.err().map(|e| e.to_string()),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `Some(why)` when files cannot be written in the directory: then it is only loaded from, and
    /// [`store`](Self::store) refuses.
    pub fn read_only(&self) -> Option<&str> {
        self.read_only.as_deref()
    }

    /// Where the entry for `key` (a hash) lives.
    pub fn path(&self, key: &str) -> PathBuf {
        entry_path(&self.dir, key)
    }

    /// The entry for `key` (a hash), checked against `key_text`; `Err` says why there is none
    /// that can be trusted.
    pub fn load(&self, key: &str, key_text: &str) -> Result<Entry, Miss> {
        match std::fs::read(self.path(key)) {
            Ok(bytes) => decode(&bytes, key_text),
            Err(_) if !self.dir.is_dir() => Err(Miss::DirUnusable(
                "it was removed or replaced after it was opened".into(),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Miss::NoFile),
            Err(e) => Err(Miss::Unreadable(e.to_string())),
        }
    }

    /// Write the entry under a unique temporary name, then rename it into place: readers (and other
    /// processes writing the same kernel) only ever see a whole file. Fails on a read-only cache.
    pub fn store(&self, key: &str, entry: &Entry) -> std::io::Result<()> {
        if let Some(why) = &self.read_only {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("the cache is read-only ({why})"),
            ));
        }
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

/// One file of a cache directory, as [`DiskCache::entries`] finds it.
#[derive(Debug)]
pub struct Listed {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The entry, or why it cannot be trusted. A file whose name is not the hash of the key text
    /// inside it is [`Miss::KeyDiffers`]: no lookup would ever find it under that name.
    pub entry: Result<Entry, Miss>,
}

impl DiskCache {
    /// Every `*.cubin` file of the directory, sorted by name, each decoded and checked (magic,
    /// format, checksum, and its name against its key). Reads every file: for `list`/`verify`
    /// tools, not for serving.
    pub fn entries(&self) -> std::io::Result<Vec<Listed>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cubin") && p.is_file())
            .collect();
        paths.sort();
        Ok(paths
            .into_iter()
            .map(|path| {
                let read = std::fs::read(&path);
                let bytes = read.as_ref().map_or(0, |b| b.len() as u64);
                let entry = match read {
                    Err(e) => Err(Miss::Unreadable(e.to_string())),
                    Ok(b) => decode_any(&b).and_then(|e| {
                        let named = path.file_stem().is_some_and(|s| {
                            *s == *crate::jit::hash::hex(&[e.key_text.as_bytes()])
                        });
                        if named { Ok(e) } else { Err(Miss::KeyDiffers) }
                    }),
                };
                Listed { path, bytes, entry }
            })
            .collect())
    }
}

/// Where the entry for `key` (a hash) lives in the cache directory `dir`.
pub fn entry_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.cubin"))
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
