//! Variant parameters: the allowed field types, the C layout they get on the device, and the CUDA
//! `struct Params` that the lowered hooks read. The layout lives only here, so the bytes the host
//! packs and the struct the device reads cannot drift apart.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

use crate::device::gpu::Gpu;
use crate::error::{Error, Result};

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
}

impl<'a> ParamWriter<'a> {
    /// A writer whose arrays are uploaded to `gpu`; without one, array pointers are written as 0
    /// (enough to check the layout on a machine with no GPU).
    pub fn new(gpu: Option<&'a Gpu>) -> Self {
        ParamWriter {
            bytes: Vec::new(),
            gpu,
            error: None,
        }
    }
    fn put(&mut self, align: usize, data: &[u8]) {
        while !self.bytes.len().is_multiple_of(align) {
            self.bytes.push(0);
        }
        self.bytes.extend_from_slice(data);
    }
    pub fn f32(&mut self, v: f32) {
        self.put(4, &v.to_ne_bytes());
    }
    pub fn i32(&mut self, v: i32) {
        self.put(4, &v.to_ne_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.put(4, &v.to_ne_bytes());
    }
    pub fn bool(&mut self, v: bool) {
        self.put(1, &[u8::from(v)]);
    }
    pub fn array<T: ArrayElem>(&mut self, a: &Array<T>) {
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
/// device copy is made on first use on each GPU and kept.
#[derive(Clone)]
pub struct Array<T: ArrayElem> {
    inner: Arc<ArrayInner<T>>,
}

struct ArrayInner<T: ArrayElem> {
    host: Vec<T>,
    device: Mutex<Vec<(usize, CudaSlice<T>)>>,
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
        if let Some((_, s)) = copies.iter().find(|(o, _)| *o == gpu.ordinal()) {
            return Ok(gpu.device_ptr(s));
        }
        let slice = gpu.upload(&self.inner.host)?;
        let ptr = gpu.device_ptr(&slice);
        copies.push((gpu.ordinal(), slice));
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

// Hooks index arrays with the u32/i32 positions they are given; out of range panics on the CPU
// (and traps on the GPU), as Rust indexing does.
impl<T: ArrayElem> std::ops::Index<u32> for Array<T> {
    type Output = T;
    fn index(&self, i: u32) -> &T {
        &self.inner.host[i as usize]
    }
}
impl<T: ArrayElem> std::ops::Index<i32> for Array<T> {
    type Output = T;
    fn index(&self, i: i32) -> &T {
        let i = usize::try_from(i).expect("negative index into a parameter array");
        &self.inner.host[i]
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
            ParamField {
                name: "cap",
                ty: ParamType::F32,
            },
            ParamField {
                name: "slopes",
                ty: ParamType::ArrayF32,
            },
        ];
        assert_eq!(
            cuda_struct(&fields),
            "struct Params {\n  float cap;\n  const float* slopes;\n  unsigned slopes_len;\n};\n"
        );
        assert!(cuda_struct(&[]).contains("_unused"));
    }
}
