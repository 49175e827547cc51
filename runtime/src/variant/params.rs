//! Variant parameters: the allowed field types, the C layout they get on the device, and the CUDA
//! `struct Params` that the lowered hooks read. The layout lives only here, so the bytes the host
//! packs and the struct the device reads cannot drift apart.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream};

use crate::attention::batch::Batch;
use crate::device::gpu::Gpu;
use crate::error::{Error, Result};
use crate::variant::Variant;

/// The type of one parameter field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamType {
    F32,
    I32,
    U32,
    Bool,
    /// `Array<f32>`: a read-only device array (pointer and length).
    ArrayF32,
    ArrayI32,
    ArrayU32,
}

impl ParamType {
    /// The CUDA type of a scalar, or of an array's elements.
    pub fn cuda_type(self) -> &'static str {
        match self {
            ParamType::F32 | ParamType::ArrayF32 => "float",
            ParamType::I32 | ParamType::ArrayI32 => "int",
            ParamType::U32 | ParamType::ArrayU32 => "unsigned",
            ParamType::Bool => "bool",
        }
    }
    pub fn is_array(self) -> bool {
        matches!(
            self,
            ParamType::ArrayF32 | ParamType::ArrayI32 | ParamType::ArrayU32
        )
    }
}

/// One field of a parameter struct, in declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamField {
    pub name: &'static str,
    pub ty: ParamType,
    /// What an array must cover: it needs at least the product of these extents elements for the
    /// batch at hand (`#[cover(...)]` on the field). Empty: no requirement (always for scalars).
    pub cover: &'static [Extent],
}

impl ParamField {
    /// A field with no coverage requirement.
    pub const fn new(name: &'static str, ty: ParamType) -> Self {
        ParamField {
            name,
            ty,
            cover: &[],
        }
    }

    /// The same field, required to cover the product of `cover`.
    pub const fn covering(self, cover: &'static [Extent]) -> Self {
        ParamField { cover, ..self }
    }
}

/// One factor of an array's coverage, written as a word in `#[cover(...)]`.
///
/// A hook that indexes an array by `at.qo_head` is safe when the array covers `qo_heads`; one that
/// indexes by `at.batch * num_qo_heads + at.qo_head` (a table per request and head) when it covers
/// `batch * qo_heads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Extent {
    /// `batch`: the number of requests (what `at.batch` indexes).
    Batch,
    /// `qo_heads`: the number of query heads (what `at.qo_head` indexes).
    QoHeads,
    /// `kv_heads`: the number of KV heads (what `at.kv_head` indexes).
    KvHeads,
    /// `head_dim`: the head dimension (what the element index `i` of `query`, `key` and `output`
    /// indexes).
    HeadDim,
    /// An integer literal: a fixed count, whatever the batch.
    Fixed(u32),
}

impl Extent {
    /// The size of this extent in `batch`.
    pub fn size(self, batch: &Batch) -> u64 {
        match self {
            Extent::Batch => batch.batch() as u64,
            Extent::QoHeads => u64::from(batch.heads().num_qo_heads()),
            Extent::KvHeads => u64::from(batch.heads().num_kv_heads()),
            Extent::HeadDim => u64::from(batch.heads().head_dim()),
            Extent::Fixed(n) => u64::from(n),
        }
    }

    /// The word of `#[cover(...)]` in messages (`batch`, `num_qo_heads`, ...).
    fn name(self) -> String {
        match self {
            Extent::Batch => "batch".into(),
            Extent::QoHeads => "num_qo_heads".into(),
            Extent::KvHeads => "num_kv_heads".into(),
            Extent::HeadDim => "head_dim".into(),
            Extent::Fixed(n) => n.to_string(),
        }
    }
}

/// How many elements an array with this coverage needs for `batch` (0 when `cover` is empty).
pub fn required_len(cover: &[Extent], batch: &Batch) -> u64 {
    if cover.is_empty() {
        return 0;
    }
    cover
        .iter()
        .fold(1u64, |n, e| n.saturating_mul(e.size(batch)))
}

/// Checks every array parameter of `variant` against the coverage its field states, for `batch`.
///
/// Called before any hook runs: by the CPU reference, and by `run` before a launch, so an array
/// that is too short for the heads or requests it is indexed by is an [`Error::InvalidInput`]
/// naming the variant, the field, its length, the coverage and its size in this batch, rather than
/// a panic on the CPU or a trap in the CUDA context. Does not allocate unless it fails.
///
/// An index that depends on the array's contents (CustomMask's bit offsets) cannot be checked
/// here: on the CPU reference it becomes an error when the hook runs; see [`Array`]'s indexing.
pub(crate) fn check_coverage<V: Variant>(variant: &V, batch: &Batch) -> Result<()> {
    let fields = V::FIELDS;
    let mut result = Ok(());
    for_each_array(variant, &mut |index, len| {
        if result.is_err() {
            return;
        }
        let Some(field) = fields.get(index).filter(|f| f.ty.is_array()) else {
            result = Err(Error::invalid(format!(
                "{}: `pack` writes an array as field {index}, which FIELDS does not declare as an \
                 array (the parameter struct must come from #[derive(AttentionParams)])",
                V::SPEC.name
            )));
            return;
        };
        let need = required_len(field.cover, batch);
        if u64::from(len) < need {
            result = Err(Error::invalid(format!(
                "{}.{} has {len} elements but must cover {}",
                V::SPEC.name,
                field.name,
                describe(field.cover, batch)
            )));
        }
    });
    result
}

/// `num_qo_heads = 32`, or `batch * num_qo_heads = 2 * 32 = 64`.
fn describe(cover: &[Extent], batch: &Batch) -> String {
    let names: Vec<String> = cover.iter().map(|e| e.name()).collect();
    let sizes: Vec<String> = cover.iter().map(|e| e.size(batch).to_string()).collect();
    let total = required_len(cover, batch);
    match cover {
        [Extent::Fixed(n)] => n.to_string(),
        [_] => format!("{} = {total}", names[0]),
        _ => format!("{} = {} = {total}", names.join(" * "), sizes.join(" * ")),
    }
}

/// A parameter struct. Implemented by `#[derive(AttentionParams)]`; never by hand.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a parameter struct",
    label = "the variant's type needs `#[derive(AttentionParams)]`",
    note = "write `#[derive(AttentionParams)]` on `struct {Self}`: it declares the fields the hooks may read"
)]
pub trait AttentionParams {
    /// The fields, in declaration order.
    const FIELDS: &'static [ParamField];
    /// Write the field values, in declaration order.
    fn pack(&self, w: &mut ParamWriter<'_>);
}

/// The CUDA definition of `struct Params` for these fields. Arrays become a pointer and a length.
pub fn cuda_struct(fields: &[ParamField]) -> String {
    let mut s = String::from("struct Params {\n");
    if fields.is_empty() {
        // An empty struct still has size 1 in C++; a named word keeps the host side simple.
        s.push_str("  unsigned _unused;\n");
    }
    for f in fields {
        if f.ty.is_array() {
            let _ = writeln!(s, "  const {}* {};", f.ty.cuda_type(), f.name);
            let _ = writeln!(s, "  unsigned {}_len;", f.name);
        } else {
            let _ = writeln!(s, "  {} {};", f.ty.cuda_type(), f.name);
        }
    }
    s.push_str("};\n");
    s
}

/// Packs parameter values into the bytes of `struct Params`, with C's alignment rules.
pub struct ParamWriter<'a> {
    bytes: Vec<u8>,
    gpu: Option<&'a Gpu>,
    error: Option<Error>,
    /// Set by [`for_each_array`]: the writer packs nothing and reports each array's length.
    visit: Option<&'a mut dyn FnMut(usize, u32)>,
    /// Index of the next field written.
    field: usize,
}

impl<'a> ParamWriter<'a> {
    /// A writer whose arrays are uploaded to `gpu`; without one, array pointers are written as 0
    /// (enough to check the layout on a machine with no GPU).
    pub fn new(gpu: Option<&'a Gpu>) -> Self {
        ParamWriter {
            bytes: Vec::new(),
            gpu,
            error: None,
            visit: None,
            field: 0,
        }
    }
    fn put(&mut self, align: usize, data: &[u8]) {
        if self.visit.is_some() {
            return;
        }
        while !self.bytes.len().is_multiple_of(align) {
            self.bytes.push(0);
        }
        self.bytes.extend_from_slice(data);
    }
    pub fn f32(&mut self, v: f32) {
        self.field += 1;
        self.put(4, &v.to_ne_bytes());
    }
    pub fn i32(&mut self, v: i32) {
        self.field += 1;
        self.put(4, &v.to_ne_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.field += 1;
        self.put(4, &v.to_ne_bytes());
    }
    pub fn bool(&mut self, v: bool) {
        self.field += 1;
        self.put(1, &[u8::from(v)]);
    }
    pub fn array<T: ArrayElem>(&mut self, a: &Array<T>) {
        let field = self.field;
        self.field += 1;
        if let Some(visit) = self.visit.as_mut() {
            visit(field, a.len());
            return;
        }
        let ptr = match self.gpu {
            None => 0,
            Some(gpu) => match a.device_ptr(gpu) {
                Ok(p) => p,
                Err(e) => {
                    self.error.get_or_insert(e);
                    0
                }
            },
        };
        self.put(8, &ptr.to_ne_bytes());
        self.put(4, &a.len().to_ne_bytes());
    }
    /// The packed bytes, padded to the struct's alignment.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.bytes.is_empty() {
            self.bytes.extend_from_slice(&[0; 4]);
        }
        let align = if self.bytes.len() > 4 { 8 } else { 4 };
        while !self.bytes.len().is_multiple_of(align) {
            self.bytes.push(0);
        }
        Ok(self.bytes)
    }
}

/// Pack a variant's parameters (arrays uploaded to `gpu` when given).
pub fn pack<P: AttentionParams + ?Sized>(p: &P, gpu: Option<&Gpu>) -> Result<Vec<u8>> {
    let mut w = ParamWriter::new(gpu);
    p.pack(&mut w);
    w.finish()
}

/// Calls `f(field index, length)` for every array field of `p`, in declaration order; packs,
/// uploads and allocates nothing.
pub(crate) fn for_each_array<P: AttentionParams + ?Sized>(p: &P, f: &mut dyn FnMut(usize, u32)) {
    let mut w = ParamWriter::new(None);
    w.visit = Some(f);
    p.pack(&mut w);
}

/// Element types an `Array` may hold.
pub trait ArrayElem:
    Copy + Send + Sync + 'static + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits
{
    const TYPE: ParamType;
}
impl ArrayElem for f32 {
    const TYPE: ParamType = ParamType::ArrayF32;
}
impl ArrayElem for i32 {
    const TYPE: ParamType = ParamType::ArrayI32;
}
impl ArrayElem for u32 {
    const TYPE: ParamType = ParamType::ArrayU32;
}

/// A read-only array parameter (ALiBi slopes by head, a bit-packed mask...). Cheap to clone; its
/// device copy is made on first use on each backend's stream and kept (so a run that is captured
/// into a CUDA graph must follow one that made the copy).
#[derive(Clone)]
pub struct Array<T: ArrayElem> {
    inner: Arc<ArrayInner<T>>,
}

struct ArrayInner<T: ArrayElem> {
    host: Vec<T>,
    /// One copy per stream (`Gpu::stream_key`), used only on it, so that its upload and its free
    /// are ordered with the launches that read it. The caller's stream a copy is freed on, if it
    /// is one, is kept after it.
    device: Mutex<Vec<DeviceCopy<T>>>,
}

struct DeviceCopy<T: ArrayElem> {
    key: (usize, usize),
    slice: CudaSlice<T>,
    _stream: Option<Arc<CudaStream>>,
}

impl<T: ArrayElem> Array<T> {
    pub fn new(values: Vec<T>) -> Self {
        Array {
            inner: Arc::new(ArrayInner {
                host: values,
                device: Mutex::new(Vec::new()),
            }),
        }
    }
    /// Number of elements, as the hooks see it.
    pub fn len(&self) -> u32 {
        u32::try_from(self.inner.host.len()).unwrap_or(u32::MAX)
    }
    pub fn is_empty(&self) -> bool {
        self.inner.host.is_empty()
    }
    pub fn as_slice(&self) -> &[T] {
        &self.inner.host
    }
    fn device_ptr(&self, gpu: &Gpu) -> Result<u64> {
        let mut copies = self.inner.device.lock().unwrap_or_else(|p| p.into_inner());
        let key = gpu.stream_key();
        if let Some(c) = copies.iter().find(|c| c.key == key) {
            return Ok(gpu.device_ptr(&c.slice));
        }
        let slice = gpu.upload(&self.inner.host)?;
        let ptr = gpu.device_ptr(&slice);
        copies.push(DeviceCopy {
            key,
            slice,
            _stream: gpu.keep_alive(),
        });
        Ok(ptr)
    }
}

impl<T: ArrayElem> From<Vec<T>> for Array<T> {
    fn from(v: Vec<T>) -> Self {
        Array::new(v)
    }
}

impl<T: ArrayElem + std::fmt::Debug> std::fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.inner.host.iter()).finish()
    }
}

// Hooks index arrays with the u32/i32 positions they are given. Out of range panics, as Rust
// indexing does (and the lowered hook traps on the GPU). `run` and the CPU reference first check
// each array against the coverage its field states (`check_coverage`), so an index by head,
// request or element is in range; an index computed from an array's contents can still be out of
// range, and the CPU reference turns that panic into an `Error` (see `reference::attention`).
impl<T: ArrayElem> std::ops::Index<u32> for Array<T> {
    type Output = T;
    fn index(&self, i: u32) -> &T {
        match self.inner.host.get(i as usize) {
            Some(x) => x,
            None => panic!(
                "index {i} out of range of a parameter array of {} elements",
                self.inner.host.len()
            ),
        }
    }
}
impl<T: ArrayElem> std::ops::Index<i32> for Array<T> {
    type Output = T;
    fn index(&self, i: i32) -> &T {
        match u32::try_from(i) {
            Ok(i) => &self[i],
            Err(_) => panic!("negative index {i} into a parameter array"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_c_alignment() {
        let mut w = ParamWriter::new(None);
        w.bool(true);
        w.f32(1.5);
        w.array(&Array::new(vec![1.0f32, 2.0]));
        w.u32(7);
        let b = w.finish().unwrap();
        // bool at 0, float at 4, pointer at 8, len at 16, u32 at 20; size 24.
        assert_eq!(b.len(), 24);
        assert_eq!(b[0], 1);
        assert_eq!(f32::from_ne_bytes(b[4..8].try_into().unwrap()), 1.5);
        assert_eq!(u32::from_ne_bytes(b[16..20].try_into().unwrap()), 2);
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), 7);
    }

    #[test]
    fn cuda_struct_names_every_field() {
        let fields = [
            ParamField::new("cap", ParamType::F32),
            ParamField::new("slopes", ParamType::ArrayF32).covering(&[Extent::QoHeads]),
        ];
        assert_eq!(
            cuda_struct(&fields),
            "struct Params {\n  float cap;\n  const float* slopes;\n  unsigned slopes_len;\n};\n"
        );
        assert!(cuda_struct(&[]).contains("_unused"));
    }

    struct Mixed;
    impl AttentionParams for Mixed {
        const FIELDS: &'static [ParamField] = &[
            ParamField::new("a", ParamType::F32),
            ParamField::new("b", ParamType::ArrayI32),
            ParamField::new("c", ParamType::Bool),
            ParamField::new("d", ParamType::ArrayU32),
        ];
        fn pack(&self, w: &mut ParamWriter<'_>) {
            w.f32(1.0);
            w.array(&Array::new(vec![1i32, 2, 3]));
            w.bool(true);
            w.array(&Array::<u32>::new(Vec::new()));
        }
    }

    #[test]
    fn for_each_array_sees_field_indices_and_lengths() {
        let mut seen = Vec::new();
        for_each_array(&Mixed, &mut |i, len| seen.push((i, len)));
        assert_eq!(seen, [(1, 3), (3, 0)]);
        // Packing is unaffected.
        assert_eq!(pack(&Mixed, None).unwrap().len(), 40);
    }

    #[test]
    fn coverage_messages_show_the_product() {
        use crate::attention::batch::{Heads, KvIndex, KvLayout};
        let heads = Heads::new(8, 2, 64).unwrap();
        let kv = KvIndex::ragged(&[0, 1, 2, 3], KvLayout::Nhd).unwrap();
        let batch = Batch::new(heads, &[0, 1, 2, 3], kv).unwrap();
        assert_eq!(required_len(&[], &batch), 0);
        assert_eq!(describe(&[Extent::QoHeads], &batch), "num_qo_heads = 8");
        assert_eq!(describe(&[Extent::Fixed(16)], &batch), "16");
        assert_eq!(
            describe(&[Extent::Batch, Extent::KvHeads, Extent::Fixed(2)], &batch),
            "batch * num_kv_heads * 2 = 3 * 2 * 2 = 12"
        );
        assert_eq!(required_len(&[Extent::HeadDim, Extent::Batch], &batch), 192);
    }
}
