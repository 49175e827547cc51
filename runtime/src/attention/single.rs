//! One request, no page table: the convenience calls (FlashInfer's `single_prefill_with_kv_cache`
//! and `single_decode_with_kv_cache`). Each call plans a one-request batch and runs it, so it
//! allocates a small device workspace every time; a serving loop plans once with
//! [`BatchPrefill`] / [`BatchDecode`] and calls `run`.

use crate::attention::batch::{Batch, Heads, KvIndex, KvLayout};
use crate::attention::wrappers::{BatchDecode, BatchPrefill};
use crate::device::backend::Backend;
use crate::device::dtype::Element;
use crate::device::view::{Dst, Src};
use crate::error::{Error, Result};
use crate::variant::Variant;

/// The shape of one request's attention: heads, K/V layout, causal mask, softmax scale.
///
/// ```
/// use ferrinfer_runtime::prelude::*;
/// use ferrinfer_runtime::attention::Single;
/// use ferrinfer_runtime::variant::Variant;
/// # fn demo<V: Variant>(variant: &V) -> ferrinfer_runtime::Result<()> {
/// let cpu = Backend::Cpu;
/// let heads = Heads::new(4, 2, 64)?;
/// // 3 query rows over 5 keys, NHD: q and o [3, 4, 64], k and v [5, 2, 64].
/// let q = cpu.upload(&vec![bf16::from_f32(0.1); 3 * 4 * 64])?;
/// let k = cpu.upload(&vec![bf16::from_f32(0.2); 5 * 2 * 64])?;
/// let v = cpu.upload(&vec![bf16::from_f32(0.3); 5 * 2 * 64])?;
/// let mut o = cpu.filled(3 * 4 * 64, bf16::ZERO)?;
/// Single::new(heads).causal(true).prefill(&cpu, variant, &q, &k, &v, &mut o, None)?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Single {
    heads: Heads,
    layout: KvLayout,
    causal: bool,
    sm_scale: Option<f32>,
}

impl Single {
    /// NHD K/V, no causal mask, `sm_scale = 1 / sqrt(head_dim)`.
    pub fn new(heads: Heads) -> Self {
        Single {
            heads,
            layout: KvLayout::Nhd,
            causal: false,
            sm_scale: None,
        }
    }
    /// K and V as `[kv_len, num_kv_heads, head_dim]` (NHD) or `[num_kv_heads, kv_len, head_dim]`.
    pub fn layout(mut self, layout: KvLayout) -> Self {
        self.layout = layout;
        self
    }
    /// Bottom-right aligned causal mask (query row `i` sees keys up to `i + kv_len - qo_len`).
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    pub fn sm_scale(mut self, sm_scale: f32) -> Self {
        self.sm_scale = Some(sm_scale);
        self
    }

    /// Prefill (or append): `q`, `o` `[qo_len, num_qo_heads, head_dim]`; the lengths come from
    /// the buffers. `lse`, when given, is `[qo_len, num_qo_heads]`.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill<V: Variant, T: Element>(
        &self,
        backend: &Backend,
        variant: &V,
        q: &dyn Src<T>,
        k: &dyn Src<T>,
        v: &dyn Src<T>,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
    ) -> Result<()> {
        let qo_len = self.rows("q", q.len(), self.heads.num_qo_heads())?;
        let batch =
            Batch::new(self.heads, &[0, qo_len], self.kv(k.len())?)?.with_causal(self.causal);
        let batch = match self.sm_scale {
            Some(s) => batch.with_sm_scale(s)?,
            None => batch,
        };
        BatchPrefill::plan(backend, batch)?.run(variant, q, k, v, o, lse)
    }

    /// Decode: `q`, `o` `[num_qo_heads, head_dim]` (one row); `lse`, when given,
    /// `[num_qo_heads]`. The causal flag has no effect on one row.
    #[allow(clippy::too_many_arguments)]
    pub fn decode<V: Variant, T: Element>(
        &self,
        backend: &Backend,
        variant: &V,
        q: &dyn Src<T>,
        k: &dyn Src<T>,
        v: &dyn Src<T>,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
    ) -> Result<()> {
        if self.rows("q", q.len(), self.heads.num_qo_heads())? != 1 {
            return Err(Error::invalid(format!(
                "decode takes one query row: q has {} elements, [num_qo_heads={}, head_dim={}] \
                 needs {}",
                q.len(),
                self.heads.num_qo_heads(),
                self.heads.head_dim(),
                self.heads.num_qo_heads() * self.heads.head_dim()
            )));
        }
        BatchDecode::plan(backend, self.heads, self.kv(k.len())?, self.sm_scale)?
            .run(variant, q, k, v, o, lse)
    }

    /// A one-request ragged index over `k_len` elements.
    fn kv(&self, k_len: usize) -> Result<KvIndex> {
        let kv_len = self.rows("k", k_len, self.heads.num_kv_heads())?;
        KvIndex::ragged(&[0, kv_len], self.layout)
    }

    /// Rows of a `[rows, heads, head_dim]` buffer of `len` elements.
    fn rows(&self, name: &str, len: usize, heads: u32) -> Result<i32> {
        let row = heads as usize * self.heads.head_dim() as usize;
        if row == 0 || !len.is_multiple_of(row) {
            return Err(Error::invalid(format!(
                "{name} has {len} elements, not a multiple of {heads} heads x head_dim {}",
                self.heads.head_dim()
            )));
        }
        i32::try_from(len / row)
            .map_err(|_| Error::invalid(format!("{name} has more than 2^31 rows")))
    }
}
