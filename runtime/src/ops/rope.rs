//! Rotary position embedding (RoPE) on the queries and keys of a ragged batch.
//!
//! Pair `j` of the first `rotary_dim` dims of every head, `(x1, x2)`, turns by the angle
//! `pos * f_j`: `(x1 cos - x2 sin, x2 cos + x1 sin)`. [`RopeLayout::NeoX`] pairs dim `j` with
//! `j + rotary_dim / 2`, [`RopeLayout::GptJ`] dim `2j` with `2j + 1`. Dims past `rotary_dim` are
//! copied (out of place) or left alone (in place).
//!
//! The angles are computed ([`Angles::Computed`]: `f_j = theta^(-2j / rotary_dim)`, optionally
//! Llama 3.1-scaled, divided by a linear position scale) or read from a cos/sin cache
//! ([`Angles::Cache`], FlashInfer's `apply_rope_with_cos_sin_cache` layout). Positions come per
//! token or as one offset per request ([`Positions`]).
//!
//! On the GPU, frequencies and angles are computed in f64 and reduced modulo 2 pi before an f32
//! `sincosf`, so positions up to 2^31 stay accurate (an f32 product `pos * f` is off by 0.03 rad
//! at a million, radians beyond). Positions are device data the host cannot see without a
//! synchronisation, so a token with no valid position (outside the cache, or in no request of
//! `qo_indptr`) gets NaN in its rotated dims on the GPU, where the CPU backend returns an error
//! naming the token. Nothing is read or written out of bounds either way.
//!
//! ```
//! use ferrinfer_runtime::ops::rope::{self, Angles, Frequencies, Positions, QkMut, Rope, RopeLayout};
//! use ferrinfer_runtime::{Backend, Heads, prelude::bf16};
//! # fn main() -> ferrinfer_runtime::Result<()> {
//! let backend = Backend::Cpu;
//! // 2 tokens, 2 query heads over 1 KV head, head dim 4, all 4 dims rotated (NeoX).
//! let rope = Rope::new(Heads::new(2, 1, 4)?, 4, RopeLayout::NeoX)?;
//! let one = bf16::from_f32(1.0);
//! let mut q = backend.upload(&vec![one; 2 * 2 * 4])?;
//! let mut k = backend.upload(&vec![one; 2 * 4])?;
//! let positions = backend.upload(&[0i32, 1])?;
//! let freqs = Frequencies::new(10_000.0)?;
//! rope::apply_in_place(&backend, &rope, Angles::Computed(freqs), Positions::PerToken(&positions),
//!     QkMut { q: &mut q, k: &mut k })?;
//! let k = k.to_vec()?;
//! // Position 0 turns nothing; position 1 turns pair 0 (dims 0 and 2) by 1 radian.
//! assert_eq!(k[0].to_f32(), 1.0);
//! assert!((k[4].to_f32() - (1f32.cos() - 1f32.sin())).abs() < 1e-2);
//! # Ok(()) }
//! ```

use ferrinfer_kernels::ops::rope::{
    ROPE_HEAD_BATCH, RopeArgs, SLOT_CONTIGUOUS, rope_chunks, rope_copy_kernel_name, rope_copy_unit,
    rope_heads_per_thread, rope_kernel_name, rope_launch_dims, rope_unit, rope_vec_width,
};

use crate::attention::batch::Heads;
use crate::device::backend::Backend;
use crate::device::dtype::Element;
use crate::device::gpu::Gpu;
use crate::device::view::{Dst, Src};
use crate::error::{Error, Result};
use crate::ops::kernel;

/// Which dims form a rotated pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RopeLayout {
    /// Dim `j` with dim `j + rotary_dim / 2` (rotate halves; GPT-NeoX, Llama).
    #[default]
    NeoX,
    /// Dim `2j` with dim `2j + 1` (interleaved pairs; GPT-J).
    GptJ,
}

/// Llama 3.1's frequency scaling: frequencies whose wavelength `2 pi / f` is shorter than
/// `original_max_position / high_freq_factor` are kept, those longer than
/// `original_max_position / low_freq_factor` are divided by `factor`, and in between the two are
/// blended with `smooth = (original_max_position / wavelength - low) / (high - low)`:
/// `f' = (1 - smooth) f / factor + smooth f` (as in Llama 3.1 and FlashInfer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama31 {
    /// Divisor of the low frequencies (8 for Llama 3.1).
    pub factor: f32,
    /// Low-frequency factor (1).
    pub low_freq_factor: f32,
    /// High-frequency factor (4); above `low_freq_factor`.
    pub high_freq_factor: f32,
    /// Context length of the original training (8192).
    pub original_max_position: u32,
}

impl Default for Llama31 {
    /// Llama 3.1's values: factor 8, low 1, high 4, original context 8192.
    fn default() -> Self {
        Llama31 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192,
        }
    }
}

/// How the rotation frequencies are computed: `f_j = theta^(-2j / rotary_dim)`, Llama 3.1-scaled
/// when asked, then divided by the linear position scale. Validated; built by [`Frequencies::new`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Frequencies {
    theta: f32,
    scale: f32,
    llama31: Option<Llama31>,
}

impl Frequencies {
    /// Base `theta` (finite, above 0; 10000 in most models), linear scale 1, no Llama 3.1 scaling.
    pub fn new(theta: f32) -> Result<Self> {
        if !(theta.is_finite() && theta > 0.0) {
            return Err(Error::invalid(format!(
                "rope: theta = {theta} must be finite and above 0"
            )));
        }
        Ok(Frequencies {
            theta,
            scale: 1.0,
            llama31: None,
        })
    }
    /// Llama 3.1 as FlashInfer's `apply_llama31_rope` defaults it: theta 500000 and
    /// [`Llama31::default`].
    pub fn llama31() -> Self {
        Frequencies {
            theta: 5e5,
            scale: 1.0,
            llama31: Some(Llama31::default()),
        }
    }
    /// Positions divided by `scale` (finite, above 0): linear position interpolation.
    pub fn with_scale(mut self, scale: f32) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::invalid(format!(
                "rope: scale = {scale} must be finite and above 0"
            )));
        }
        self.scale = scale;
        Ok(self)
    }
    /// With Llama 3.1 frequency scaling `l`: every factor finite and above 0, `high_freq_factor`
    /// above `low_freq_factor`, `original_max_position` at least 1.
    pub fn with_llama31(mut self, l: Llama31) -> Result<Self> {
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !positive(l.factor)
            || !positive(l.low_freq_factor)
            || !positive(l.high_freq_factor)
            || l.high_freq_factor <= l.low_freq_factor
            || l.original_max_position == 0
        {
            return Err(Error::invalid(format!(
                "rope: Llama 3.1 scaling {l:?} needs finite factors above 0, high_freq_factor \
                 above low_freq_factor and original_max_position at least 1"
            )));
        }
        self.llama31 = Some(l);
        Ok(self)
    }
    /// Base theta.
    pub fn theta(&self) -> f32 {
        self.theta
    }
    /// Linear position scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Llama 3.1 scaling, if any.
    pub fn llama31_scaling(&self) -> Option<Llama31> {
        self.llama31
    }
    /// Frequency (radians per position) of pair `j` of `rotary_dim` rotated dims, in f64.
    pub fn frequency(&self, j: u32, rotary_dim: u32) -> f64 {
        let f = f64::from(self.theta).powf(-2.0 * f64::from(j) / f64::from(rotary_dim));
        let (rcp_factor, a, b) = self.smoothing();
        let smooth = (f * a + b).clamp(0.0, 1.0);
        ((1.0 - smooth) * f * rcp_factor + smooth * f) / f64::from(self.scale)
    }
    /// `(1 / factor, smooth_a, smooth_b)` with `smooth = clamp(f smooth_a + smooth_b, 0, 1)`;
    /// `(1, 0, 1)` (keep every frequency) without Llama 3.1 scaling.
    fn smoothing(&self) -> (f64, f64, f64) {
        match self.llama31 {
            None => (1.0, 0.0, 1.0),
            Some(l) => {
                let (low, high) = (f64::from(l.low_freq_factor), f64::from(l.high_freq_factor));
                let a = f64::from(l.original_max_position)
                    / (2.0 * std::f64::consts::PI * (high - low));
                (1.0 / f64::from(l.factor), a, -low / (high - low))
            }
        }
    }
    /// The frequency fields of the kernel's arguments.
    pub(crate) fn fill_args(&self, args: &mut RopeArgs) {
        let (rcp_factor, smooth_a, smooth_b) = self.smoothing();
        args.ln_theta = f64::from(self.theta).ln();
        args.rcp_scale = 1.0 / f64::from(self.scale);
        args.rcp_factor = rcp_factor;
        args.smooth_a = smooth_a;
        args.smooth_b = smooth_b;
    }
}

/// Where the angles come from.
#[derive(Clone, Copy, Debug)]
pub enum Angles<'a> {
    /// Computed from these frequencies (any i32 position is valid).
    Computed(Frequencies),
    /// An f32 table `[max_position, rotary_dim]`: row `pos` holds `cos(pos f_j)` at column `j` and
    /// `sin(pos f_j)` at column `rotary_dim / 2 + j` (FlashInfer's `cos_sin_cache`). Positions
    /// must be in `0..max_position`.
    Cache(&'a dyn Src<f32>),
}

/// The position of every token.
#[derive(Clone, Copy, Debug)]
pub enum Positions<'a> {
    /// `[tokens]`: the position of each token.
    PerToken(&'a dyn Src<i32>),
    /// Request `b` holds tokens `qo_indptr[b]..qo_indptr[b + 1]` (`[batch + 1]`, from 0 to the
    /// token count, never decreasing) and token `t` of it is at `offsets[b] + t - qo_indptr[b]`
    /// (`offsets` is `[batch]`).
    Offsets {
        /// `[batch + 1]` token ranges.
        qo_indptr: &'a dyn Src<i32>,
        /// `[batch]` position of each request's first token.
        offsets: &'a dyn Src<i32>,
    },
}

/// Elements between consecutive tokens of q, k and v (the heads of a token are contiguous,
/// `head_dim` apart). Dense rows are [`RowStrides::dense`]; q, k and v inside one fused QKV
/// projection `[tokens, (num_qo_heads + 2 num_kv_heads) * head_dim]` are
/// [`RowStrides::fused_qkv`] (view k from element `num_qo_heads * head_dim` of the buffer, v
/// from `(num_qo_heads + num_kv_heads) * head_dim`).
///
/// A buffer whose stride is its row width (dense) must hold exactly its rows; a wider stride
/// needs at least `(rows - 1) * stride + row width` elements, and the op takes as many rows as
/// q (or the new keys) holds whole.
///
/// ```
/// use ferrinfer_runtime::{Heads, ops::rope::RowStrides};
/// let heads = Heads::new(8, 2, 64)?;
/// assert_eq!(RowStrides::dense(&heads), RowStrides { q: 8 * 64, k: 2 * 64, v: 2 * 64 });
/// assert_eq!(RowStrides::fused_qkv(&heads).k, (8 + 2 + 2) * 64);
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowStrides {
    /// Between the tokens of q.
    pub q: u64,
    /// Between the tokens of k.
    pub k: u64,
    /// Between the tokens of v (KV append only).
    pub v: u64,
}

impl RowStrides {
    /// `[tokens, heads, head_dim]` for each of q, k and v.
    ///
    /// ```
    /// use ferrinfer_runtime::{Heads, ops::rope::RowStrides};
    /// assert_eq!(RowStrides::dense(&Heads::new(4, 1, 16)?).q, 64);
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn dense(heads: &Heads) -> Self {
        let d = u64::from(heads.head_dim());
        let kv = u64::from(heads.num_kv_heads()) * d;
        RowStrides {
            q: u64::from(heads.num_qo_heads()) * d,
            k: kv,
            v: kv,
        }
    }
    /// q, k and v in the rows of one `[tokens, (num_qo_heads + 2 num_kv_heads) * head_dim]`
    /// buffer.
    ///
    /// ```
    /// use ferrinfer_runtime::{Heads, ops::rope::RowStrides};
    /// let s = RowStrides::fused_qkv(&Heads::new(4, 1, 16)?);
    /// assert_eq!((s.q, s.k, s.v), (96, 96, 96));
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn fused_qkv(heads: &Heads) -> Self {
        let row = u64::from(heads.num_qo_heads() + 2 * heads.num_kv_heads())
            * u64::from(heads.head_dim());
        RowStrides {
            q: row,
            k: row,
            v: row,
        }
    }
    /// Refuse a stride below its row width (rows would overlap) or past the address space.
    pub(crate) fn check(&self, op: &str, which: &str, heads: &Heads) -> Result<()> {
        let d = u64::from(heads.head_dim());
        for (name, stride, n) in [
            ("q", self.q, heads.num_qo_heads()),
            ("k", self.k, heads.num_kv_heads()),
            ("v", self.v, heads.num_kv_heads()),
        ] {
            let width = u64::from(n) * d;
            if stride < width || stride > isize::MAX as u64 / 8 {
                return Err(Error::invalid(format!(
                    "{op}: {which}{name} row stride {stride} must be at least its row of {n} heads                      x head_dim {d} = {width} (rows must not overlap) and below 2^60"
                )));
            }
        }
        Ok(())
    }
}

/// Rows of `width` elements at `stride` a buffer of `len` elements holds: exactly `len / width`
/// when dense (`stride == width`; an error unless whole), else the whole rows that fit.
pub(crate) fn rows_held(op: &str, name: &str, len: usize, stride: u64, width: u64) -> Result<u32> {
    let (len, width) = (len as u64, width.max(1));
    let rows = if stride == width {
        if !len.is_multiple_of(width) {
            return Err(Error::invalid(format!(
                "{op}: {name} has {len} elements, not a whole number of rows of {width}"
            )));
        }
        len / width
    } else if len < width {
        0
    } else {
        (len - width) / stride.max(1) + 1
    };
    u32::try_from(rows)
        .ok()
        .filter(|&r| r < 1 << 31)
        .ok_or_else(|| Error::invalid(format!("{op}: {name} holds 2^31 rows or more")))
}

/// Check that a buffer of `len` elements holds `rows` rows of `width` at `stride`: exactly
/// `rows * width` when dense, at least `(rows - 1) * stride + width` otherwise.
pub(crate) fn check_rows(
    op: &str,
    name: &str,
    len: usize,
    rows: u32,
    stride: u64,
    width: u64,
) -> Result<()> {
    let rows = u64::from(rows);
    let (want, dense) = if stride == width {
        (rows * width, true)
    } else {
        (
            rows.saturating_sub(1) * stride + if rows > 0 { width } else { 0 },
            false,
        )
    };
    let len = len as u64;
    if (dense && len != want) || (!dense && len < want) {
        return Err(Error::invalid(format!(
            "{op}: {name} has {len} elements; {rows} rows of {width} at row stride {stride} need              {}{want}",
            if dense { "" } else { "at least " }
        )));
    }
    Ok(())
}

/// The geometry of a RoPE call: heads (q `[tokens, num_qo_heads, head_dim]`, k
/// `[tokens, num_kv_heads, head_dim]`, or rows at [`RowStrides`]), rotated dims and layout.
/// Validated; built by [`Rope::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rope {
    heads: Heads,
    rotary_dim: u32,
    layout: RopeLayout,
    input: RowStrides,
    output: RowStrides,
}

impl Rope {
    /// RoPE on the first `rotary_dim` dims (even, 2..=head_dim) of every head.
    pub fn new(heads: Heads, rotary_dim: u32, layout: RopeLayout) -> Result<Self> {
        if rotary_dim < 2 || !rotary_dim.is_multiple_of(2) || rotary_dim > heads.head_dim() {
            return Err(Error::invalid(format!(
                "rope: rotary_dim = {rotary_dim} must be even and in 2..={} (head_dim)",
                heads.head_dim()
            )));
        }
        Ok(Rope {
            heads,
            rotary_dim,
            layout,
            input: RowStrides::dense(&heads),
            output: RowStrides::dense(&heads),
        })
    }
    /// With q and k read at `input` row strides and written at `output` ones (v's are not
    /// used): e.g. q and k turned in place inside a fused QKV buffer (both
    /// [`RowStrides::fused_qkv`]), or read from it into dense q and k. [`apply_in_place`] needs
    /// `input == output`. Errors: a stride below its row width (rows would overlap).
    ///
    /// ```
    /// use ferrinfer_runtime::ops::rope::{Rope, RopeLayout, RowStrides};
    /// use ferrinfer_runtime::Heads;
    /// let heads = Heads::new(4, 1, 16)?;
    /// let fused = RowStrides::fused_qkv(&heads);
    /// let rope = Rope::new(heads, 16, RopeLayout::NeoX)?.with_row_strides(fused, fused)?;
    /// assert_eq!(rope.row_strides(), (fused, fused));
    /// assert!(Rope::new(heads, 16, RopeLayout::NeoX)?
    ///     .with_row_strides(RowStrides { q: 32, ..fused }, fused)
    ///     .is_err());
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn with_row_strides(mut self, input: RowStrides, output: RowStrides) -> Result<Self> {
        input.check("rope", "input ", &self.heads)?;
        output.check("rope", "output ", &self.heads)?;
        self.input = input;
        self.output = output;
        Ok(self)
    }
    /// Row strides of the inputs and of the outputs (dense unless
    /// [`Rope::with_row_strides`] said otherwise).
    pub fn row_strides(&self) -> (RowStrides, RowStrides) {
        (self.input, self.output)
    }
    /// Heads and head dim.
    pub fn heads(&self) -> Heads {
        self.heads
    }
    /// Rotated dims of each head.
    pub fn rotary_dim(&self) -> u32 {
        self.rotary_dim
    }
    /// Pair layout.
    pub fn layout(&self) -> RopeLayout {
        self.layout
    }
    /// Elements of q for `tokens` tokens.
    pub fn q_len(&self, tokens: usize) -> usize {
        tokens * (self.heads.num_qo_heads() * self.heads.head_dim()) as usize
    }
    /// Elements of k for `tokens` tokens.
    pub fn k_len(&self, tokens: usize) -> usize {
        tokens * (self.heads.num_kv_heads() * self.heads.head_dim()) as usize
    }
    /// Row widths of q and k.
    fn widths(&self) -> (u64, u64) {
        (self.q_len(1) as u64, self.k_len(1) as u64)
    }
    /// Rows of a cos/sin cache, or an error.
    fn cache_rows(&self, cache: &dyn Src<f32>) -> Result<u32> {
        let rd = self.rotary_dim as usize;
        if cache.is_empty()
            || !cache.len().is_multiple_of(rd)
            || u32::try_from(cache.len() / rd).is_err()
        {
            return Err(Error::invalid(format!(
                "rope: cos_sin cache has {} elements; it must be [max_position, rotary_dim = {rd}] \
                 with 1 to 2^32 - 1 positions",
                cache.len()
            )));
        }
        Ok((cache.len() / rd) as u32)
    }
}

/// Queries and keys read by [`apply`].
#[derive(Debug)]
pub struct Qk<'a, T: Element> {
    /// `[tokens, num_qo_heads, head_dim]`.
    pub q: &'a dyn Src<T>,
    /// `[tokens, num_kv_heads, head_dim]`.
    pub k: &'a dyn Src<T>,
}

/// Queries and keys written by [`apply`] or turned in place by [`apply_in_place`].
#[derive(Debug)]
pub struct QkMut<'a, T: Element> {
    /// `[tokens, num_qo_heads, head_dim]`.
    pub q: &'a mut dyn Dst<T>,
    /// `[tokens, num_kv_heads, head_dim]`.
    pub k: &'a mut dyn Dst<T>,
}

/// Rotate `qk` in place (dims past `rotary_dim` untouched). Asynchronous on a GPU; no allocation.
///
/// Errors: a q, k or positions length that does not match (named), a bad cos/sin cache or
/// `qo_indptr`/`offsets` length, a buffer of another backend; on the CPU backend also a position
/// outside the cache or a `qo_indptr` that does not cover the tokens (the GPU writes NaN there).
pub fn apply_in_place<T: Element>(
    backend: &Backend,
    rope: &Rope,
    angles: Angles<'_>,
    positions: Positions<'_>,
    qk: QkMut<'_, T>,
) -> Result<()> {
    if rope.input != rope.output {
        return Err(Error::invalid(format!(
            "rope: apply_in_place writes q and k where it reads them, but the rope's input row \
             strides {:?} differ from its output ones {:?}",
            rope.input, rope.output
        )));
    }
    let tokens = check(rope, angles, positions, qk.q.len(), qk.k.len())?;
    match backend {
        Backend::Cpu => {
            let q = qk.q.host()?.to_vec();
            let k = qk.k.host()?.to_vec();
            rotate_host(
                rope,
                angles,
                positions,
                tokens,
                &q,
                &k,
                qk.q.host_mut()?,
                qk.k.host_mut()?,
            )
        }
        Backend::Cuda(gpu) => {
            let (q, k) = (qk.q.device_ptr(gpu)?, qk.k.device_ptr(gpu)?);
            let args = rope_args(gpu, rope, angles, positions, tokens, [q, k], [q, k])?;
            // SAFETY: `check` tied q, k and the positions (or qo_indptr and offsets) to `tokens`
            // rows of the heads at the rope's row strides (which equal the output ones, checked
            // above), and the cache to `max_position` rows (`rope_args` reads its length); all
            // are live buffers of this GPU held by the caller.
            unsafe { launch::<T>(gpu, rope.layout, args) }
        }
    }
}

/// Rotate `input` into `out` (dims past `rotary_dim` copied). Asynchronous on a GPU; no
/// allocation.
///
/// Errors as [`apply_in_place`], and an output that does not hold the input's tokens at the
/// output row strides.
pub fn apply<T: Element>(
    backend: &Backend,
    rope: &Rope,
    angles: Angles<'_>,
    positions: Positions<'_>,
    input: Qk<'_, T>,
    out: QkMut<'_, T>,
) -> Result<()> {
    let tokens = check(rope, angles, positions, input.q.len(), input.k.len())?;
    let (wq, wk) = rope.widths();
    check_rows("rope", "q_out", out.q.len(), tokens, rope.output.q, wq)?;
    check_rows("rope", "k_out", out.k.len(), tokens, rope.output.k, wk)?;
    match backend {
        Backend::Cpu => {
            let (q, k) = (input.q.host()?, input.k.host()?);
            let (q_out, k_out) = (out.q.host_mut()?, out.k.host_mut()?);
            rotate_host(rope, angles, positions, tokens, q, k, q_out, k_out)
        }
        Backend::Cuda(gpu) => {
            let src = [input.q.device_ptr(gpu)?, input.k.device_ptr(gpu)?];
            let dst = [out.q.device_ptr(gpu)?, out.k.device_ptr(gpu)?];
            let args = rope_args(gpu, rope, angles, positions, tokens, src, dst)?;
            // SAFETY: as in `apply_in_place`, and `check_rows` made the outputs hold `tokens`
            // rows at the output row strides.
            unsafe { launch::<T>(gpu, rope.layout, args) }
        }
    }
}

/// Check lengths; returns the token count.
fn check(
    rope: &Rope,
    angles: Angles<'_>,
    positions: Positions<'_>,
    q_len: usize,
    k_len: usize,
) -> Result<u32> {
    let (wq, wk) = rope.widths();
    let tokens = rows_held("rope", "q", q_len, rope.input.q, wq)?;
    check_rows("rope", "k", k_len, tokens, rope.input.k, wk)?;
    if let Angles::Cache(cache) = angles {
        rope.cache_rows(cache)?;
    }
    match positions {
        Positions::PerToken(p) if p.len() != tokens as usize => Err(Error::invalid(format!(
            "rope: positions has {} entries for {tokens} tokens",
            p.len()
        ))),
        Positions::Offsets { qo_indptr, offsets }
            if qo_indptr.len() != offsets.len() + 1 || (offsets.is_empty() && tokens > 0) =>
        {
            Err(Error::invalid(format!(
                "rope: qo_indptr has {} entries and offsets {}; they must be [batch + 1] and \
                 [batch], with a batch of at least 1 for {tokens} tokens",
                qo_indptr.len(),
                offsets.len()
            )))
        }
        Positions::Offsets { offsets, .. } if u32::try_from(offsets.len()).is_err() => Err(
            Error::invalid("rope: a batch of 2^32 requests or more is not supported"),
        ),
        _ => Ok(tokens),
    }
}

/// cos and sin of every pair of one token, in f64, or an error naming the token.
pub(crate) struct HostAngles<'a> {
    rotary_dim: u32,
    freqs: Option<Vec<f64>>,
    cache: &'a [f32],
}

impl<'a> HostAngles<'a> {
    pub(crate) fn new(rope: &Rope, angles: Angles<'a>) -> Result<Self> {
        let half = rope.rotary_dim / 2;
        Ok(match angles {
            Angles::Computed(f) => HostAngles {
                rotary_dim: rope.rotary_dim,
                freqs: Some((0..half).map(|j| f.frequency(j, rope.rotary_dim)).collect()),
                cache: &[],
            },
            Angles::Cache(c) => HostAngles {
                rotary_dim: rope.rotary_dim,
                freqs: None,
                cache: c.host()?,
            },
        })
    }
    /// `(cos, sin)` of each pair at `pos` for token `t`.
    pub(crate) fn at(&self, t: usize, pos: i64) -> Result<Vec<(f64, f64)>> {
        match &self.freqs {
            Some(f) => Ok(f
                .iter()
                .map(|&f| {
                    let a = pos as f64 * f;
                    (a.cos(), a.sin())
                })
                .collect()),
            None => {
                let rd = self.rotary_dim as usize;
                let rows = self.cache.len() / rd;
                if pos < 0 || pos as u64 >= rows as u64 {
                    return Err(Error::invalid(format!(
                        "rope: token {t} is at position {pos}, outside the cos/sin cache's \
                         {rows} positions"
                    )));
                }
                let row = &self.cache[pos as usize * rd..][..rd];
                let (c, s) = row.split_at(rd / 2);
                Ok(c.iter()
                    .zip(s)
                    .map(|(&c, &s)| (f64::from(c), f64::from(s)))
                    .collect())
            }
        }
    }
}

/// The position of every token on the host, or an error naming the first bad one.
fn host_positions(positions: Positions<'_>, tokens: u32) -> Result<Vec<i64>> {
    match positions {
        Positions::PerToken(p) => Ok(p.host()?.iter().map(|&p| i64::from(p)).collect()),
        Positions::Offsets { qo_indptr, offsets } => {
            let (indptr, offsets) = (qo_indptr.host()?, offsets.host()?);
            let batch = offsets.len();
            let ok = indptr[0] == 0
                && indptr.windows(2).all(|w| w[0] <= w[1])
                && i64::from(indptr[batch]) == i64::from(tokens);
            if !ok {
                return Err(Error::invalid(format!(
                    "rope: qo_indptr = {indptr:?} must start at 0, never decrease and end at the \
                     {tokens} tokens"
                )));
            }
            let mut out = Vec::with_capacity(tokens as usize);
            for b in 0..batch {
                for i in 0..indptr[b + 1] - indptr[b] {
                    out.push(i64::from(offsets[b]) + i64::from(i));
                }
            }
            Ok(out)
        }
    }
}

/// Turn the first `rotary_dim` dims of one head `x` by `cs` into `out` (f64, rounded at the end).
pub(crate) fn rotate_head<T: Element>(
    layout: RopeLayout,
    cs: &[(f64, f64)],
    x: &[T],
    out: &mut [T],
) {
    let half = cs.len();
    for (j, &(c, s)) in cs.iter().enumerate() {
        let (i1, i2) = match layout {
            RopeLayout::NeoX => (j, j + half),
            RopeLayout::GptJ => (2 * j, 2 * j + 1),
        };
        let (x1, x2) = (f64::from(x[i1].to_f32()), f64::from(x[i2].to_f32()));
        out[i1] = T::from_f32((x1 * c - x2 * s) as f32);
        out[i2] = T::from_f32((x2 * c + x1 * s) as f32);
    }
}

/// The CPU backend: every head of q and k (at the input row strides) into `q_out` and `k_out`
/// (at the output ones), its first `rotary_dim` dims turned and the rest copied.
#[allow(clippy::too_many_arguments)]
fn rotate_host<T: Element>(
    rope: &Rope,
    angles: Angles<'_>,
    positions: Positions<'_>,
    tokens: u32,
    q: &[T],
    k: &[T],
    q_out: &mut [T],
    k_out: &mut [T],
) -> Result<()> {
    let host = HostAngles::new(rope, angles)?;
    let pos = host_positions(positions, tokens)?;
    let d = rope.heads.head_dim() as usize;
    let (i, o) = (rope.input, rope.output);
    let mut families = [
        (q, &mut *q_out, rope.heads.num_qo_heads(), i.q, o.q),
        (k, &mut *k_out, rope.heads.num_kv_heads(), i.k, o.k),
    ];
    for (t, &p) in pos.iter().enumerate() {
        let cs = host.at(t, p)?;
        for (x, out, heads, si, so) in families.iter_mut() {
            for h in 0..*heads as usize {
                let xh = &x[t * *si as usize + h * d..][..d];
                let oh = &mut out[t * *so as usize + h * d..][..d];
                oh.copy_from_slice(xh);
                rotate_head(rope.layout, &cs, xh, oh);
            }
        }
    }
    Ok(())
}

/// The kernel's arguments for q and k of `tokens` tokens (`src`, `dst`: q then k, at the rope's
/// row strides), with the angle and position fields filled; k and v slots in rows.
pub(crate) fn rope_args(
    gpu: &Gpu,
    rope: &Rope,
    angles: Angles<'_>,
    positions: Positions<'_>,
    tokens: u32,
    src: [u64; 2],
    dst: [u64; 2],
) -> Result<RopeArgs> {
    let mut args = RopeArgs {
        src: [src[0], src[1], 0],
        dst: [dst[0], dst[1], 0],
        src_row: [rope.input.q, rope.input.k, 0],
        dst_row: [rope.output.q, rope.output.k, 0],
        tokens,
        heads: [rope.heads.num_qo_heads(), rope.heads.num_kv_heads(), 0],
        head_dim: rope.heads.head_dim(),
        rotary_dim: rope.rotary_dim,
        rotate_mask: 0b11,
        slot_mode: SLOT_CONTIGUOUS,
        ..RopeArgs::default()
    };
    match angles {
        Angles::Computed(f) => f.fill_args(&mut args),
        Angles::Cache(cache) => {
            args.max_position = rope.cache_rows(cache)?;
            args.cos_sin = cache.device_ptr(gpu)?;
        }
    }
    match positions {
        Positions::PerToken(p) => args.positions = p.device_ptr(gpu)?,
        Positions::Offsets { qo_indptr, offsets } => {
            args.pos_mode = 1;
            args.indptr = qo_indptr.device_ptr(gpu)?;
            args.offsets = offsets.device_ptr(gpu)?;
            args.batch = offsets.len() as u32;
        }
    }
    Ok(args)
}

// SAFETY: RopeArgs is #[repr(C)] of u64, f64 and u32 fields only (24 eight-byte pointers and
// strides, 5 f64, 16 u32: no padding), matching fi::RopeArgs (its size is asserted on both sides).
unsafe impl kernel::KernelArgs for RopeArgs {}

/// Launch the RoPE kernel for `args` (NeoX or GPT-J pairs): picks the vector width from every
/// pointer of the families present, and the heads per thread.
///
/// # Safety
/// Every pointer of `args` must be 0 or an address on this GPU of live memory that outlives the
/// launch and holds what `args` says the kernel reads or writes there: each present family's
/// source of `tokens` rows at `src_row` (0: dense `[tokens, heads, head_dim]`) and destination
/// (the same at `dst_row`, or for k and v a cache that holds every slot the slot mode can
/// produce), `tokens` positions (or `batch + 1` indptr and
/// `batch` offsets), `max_position` cos/sin rows, and the page-table arrays of their stated
/// lengths.
pub(crate) unsafe fn launch<T: Element>(
    gpu: &Gpu,
    layout: RopeLayout,
    mut args: RopeArgs,
) -> Result<()> {
    // Nothing rotated: the copy kernel moves whole heads, so rotary_dim plays no part (the same
    // bytes move either way, in wider chunks).
    if args.rotate_mask == 0 {
        args.rotary_dim = 0;
    }
    // A row stride of 0 means dense rows (`[tokens, heads, head_dim]`).
    for f in 0..3 {
        let dense = u64::from(args.heads[f]) * u64::from(args.head_dim);
        for row in [&mut args.src_row[f], &mut args.dst_row[f]] {
            if *row == 0 {
                *row = dense;
            }
        }
    }
    // An absent family's pointers do not count (0 is aligned to every width).
    let elem = size_of::<T>() as u64;
    let live = |f: usize, p: u64| if args.heads[f] > 0 { p } else { 0 };
    let mut ptrs = [0u64; 15];
    for (i, p) in ptrs.iter_mut().take(12).enumerate() {
        let (f, which) = (i % 3, i / 3);
        *p = live(
            f,
            match which {
                0 => args.src[f],
                1 => args.dst[f],
                2 => args.src_row[f] * elem,
                _ => args.dst_row[f] * elem,
            },
        );
    }
    // Strides move a vector as its base does: caller-given ones (q in a fused QKV row, an
    // interleaved or padded cache) may allow only a narrower vector than the pointers do.
    ptrs[12] = args.kv_page_stride * elem;
    ptrs[13] = args.kv_token_stride * elem;
    ptrs[14] = args.kv_head_stride * elem;
    let vec = rope_vec_width(args.head_dim, args.rotary_dim, &ptrs);
    let chunks = rope_chunks(args.head_dim, args.rotary_dim, vec);
    let heads = args.heads.iter().map(|&h| u64::from(h)).sum::<u64>();
    let heads = u32::try_from(heads)
        .ok()
        .filter(|&h| h < 1 << 31)
        .ok_or_else(|| Error::unsupported(format!("rope over {heads} heads per token")))?;
    if args.tokens == 0 || chunks == 0 || heads == 0 {
        return Ok(());
    }
    // Several heads per thread share one angle computation. The copy kernel always takes one
    // whole batch (ROPE_HEAD_BATCH heads' loads before their stores): its index math and slot
    // load are paid once per batch, and a small launch (decode: 256 tokens) is latency-bound, so
    // fewer, fuller threads cost nothing there once all of a batch's loads go out before the slot
    // is needed (rope.cuh, rope_load; kernels/notes/ops.md has the H200 numbers).
    args.heads_per_thread = if args.rotate_mask == 0 {
        heads.min(ROPE_HEAD_BATCH)
    } else {
        rope_heads_per_thread(args.tokens, chunks, heads, gpu.sm_count())
    };
    let dims = rope_launch_dims(&args, vec).ok_or_else(|| {
        Error::unsupported(format!(
            "rope over {} tokens x {heads} heads exceeds CUDA's grid limit",
            args.tokens
        ))
    })?;
    let (dtype, gptj) = (T::DTYPE, layout == RopeLayout::GptJ);
    let copy = args.rotate_mask == 0;
    let name = if copy {
        rope_copy_kernel_name(dtype, vec)
    } else {
        rope_kernel_name(dtype, vec, gptj)
    };
    // SAFETY: the entry takes (RopeArgs) by value; this function's contract makes every pointer
    // valid for what the kernel touches with these dims (one thread per (token, head group,
    // chunk), inside `tokens` rows and `head_dim` dims), and the kernel reads a cos/sin row or a
    // page-table entry only after checking it against `max_position` or the table's lengths.
    unsafe {
        kernel::launch(
            gpu,
            &name,
            || {
                if copy {
                    rope_copy_unit(dtype, vec)
                } else {
                    rope_unit(dtype, vec, gptj)
                }
            },
            dims,
            args,
        )
    }
}
