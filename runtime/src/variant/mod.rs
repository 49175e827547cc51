//! What an attention variant is: the hooks it may define, the position they see, and the static
//! description (`VariantSpec`) that `#[attention_variant]` emits for the registry and the JIT.

pub mod check;
pub mod dsl;
pub(crate) mod fast_math;
pub mod params;

use crate::variant::params::{AttentionParams, ParamField};

/// Where a hook is evaluated. Every field is an index or a length in tokens or heads.
///
/// `qo_pos` counts from the first query row of the request (0..`qo_len`), `kv_pos` from the first
/// key of the request (0..`kv_len`). Queries are aligned to the end of the KV sequence, so query row
/// `qo_pos` sits at absolute position `qo_pos + kv_len - qo_len` (this is the causal diagonal, and
/// the position to rotate a query by in RoPE). Compute it in `i32`: it is negative for the first
/// rows of a request with more query rows than keys.
///
/// In the `query` hook `kv_pos` is 0; in the `key` hook `qo_pos` and `qo_head` are 0 (a key does not
/// depend on which query head reads it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pos {
    /// Request index in the batch.
    pub batch: u32,
    /// Query row within the request.
    pub qo_pos: u32,
    /// Key position within the request.
    pub kv_pos: u32,
    /// Query head.
    pub qo_head: u32,
    /// KV head (`qo_head / (num_qo_heads / num_kv_heads)`).
    pub kv_head: u32,
    /// Query rows of this request.
    pub qo_len: u32,
    /// KV tokens of this request.
    pub kv_len: u32,
    /// Head dimension.
    pub head_dim: u32,
}

/// Which hooks a variant defines. A hook that is not defined is the identity (or "keep").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Hooks {
    pub query: bool,
    pub key: bool,
    pub logits: bool,
    pub mask: bool,
    pub output: bool,
    pub sink: bool,
}

impl Hooks {
    /// The hook names that are defined, in declaration order of the DSL.
    pub fn names(&self) -> Vec<&'static str> {
        let all = [
            ("query", self.query),
            ("key", self.key),
            ("logits", self.logits),
            ("mask", self.mask),
            ("output", self.output),
            ("sink", self.sink),
        ];
        all.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect()
    }
}

/// The static description of a variant, written by `#[attention_variant]` at build time.
#[derive(Debug)]
pub struct VariantSpec {
    /// The Rust type name, e.g. `SoftCap`.
    pub name: &'static str,
    /// `module_path!()` of the definition, to tell apart two variants with one name.
    pub module_path: &'static str,
    pub hooks: Hooks,
    /// `false` for variants such as FlashSigmoid: the logits are used as the weights directly.
    pub softmax: bool,
    /// Parameter layout, from `#[derive(AttentionParams)]`, with what each array must cover
    /// (checked before any hook runs, on every backend).
    pub params: &'static [ParamField],
    /// The lowered hooks: a CUDA `struct Variant` whose static device functions take `const Params&`.
    /// Beside `logits`, the macro also writes `logits_pre`, `logits_post` and `logits_core` (the
    /// hook split around its scales, `post * core(pre * s)`, which the prefill templates fold
    /// into their own scales; kernels/cuda/variant/hooks.cuh), and beside `mask` a
    /// `mask_tile(const Params&, const fi::PosRange&) -> fi::Tri` (the mask over a tile's
    /// positions by interval arithmetic, kernels/cuda/variant/tile.cuh), where the body allows.
    /// A struct written by hand may omit all four: the templates then call `logits` whole and
    /// the mask on every tile. A hand-written `mask_tile` must be sound: `fi::kAll` only where
    /// `mask` keeps every position of the range (the templates then skip `mask` there).
    pub cuda: &'static str,
}

impl VariantSpec {
    /// `module::path::Name`, unique per variant in a program.
    pub fn qualified_name(&self) -> String {
        format!("{}::{}", self.module_path, self.name)
    }

    /// A stable 64-bit hash of the lowered CUDA and the parameter layout: part of every kernel key.
    pub fn cuda_hash(&self) -> u64 {
        let mut h = crate::jit::hash::Fnv64::new();
        h.write(self.cuda.as_bytes());
        for f in self.params {
            h.write(f.name.as_bytes());
            h.write(f.ty.cuda_type().as_bytes());
        }
        h.finish()
    }
}

/// An attention variant: the hooks as plain Rust (the CPU reference calls these) plus its spec.
///
/// Implemented by `#[attention_variant]` on an `impl` block; never by hand. Every method has the
/// identity as default, so a variant defines only the hooks it changes.
pub trait Variant: AttentionParams + Send + Sync + 'static {
    /// The description registered with the runtime.
    const SPEC: &'static VariantSpec;

    /// Query transform, element `i` of the query row; `partner` is element `(i + head_dim/2) % head_dim`
    /// (the rotary partner in Llama-style RoPE).
    fn query(&self, x: f32, partner: f32, i: u32, at: Pos) -> f32 {
        let _ = (partner, i, at);
        x
    }
    /// Key transform; same contract as `query`.
    fn key(&self, x: f32, partner: f32, i: u32, at: Pos) -> f32 {
        let _ = (partner, i, at);
        x
    }
    /// Transform of the score, which arrives already multiplied by `sm_scale`.
    fn logits(&self, s: f32, at: Pos) -> f32 {
        let _ = at;
        s
    }
    /// `false` drops the (query, key) pair. Applied together with the causal mask when that is on.
    fn mask(&self, at: Pos) -> bool {
        let _ = at;
        true
    }
    /// Transform of element `i` of the normalised output row.
    fn output(&self, o: f32, i: u32, at: Pos) -> f32 {
        let _ = (i, at);
        o
    }
    /// Attention-sink logit of the query head: it adds `exp(sink)` to the softmax denominator.
    /// Only called when the variant defines it (`SPEC.hooks.sink`).
    fn sink(&self, at: Pos) -> f32 {
        let _ = at;
        f32::NEG_INFINITY
    }
}

/// One registered variant; `#[attention_variant]` submits one per variant with `inventory`.
pub struct VariantEntry(pub &'static VariantSpec);

inventory::collect!(VariantEntry);

/// Every variant linked into this program, in no particular order.
pub fn registered() -> impl Iterator<Item = &'static VariantSpec> {
    inventory::iter::<VariantEntry>.into_iter().map(|e| e.0)
}

/// The registered variants with this type name (there may be several in different modules).
pub fn find(name: &str) -> Vec<&'static VariantSpec> {
    registered()
        .filter(|s| s.name == name || s.qualified_name() == name)
        .collect()
}
