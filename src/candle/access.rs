//! How a candle tensor reaches an op: its layout checked and mapped to an element range (and
//! strides) without a copy, its storage locked the way candle's own in-place ops lock it (a read
//! lock for an input, the write lock through [`InplaceOp1`] for an output), and a [`View`] or
//! [`ViewMut`] made of the locked elements.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::Range;

use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp1, Layout, Storage, Tensor};
use half::{bf16, f16};

use crate::{Backend, Error, Result, View, ViewMut, device::Pod};

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidInput(msg.into())
}

/// What `CudaStorage::as_cuda_slice` needs of an element type (nothing without CUDA tensors).
#[cfg(feature = "candle-cuda")]
pub(crate) trait CudaElem: candle_core::cuda::CudaDType {}
#[cfg(feature = "candle-cuda")]
impl<T: candle_core::cuda::CudaDType> CudaElem for T {}
#[cfg(not(feature = "candle-cuda"))]
pub(crate) trait CudaElem {}
#[cfg(not(feature = "candle-cuda"))]
impl<T> CudaElem for T {}

/// An element type a tensor may hold for ferrinfer: its candle dtype and its CPU storage.
pub(crate) trait Elem: Pod + CudaElem {
    const DTYPE: DType;
    fn cpu(s: &CpuStorage) -> Option<&[Self]>;
    fn cpu_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! elem {
    ($t:ty, $v:ident) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$v;
            fn cpu(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
            fn cpu_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
elem!(bf16, BF16);
elem!(f16, F16);
elem!(i32, I32);

/// Check that `t` holds `T` and lives where `backend` runs: the CPU backend takes CPU tensors, a
/// GPU backend CUDA tensors of its device whose candle stream is the backend's stream (so the
/// work is ordered with candle's).
pub(crate) fn check<T: Elem>(backend: &Backend, name: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != T::DTYPE {
        return Err(invalid(format!(
            "{name} is {:?}; expected {:?} (as the other tensors of the call)",
            t.dtype(),
            T::DTYPE
        )));
    }
    match (backend, t.device()) {
        (Backend::Cpu, candle_core::Device::Cpu) => Ok(()),
        #[cfg(feature = "candle-cuda")]
        (Backend::Cuda(gpu), candle_core::Device::Cuda(dev)) => {
            if dev.cuda_stream().cu_stream() != gpu.stream().cu_stream() {
                return Err(invalid(format!(
                    "{name} is on candle's {:?} but the backend runs on another CUDA stream; \
                     make it with ferrinfer::candle::backend(tensor.device())",
                    t.device().location()
                )));
            }
            Ok(())
        }
        (b, d) => Err(invalid(format!(
            "{name} is on candle's {:?} but the backend is {}; make the backend with \
             ferrinfer::candle::backend(tensor.device()){}",
            d.location(),
            b.describe(),
            if cfg!(feature = "candle-cuda") || !d.is_cuda() {
                ""
            } else {
                " (CUDA tensors need ferrinfer's `candle-cuda` feature)"
            }
        ))),
    }
}

/// The elements a tensor of `dims` with `layout`'s strides covers, as a range of its storage,
/// and its strides. A dimension of 0 covers nothing.
fn extent(name: &str, t: &Tensor, dims: &[usize]) -> Result<(Range<usize>, Vec<usize>)> {
    let layout = t.layout();
    if layout.dims() != dims {
        return Err(invalid(format!(
            "{name} has shape {:?}; expected {dims:?}",
            layout.dims()
        )));
    }
    let start = layout.start_offset();
    let stride = layout.stride().to_vec();
    if dims.contains(&0) {
        return Ok((start..start, stride));
    }
    let mut last = 0usize;
    for (d, s) in dims.iter().zip(&stride) {
        last = (d - 1)
            .checked_mul(*s)
            .and_then(|x| x.checked_add(last))
            .ok_or_else(|| invalid(format!("{name}: its layout overflows usize")))?;
    }
    let end = start
        .checked_add(last)
        .and_then(|e| e.checked_add(1))
        .ok_or_else(|| invalid(format!("{name}: its layout overflows usize")))?;
    Ok((start..end, stride))
}

/// The storage range of `t` when it is `dims`, row-major contiguous (any start offset): the ops
/// take dense rows. A strided tensor is refused rather than silently copied.
pub(crate) fn dense(name: &str, t: &Tensor, dims: &[usize]) -> Result<Range<usize>> {
    let (range, stride) = extent(name, t, dims)?;
    if !t.layout().is_contiguous() {
        return Err(invalid(format!(
            "{name} is not contiguous (shape {dims:?}, strides {stride:?}); this op reads dense \
             rows: call .contiguous() (a copy) first"
        )));
    }
    Ok(range)
}

/// The storage range of a `[rows, heads, head_dim]` tensor whose head dim is contiguous (rows
/// and heads may be strided, e.g. q narrowed out of a fused QKV), and its (row, head) strides.
pub(crate) fn rows(name: &str, t: &Tensor, dims: [usize; 3]) -> Result<(Range<usize>, [u64; 2])> {
    let (range, stride) = extent(name, t, &dims)?;
    if dims[2] > 1 && stride[2] != 1 {
        return Err(invalid(format!(
            "{name} has strides {stride:?}; its last (head_dim) dimension must be contiguous"
        )));
    }
    Ok((range, [stride[0] as u64, stride[1] as u64]))
}

fn candle(name: &str, e: candle_core::Error) -> Error {
    invalid(format!("{name}: candle: {e}"))
}

/// Refuse two tensors that share storage where one of them is written: the op locks each one
/// separately (a shared one would deadlock, or be read while written). Asks candle, which alone
/// knows a tensor's storage: an in-place op whose source shares the destination's storage is
/// refused by candle before anything runs.
pub(crate) fn distinct(written: (&str, &Tensor), other: (&str, &Tensor)) -> Result<()> {
    struct Probe;
    impl candle_core::InplaceOp2 for Probe {
        fn name(&self) -> &'static str {
            "ferrinfer-storage-probe"
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult {
            Ok(())
        }
        fn cuda_fwd(
            &self,
            _: &mut CudaStorage,
            _: &Layout,
            _: &CudaStorage,
            _: &Layout,
        ) -> CResult {
            Ok(())
        }
    }
    written.1.inplace_op2(other.1, &Probe).map_err(|e| {
        invalid(format!(
            "{} is written and must not share storage with {} (nor repeat elements): {e}",
            written.0, other.0
        ))
    })
}

type CResult = candle_core::Result<()>;

/// Run `f` on a read view of `range` of `t`'s storage, under candle's read lock. `check` and the
/// layout helpers have run.
pub(crate) fn read<T: Elem, R>(
    backend: &Backend,
    name: &str,
    t: &Tensor,
    range: Range<usize>,
    f: impl FnOnce(View<'_, T>) -> Result<R>,
) -> Result<R> {
    let (guard, _) = t.storage_and_layout();
    match (&*guard, backend) {
        (Storage::Cpu(s), Backend::Cpu) => {
            let all = T::cpu(s).ok_or_else(|| invalid(format!("{name}: not {:?}", T::DTYPE)))?;
            f(View::host(part(name, all, range)?))
        }
        #[cfg(feature = "candle-cuda")]
        (Storage::Cuda(s), Backend::Cuda(gpu)) => {
            let slice = s.as_cuda_slice::<T>().map_err(|e| candle(name, e))?;
            f(View::device(slice, gpu)?.slice(range)?)
        }
        _ => Err(invalid(format!(
            "{name}: its storage is not on the backend {}",
            backend.describe()
        ))),
    }
}

fn part<'a, T>(name: &str, all: &'a [T], range: Range<usize>) -> Result<&'a [T]> {
    let len = all.len();
    all.get(range.clone()).ok_or_else(|| {
        invalid(format!(
            "{name}: its layout reaches elements {range:?} of a storage of {len}"
        ))
    })
}

/// Run `f` on a write view of `range` of `t`'s storage, under candle's write lock (taken by
/// [`Tensor::inplace_op1`], which also refuses a layout that repeats elements).
pub(crate) fn write<T: Elem, R>(
    backend: &Backend,
    name: &str,
    t: &Tensor,
    range: Range<usize>,
    f: impl FnOnce(ViewMut<'_, T>) -> Result<R>,
) -> Result<R> {
    let op = Write {
        backend,
        name,
        range,
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
        _t: PhantomData,
    };
    t.inplace_op1(&op).map_err(|e| candle(name, e))?;
    op.out.into_inner().unwrap_or_else(|| {
        Err(invalid(format!(
            "{name}: candle did not run the write on its storage"
        )))
    })
}

struct Write<'b, T, F, R> {
    backend: &'b Backend,
    name: &'b str,
    range: Range<usize>,
    f: RefCell<Option<F>>,
    out: RefCell<Option<Result<R>>>,
    _t: PhantomData<T>,
}

impl<T: Elem, F: FnOnce(ViewMut<'_, T>) -> Result<R>, R> Write<'_, T, F, R> {
    fn take(&self) -> Result<F> {
        self.f
            .borrow_mut()
            .take()
            .ok_or_else(|| invalid(format!("{}: written twice", self.name)))
    }
}

impl<T: Elem, F: FnOnce(ViewMut<'_, T>) -> Result<R>, R> InplaceOp1 for Write<'_, T, F, R> {
    fn name(&self) -> &'static str {
        "ferrinfer"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> CResult {
        let r = (|| {
            let Backend::Cpu = self.backend else {
                return Err(invalid(format!(
                    "{}: a CPU tensor on the backend {}",
                    self.name,
                    self.backend.describe()
                )));
            };
            let f = self.take()?;
            let all = T::cpu_mut(s)
                .ok_or_else(|| invalid(format!("{}: not {:?}", self.name, T::DTYPE)))?;
            let len = all.len();
            let part = all.get_mut(self.range.clone()).ok_or_else(|| {
                invalid(format!(
                    "{}: its layout reaches elements {:?} of a storage of {len}",
                    self.name, self.range
                ))
            })?;
            f(ViewMut::host(part))
        })();
        *self.out.borrow_mut() = Some(r);
        Ok(())
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, s: &mut CudaStorage, _: &Layout) -> CResult {
        let r = (|| {
            let Backend::Cuda(gpu) = self.backend else {
                return Err(invalid(format!(
                    "{}: a CUDA tensor on the CPU backend",
                    self.name
                )));
            };
            let f = self.take()?;
            let slice = s
                .as_cuda_slice_mut::<T>()
                .map_err(|e| candle(self.name, e))?;
            let mut view = ViewMut::device(slice, gpu)?;
            f(view.slice_mut(self.range.clone())?)
        })();
        *self.out.borrow_mut() = Some(r);
        Ok(())
    }
}
