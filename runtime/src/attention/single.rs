//! One request, no page table: the convenience calls (FlashInfer's `single_prefill_with_kv_cache`
//! and `single_decode_with_kv_cache`). Each call plans a one-request batch and runs it, so it
//! allocates a small device workspace every time; a serving loop plans once with
//! [`BatchPrefill`] / [`BatchDecode`] and calls `run`.

use crate::attention::batch::{Batch, Heads, KvIndex, KvLayout, KvStrides, QoStrides};
use crate::attention::wrappers::PlanConfig;
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
    /// q and o strides; `None`: dense.
    qo: Option<(QoStrides, QoStrides)>,
    /// K/V strides; `None`: the layout's dense ones.
    kv: Option<KvStrides>,
}

impl Single {
    /// NHD K/V, no causal mask, `sm_scale = 1 / sqrt(head_dim)`.
    pub fn new(heads: Heads) -> Self {
        Single {
            heads,
            layout: KvLayout::Nhd,
            causal: false,
            sm_scale: None,
            qo: None,
            kv: None,
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
    /// Multiplier of `q . k` (default `1 / sqrt(head_dim)`); it must be finite.
    pub fn sm_scale(mut self, sm_scale: f32) -> Self {
        self.sm_scale = Some(sm_scale);
        self
    }
    /// q read and o written at these strides (as [`Batch::with_qo_strides`]), e.g. q inside a
    /// fused QKV buffer; the query rows are then those q holds whole (the rows whose last head
    /// fits). Checked at each call.
    ///
    /// ```
    /// use ferrinfer_runtime::prelude::*;
    /// use ferrinfer_runtime::attention::{QoStrides, Single};
    /// use ferrinfer_runtime::variant::Variant;
    /// # fn demo<V: Variant>(variant: &V) -> ferrinfer_runtime::Result<()> {
    /// let cpu = Backend::Cpu;
    /// let heads = Heads::new(4, 2, 64)?;
    /// // 3 tokens of a fused QKV [3, (4 + 2 + 2) * 64]: q is each row's first 4 heads.
    /// let qkv = cpu.upload(&vec![bf16::from_f32(0.1); 3 * 8 * 64])?;
    /// let (k, v) = (cpu.upload(&vec![bf16::ONE; 3 * 2 * 64])?, cpu.upload(&vec![bf16::ONE; 3 * 2 * 64])?);
    /// let mut o = cpu.filled(3 * 4 * 64, bf16::ZERO)?;
    /// Single::new(heads)
    ///     .qo_strides(QoStrides::new(8 * 64, 64), QoStrides::dense(&heads))
    ///     .prefill(&cpu, variant, &qkv, &k, &v, &mut o, None)?;
    /// # Ok(()) }
    /// ```
    pub fn qo_strides(mut self, q: QoStrides, o: QoStrides) -> Self {
        self.qo = Some((q, o));
        self
    }
    /// K and V read at these element strides instead of the layout's (as
    /// [`KvIndex::with_strides`] for a ragged index: `block == token`), e.g. K and V interleaved
    /// per token in one `[kv_len, 2, num_kv_heads, head_dim]` tensor; the keys are then those K
    /// holds whole. Checked at each call.
    ///
    /// ```
    /// use ferrinfer_runtime::prelude::*;
    /// use ferrinfer_runtime::attention::{KvStrides, Single};
    /// use ferrinfer_runtime::variant::Variant;
    /// # fn demo<V: Variant>(variant: &V) -> ferrinfer_runtime::Result<()> {
    /// let cpu = Backend::Cpu;
    /// let heads = Heads::new(4, 2, 64)?;
    /// // 5 keys, K and V of each token side by side: [5, 2, 2, 64].
    /// let kv = vec![bf16::ONE; 5 * 2 * 2 * 64];
    /// let k = View::host(&kv);
    /// let v = View::host(&kv).slice(2 * 64..)?;
    /// let q = cpu.upload(&vec![bf16::from_f32(0.1); 4 * 64])?;
    /// let mut o = cpu.filled(4 * 64, bf16::ZERO)?;
    /// Single::new(heads)
    ///     .kv_strides(KvStrides { block: 4 * 64, token: 4 * 64, head: 64 })
    ///     .decode(&cpu, variant, &q, &k, &v, &mut o, None)?;
    /// # Ok(()) }
    /// ```
    pub fn kv_strides(mut self, strides: KvStrides) -> Self {
        self.kv = Some(strides);
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
        let qo_len = self.q_rows(q.len())?;
        let batch = self.batch(&[0, qo_len], k.len())?.with_causal(self.causal);
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
        if self.q_rows(q.len())? != 1 {
            return Err(Error::invalid(format!(
                "decode takes one query row: q has {} elements, [num_qo_heads={}, head_dim={}] \
                 needs {}{}",
                q.len(),
                self.heads.num_qo_heads(),
                self.heads.head_dim(),
                self.heads.num_qo_heads() * self.heads.head_dim(),
                if self.qo.is_some() {
                    " (or one row at q's strides)"
                } else {
                    ""
                }
            )));
        }
        let batch = self.batch(&[0, 1], k.len())?;
        BatchDecode::plan_batch(backend, batch, PlanConfig::default())?
            .run(variant, q, k, v, o, lse)
    }

    /// The one-request batch of these query rows over the keys K's `k_len` elements hold.
    fn batch(&self, qo_indptr: &[i32], k_len: usize) -> Result<Batch> {
        let kv = match self.kv {
            None => {
                let kv_len = self.rows("k", k_len, self.heads.num_kv_heads())?;
                KvIndex::ragged(&[0, kv_len], self.layout)?
            }
            Some(s) => {
                let kv_len = strided_rows(
                    "k",
                    k_len,
                    s.token,
                    s.head,
                    self.heads.num_kv_heads(),
                    &self.heads,
                )?;
                KvIndex::ragged(&[0, kv_len], self.layout)?.with_strides(s)?
            }
        };
        let mut batch = Batch::new(self.heads, qo_indptr, kv)?;
        if let Some((q, o)) = self.qo {
            batch = batch.with_qo_strides(q, o)?;
        }
        match self.sm_scale {
            Some(s) => batch.with_sm_scale(s),
            None => Ok(batch),
        }
    }

    /// Query rows of q: dense, or those it holds whole at its strides.
    fn q_rows(&self, len: usize) -> Result<i32> {
        match self.qo {
            None => self.rows("q", len, self.heads.num_qo_heads()),
            Some((q, _)) => strided_rows(
                "q",
                len,
                q.row(),
                q.head(),
                self.heads.num_qo_heads(),
                &self.heads,
            ),
        }
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

/// Rows a buffer of `len` elements holds whole at `row` and `head` strides: those whose last head
/// ends inside it. The batch then checks every stride (aliasing, extent) as it does for any
/// caller.
fn strided_rows(name: &str, len: usize, row: u64, head: u64, heads: u32, h: &Heads) -> Result<i32> {
    let one = u64::from(heads.saturating_sub(1))
        .checked_mul(head)
        .and_then(|x| x.checked_add(u64::from(h.head_dim())));
    let rows = match one {
        Some(one) if (len as u64) >= one && row > 0 => (len as u64 - one) / row + 1,
        Some(_) if row > 0 => 0,
        _ => {
            return Err(Error::invalid(format!(
                "{name}: a row stride of {row} and head stride of {head} hold no row"
            )));
        }
    };
    i32::try_from(rows).map_err(|_| Error::invalid(format!("{name} has more than 2^31 rows")))
}
