//! The plan workspace's wire format: what `ferrinfer_runtime::attention::plan` writes and the
//! kernels read. It lives here, next to the launch arguments ([`crate::abi`]), because both sides
//! must agree on it: the word indices and array positions below are also generated into the CUDA
//! source as `attention/workspace.cuh` ([`cuda_header`]), so the kernels hold no copy of them.
//!
//! A workspace is little-endian int32 words. Bytes `0..`[`header::BYTES`] are the header
//! ([`header`] names the word indices): a magic number, the format version, the kernel kind
//! ([`kind_code`]), `cta_tile_q`, `kv_chunk`, `padded_len`, the number of valid entries,
//! `total_qo`, `partial_rows`, the byte offsets of the arrays, the number of requests, then the
//! byte offset of the per-request key positions ([`header::KEY_POSITIONS`], 0 for none). The
//! arrays follow in [`Layout::ARRAYS`] order, each at the next multiple of 16 bytes: the seven item
//! fields `request`, `kv_head`, `qo_tile_start`, `qo_tile_end`, `kv_start`, `kv_end`, `partial`
//! (`-1` for none) and `valid` (1 or 0), each `[padded_len]`; then `merge_indptr` `[total_qo + 1]`
//! and `merge_index` `[partial_rows]`. The item arrays' offsets depend only on `padded_len`, so in
//! CUDA-graph mode (fixed `padded_len`) they never move; kernels still take every offset from the
//! header, which a replayed graph reads afresh.

use crate::KernelKind;

/// Word indices of the workspace header (each an int32).
pub mod header {
    /// `MAGIC`, to catch a workspace that was never written.
    pub const MAGIC_WORD: usize = 0;
    /// [`VERSION`] of this layout.
    pub const VERSION_WORD: usize = 1;
    /// The kernel kind, see [`super::kind_code`].
    pub const KIND: usize = 2;
    /// Packed query rows per tile.
    pub const CTA_TILE_Q: usize = 3;
    /// Tokens per KV chunk.
    pub const KV_CHUNK: usize = 4;
    /// Entries in each item array, padding included: the grid size.
    pub const PADDED_LEN: usize = 5;
    /// Valid entries: the first `NUM_VALID` of `PADDED_LEN`.
    pub const NUM_VALID: usize = 6;
    /// Query rows of the batch (`merge_indptr` has one more entry).
    pub const TOTAL_QO: usize = 7;
    /// Rows of the split-KV partial buffers (`merge_index` entries).
    pub const PARTIAL_ROWS: usize = 8;
    /// Byte offsets of the arrays, in [`super::Layout::ARRAYS`] order, from here on.
    pub const OFFSETS: usize = 9;
    /// Requests in the batch; after the array offsets, at word 19.
    pub const BATCH: usize = OFFSETS + super::Layout::ARRAYS.len();
    /// Byte offset, from the start of the workspace, of `[batch][2]` int32 pairs `(offset,
    /// total)`: request `b`'s keys `0..kv_len` sit at positions `offset..offset + kv_len` of a
    /// request of `total` keys (a context-parallel shard). 0 when the batch gives none: every
    /// request then starts at 0 and is whole (`total = kv_len`). Kernels read it once per CTA
    /// (`key_positions` in attention/work.cuh), so a replayed graph follows a replan.
    pub const KEY_POSITIONS: usize = BATCH + 1;
    /// Header size in bytes; the first array starts here.
    pub const BYTES: usize = 128;
    /// "FIPL" read as a little-endian int32.
    pub const MAGIC: i32 = i32::from_le_bytes(*b"FIPL");
    /// Bumped whenever the layout changes.
    pub const VERSION: i32 = 3;
}

/// Byte offsets of the workspace arrays (all int32), and the bytes they span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Offset of `request` `[padded_len]`; the item fields follow in [`Layout::ARRAYS`] order.
    pub request: usize,
    /// Offset of `kv_head`.
    pub kv_head: usize,
    /// Offset of `qo_tile_start`.
    pub qo_tile_start: usize,
    /// Offset of `qo_tile_end`.
    pub qo_tile_end: usize,
    /// Offset of `kv_start`.
    pub kv_start: usize,
    /// Offset of `kv_end`.
    pub kv_end: usize,
    /// `-1` for an item that writes the output directly, and for padding; else the item's first
    /// partial row.
    pub partial: usize,
    /// 1 for a real item, 0 for padding.
    pub valid: usize,
    /// `[total_qo + 1]`.
    pub merge_indptr: usize,
    /// `[partial_rows]`.
    pub merge_index: usize,
    /// Bytes from the start of the workspace to the end of the last array.
    pub bytes: usize,
}

/// Item arrays: one entry per work item, padding included.
const ITEM_ARRAYS: usize = 8;

impl Layout {
    /// Names of the arrays, in workspace order (the order of their offsets in the header).
    pub const ARRAYS: [&str; 10] = [
        "request",
        "kv_head",
        "qo_tile_start",
        "qo_tile_end",
        "kv_start",
        "kv_end",
        "partial",
        "valid",
        "merge_indptr",
        "merge_index",
    ];

    /// The layout of a workspace of `padded_len` entries, `total_qo` query rows and
    /// `partial_rows` partial rows.
    pub fn new(padded_len: u32, total_qo: u32, partial_rows: u32) -> Self {
        let lens = [padded_len as usize; ITEM_ARRAYS]
            .into_iter()
            .chain([total_qo as usize + 1, partial_rows as usize]);
        let mut offsets = [0usize; Self::ARRAYS.len()];
        let mut at = header::BYTES;
        for (slot, len) in offsets.iter_mut().zip(lens) {
            *slot = at;
            at = (at + 4 * len).next_multiple_of(16);
        }
        let [
            request,
            kv_head,
            qo_tile_start,
            qo_tile_end,
            kv_start,
            kv_end,
            partial,
            valid,
            merge_indptr,
            merge_index,
        ] = offsets;
        Layout {
            request,
            kv_head,
            qo_tile_start,
            qo_tile_end,
            kv_start,
            kv_end,
            partial,
            valid,
            merge_indptr,
            merge_index,
            bytes: at,
        }
    }

    /// The offsets in [`Layout::ARRAYS`] order.
    pub fn offsets(&self) -> [usize; 10] {
        [
            self.request,
            self.kv_head,
            self.qo_tile_start,
            self.qo_tile_end,
            self.kv_start,
            self.kv_end,
            self.partial,
            self.valid,
            self.merge_indptr,
            self.merge_index,
        ]
    }
}

/// The code of `kind` in the header's [`header::KIND`] word: its position in [`KernelKind::ALL`]
/// (prefill 0, decode 1), so a new kind appended there gets the next code.
pub fn kind_code(kind: KernelKind) -> i32 {
    kind.family().code as i32
}

/// The kind whose [`kind_code`] is `code`, if any.
pub fn kind_from_code(code: i32) -> Option<KernelKind> {
    let code = u32::try_from(code).ok()?;
    crate::attention::Family::from_code(code).map(|f| f.kind)
}

/// The name under which the kernel headers include [`cuda_header`].
pub const CUDA_HEADER: &str = "attention/workspace.cuh";

/// Every header word, by its name in [`header`]; [`cuda_header`] emits each as
/// `fi::ws_header::k<Name>` (`PADDED_LEN` -> `kPaddedLen`), a static member of a struct.
const HEADER_WORDS: [(&str, usize); 12] = [
    ("MAGIC_WORD", header::MAGIC_WORD),
    ("VERSION_WORD", header::VERSION_WORD),
    ("KIND", header::KIND),
    ("CTA_TILE_Q", header::CTA_TILE_Q),
    ("KV_CHUNK", header::KV_CHUNK),
    ("PADDED_LEN", header::PADDED_LEN),
    ("NUM_VALID", header::NUM_VALID),
    ("TOTAL_QO", header::TOTAL_QO),
    ("PARTIAL_ROWS", header::PARTIAL_ROWS),
    ("OFFSETS", header::OFFSETS),
    ("BATCH", header::BATCH),
    ("KEY_POSITIONS", header::KEY_POSITIONS),
];

/// `PADDED_LEN` or `padded_len` -> `kPaddedLen`.
fn cuda_name(rust: &str) -> String {
    let mut out = String::from("k");
    for part in rust.split('_').filter(|p| !p.is_empty()) {
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            out.extend(chars.map(|c| c.to_ascii_lowercase()));
        }
    }
    out
}

/// The CUDA text of `attention/workspace.cuh`: the header's word indices (`fi::ws_header`), the
/// magic number and version, and each array's position among the header's offsets
/// (`fi::ws_array`), all from the constants above. The sources layer serves it under
/// [`CUDA_HEADER`], generated, whether the other headers are compiled in or read from disk.
pub fn cuda_header() -> String {
    let mut s = String::from(
        "// The plan workspace's wire format, generated from kernels/src/workspace.rs (do not edit:\n\
         // the Rust constants are the definition; ferrinfer_runtime::attention::plan writes it).\n\
         #pragma once\n\nnamespace fi {\n\n\
         // Header word indices (int32 words), the magic number and the format version. Static\n\
         // members of a struct rather than namespace constants: NVRTC warns of unused ones.\n\
         struct ws_header {\n",
    );
    for (name, word) in HEADER_WORDS {
        s += &format!("  static constexpr int {} = {word};\n", cuda_name(name));
    }
    s += &format!(
        "  static constexpr int kBytes = {};\n  static constexpr int kMagic = {};\n  \
         static constexpr int kVersion = {};\n",
        header::BYTES,
        header::MAGIC,
        header::VERSION
    );
    s += "};\n\n\
          // Arrays, by position among the header's byte offsets (word ws_header::kOffsets + k).\n\
          struct ws_array {\n";
    for (k, name) in Layout::ARRAYS.iter().enumerate() {
        s += &format!("  static constexpr int {} = {k};\n", cuda_name(name));
    }
    s += &format!(
        "  static constexpr int kCount = {};\n}};\n\n}}  // namespace fi\n",
        Layout::ARRAYS.len()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::Sources;

    #[test]
    fn layout_is_aligned_and_ordered() {
        let l = Layout::new(5, 7, 3);
        let offs = l.offsets();
        assert_eq!(offs[0], header::BYTES);
        assert!(offs.iter().all(|o| o % 16 == 0));
        assert!(offs.windows(2).all(|w| w[0] < w[1]));
        // 5 entries of 20 bytes, each rounded up to 32; 8 + 1 words of merge_indptr.
        assert_eq!(offs[1] - offs[0], 32);
        assert_eq!(offs[9] - offs[8], 32);
        assert_eq!(l.bytes, offs[9] + 16); // 12 bytes of merge_index, rounded up to 16
        // Empty item arrays take no room; merge_indptr's one word takes 16 bytes.
        assert_eq!(Layout::new(0, 0, 0).bytes, header::BYTES + 16);
    }

    #[test]
    fn header_words_are_distinct_and_fit_the_header() {
        let mut words: Vec<usize> = HEADER_WORDS
            .iter()
            .filter(|(n, _)| *n != "OFFSETS")
            .map(|&(_, w)| w)
            .collect();
        words.extend((0..Layout::ARRAYS.len()).map(|k| header::OFFSETS + k));
        let n = words.len();
        words.sort_unstable();
        words.dedup();
        assert_eq!(words.len(), n, "two header fields share a word");
        assert!(words.iter().all(|&w| 4 * w < header::BYTES));
        // The magic number reads "FIPL" in memory.
        assert_eq!(&header::MAGIC.to_le_bytes(), b"FIPL");
    }

    #[test]
    fn every_header_constant_is_generated() {
        // Every `pub const` of `mod header` is either a word index in HEADER_WORDS or one of the
        // scalars emitted after them, so the CUDA side cannot miss a field added here.
        let src = include_str!("workspace.rs");
        let module = src
            .split("pub mod header {")
            .nth(1)
            .and_then(|rest| rest.split("\n}\n").next())
            .unwrap();
        let consts: Vec<&str> = module
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub const "))
            .map(|l| l.split(':').next().unwrap())
            .collect();
        assert!(consts.len() > 10, "{consts:?}");
        for name in consts {
            assert!(
                HEADER_WORDS.iter().any(|(n, _)| *n == name)
                    || ["BYTES", "MAGIC", "VERSION"].contains(&name),
                "header::{name} is not generated into {CUDA_HEADER}"
            );
        }
    }

    #[test]
    fn cuda_header_names_every_word_and_array_with_the_rust_values() {
        let text = cuda_header();
        let ns = |name: &str| {
            let start = text.find(&format!("struct {name} {{")).unwrap();
            let end = start + text[start..].find('}').unwrap();
            text[start..end].to_string()
        };
        let (words, arrays) = (ns("ws_header"), ns("ws_array"));
        for (name, word) in HEADER_WORDS {
            let line = format!("static constexpr int {} = {word};\n", cuda_name(name));
            assert!(words.contains(&line), "{line} missing from\n{text}");
        }
        assert!(words.contains("constexpr int kPaddedLen = 5;\n"));
        assert!(words.contains("constexpr int kOffsets = 9;\n"));
        assert!(words.contains("constexpr int kTotalQo = 7;\n"));
        assert!(words.contains("constexpr int kBatch = 19;\n"));
        assert!(words.contains("constexpr int kKeyPositions = 20;\n"));
        for (k, name) in Layout::ARRAYS.iter().enumerate() {
            let line = format!("static constexpr int {} = {k};\n", cuda_name(name));
            assert!(arrays.contains(&line), "{line} missing from\n{text}");
        }
        assert!(arrays.contains("constexpr int kValid = 7;\n"));
        assert!(arrays.contains("constexpr int kMergeIndptr = 8;\n"));
        assert!(arrays.contains("constexpr int kMergeIndex = 9;\n"));
        assert!(words.contains(&format!("kMagic = {};", header::MAGIC)));
        assert!(words.contains(&format!("kVersion = {};", header::VERSION)));
        assert!(words.contains(&format!("kBytes = {};", header::BYTES)));
        // Served by the sources layer, in both modes.
        assert_eq!(Sources::BuiltIn.header(CUDA_HEADER).unwrap(), text);
        let dir = std::env::temp_dir().join("ferrinfer-kernels-no-such-dir");
        assert_eq!(Sources::Dir(dir).header(CUDA_HEADER).unwrap(), text);
    }

    /// The text of `header` with `//` comments removed.
    fn code_of(header: &str) -> String {
        let text = Sources::BuiltIn.header(header).unwrap();
        text.lines()
            .map(|l| l.split("//").next().unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn kernels_take_every_workspace_number_from_the_generated_header() {
        for name in ["attention/work.cuh", "attention/merge.cuh"] {
            let code = code_of(name);
            assert!(
                code.contains(&format!("#include \"{CUDA_HEADER}\"")),
                "{name} does not include {CUDA_HEADER}"
            );
            // Every index into the workspace is a name: `work[` and the array accessors are
            // never followed by a digit, and no workspace constant is defined here.
            for pattern in [
                "work[",
                "field(",
                "ws_offset(",
                "work_array(",
                "merge_array(",
            ] {
                for (at, _) in code.match_indices(pattern) {
                    let next = code[at + pattern.len()..].trim_start().chars().next();
                    assert!(
                        !next.is_some_and(|c| c.is_ascii_digit()),
                        "{name}: a numeric workspace index after {pattern:?}"
                    );
                }
            }
            for old in [
                "kWorkPaddedLen",
                "kWorkOffsets",
                "kMergeTotalQoWord",
                "kMergeBatchWord",
                "kMergeIndptrArray",
                "kMergeIndexArray",
            ] {
                assert!(!code.contains(old), "{name} still defines {old}");
            }
            assert!(
                !code.contains("constexpr int k"),
                "{name}: workspace numbers belong in {CUDA_HEADER}"
            );
        }
        // The generated names the kernels use exist.
        let used = code_of("attention/work.cuh") + &code_of("attention/merge.cuh");
        let generated = cuda_header();
        for (at, _) in used.match_indices("ws_") {
            let name: String = used[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if let Some((ns, item)) = name.split_once("::") {
                assert!(
                    generated.contains(&format!("struct {ns} {{"))
                        && generated.contains(&format!("static constexpr int {item} =")),
                    "{name} is not generated"
                );
            }
        }
        assert!(used.contains("ws_header::kPaddedLen") && used.contains("ws_array::kValid"));
    }

    #[test]
    fn kind_codes_are_stable() {
        assert_eq!(kind_code(KernelKind::Prefill), 0);
        assert_eq!(kind_code(KernelKind::Decode), 1);
        for kind in KernelKind::ALL {
            assert_eq!(kind_from_code(kind_code(kind)), Some(kind));
        }
        assert_eq!(kind_from_code(-1), None);
        assert_eq!(kind_from_code(KernelKind::ALL.len() as i32), None);
    }

    #[test]
    fn cuda_names() {
        assert_eq!(cuda_name("PADDED_LEN"), "kPaddedLen");
        assert_eq!(cuda_name("merge_indptr"), "kMergeIndptr");
        assert_eq!(cuda_name("CTA_TILE_Q"), "kCtaTileQ");
    }
}
