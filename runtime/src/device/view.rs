//! Memory the caller owns: [`View`] and [`ViewMut`] borrow a host slice, a cudarc `CudaSlice` /
//! `CudaView` / `CudaViewMut`, or a raw device pointer, and every wrapper and op takes them
//! wherever it takes a [`Buffer`]: through the sealed traits [`Src`] (read) and [`Dst`] (written),
//! which [`Buffer`] and the views implement.
//!
//! A view is a length and a place: the ops check the length against the shapes they are given,
//! and the place against the backend they run on (a device view must be on that backend's GPU, a
//! host view needs the CPU backend), exactly as they check a [`Buffer`].

use std::fmt;
use std::ops::{Bound, Deref, Range, RangeBounds};
use std::sync::Arc;

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceSlice};

use crate::device::backend::Buffer;
use crate::device::dtype::Pod;
use crate::device::gpu::Gpu;
use crate::error::{Error, Result};

pub(crate) mod sealed {
    use crate::device::gpu::Gpu;
    use crate::error::Result;

    /// What the ops read of a source; not nameable outside the crate, so only ferrinfer's own
    /// types implement [`super::Src`].
    pub trait Access<T> {
        /// The elements, when the memory is on the host.
        fn host(&self) -> Result<&[T]>;
        /// The device address, checking that the memory is on `on`.
        fn device_ptr(&self, on: &Gpu) -> Result<u64>;
    }
    /// What the ops write through a destination.
    pub trait AccessMut<T>: Access<T> {
        /// The elements, when the memory is on the host.
        fn host_mut(&mut self) -> Result<&mut [T]>;
    }
}

use sealed::{Access, AccessMut};

/// Memory an op reads: a [`Buffer`], a [`View`] or a [`ViewMut`]. Sealed.
///
/// ```
/// use ferrinfer_runtime::{Backend, Src, View};
/// # fn main() -> ferrinfer_runtime::Result<()> {
/// let data = [1.0f32, 2.0, 3.0];
/// let buf = Backend::Cpu.upload(&data)?;
/// let view = View::host(&data);
/// let srcs: [&dyn Src<f32>; 2] = [&buf, &view];
/// assert!(srcs.iter().all(|s| s.len() == 3));
/// # Ok(()) }
/// ```
pub trait Src<T: Pod>: Access<T> + fmt::Debug {
    /// Elements.
    fn len(&self) -> usize;
    /// Whether it holds no element.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Memory an op writes: a [`Buffer`] or a [`ViewMut`]. Sealed.
///
/// ```
/// use ferrinfer_runtime::{Backend, Dst, ViewMut};
/// # fn main() -> ferrinfer_runtime::Result<()> {
/// let mut data = [0.0f32; 4];
/// let out: &mut dyn Dst<f32> = &mut ViewMut::host(&mut data);
/// assert_eq!(out.len(), 4);
/// # Ok(()) }
/// ```
pub trait Dst<T: Pod>: Src<T> + AccessMut<T> {}

const HOST_ON_GPU: &str =
    "a host buffer or view was passed to the GPU backend; upload it or view device memory";
const DEVICE_ON_CPU: &str =
    "a GPU buffer or view was passed to the CPU backend; use the GPU's backend or host memory";

/// Copy a CPU result into an op's host destination, refusing a length that differs (the ops
/// check lengths first; this keeps a missed check an error, never a panic).
pub(crate) fn put<T: Copy>(dst: &mut [T], src: &[T]) -> Result<()> {
    if dst.len() != src.len() {
        return Err(Error::invalid(format!(
            "the output has {} elements; the result has {}",
            dst.len(),
            src.len()
        )));
    }
    dst.copy_from_slice(src);
    Ok(())
}

/// Where a view's elements are.
#[derive(Clone)]
enum Place {
    Device { ptr: u64, gpu: Arc<Gpu> },
    Host,
}

/// Check that a cudarc slice lives in the context of `gpu`.
fn same_context<T>(s: &impl DeviceSlice<T>, gpu: &Gpu) -> Result<()> {
    let ctx = s.stream().context();
    if ctx.cu_ctx() != gpu.context().cu_ctx() {
        return Err(Error::invalid(format!(
            "the slice belongs to the CUDA context of device {}, not to GPU {}'s",
            ctx.ordinal(),
            gpu.ordinal()
        )));
    }
    Ok(())
}

/// The element range `bounds` of a view of `len` elements, checked.
fn range(bounds: impl RangeBounds<usize>, len: usize) -> Result<(usize, usize)> {
    let start = match bounds.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match bounds.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    if start > end || end > len {
        return Err(Error::invalid(format!(
            "view range {start}..{end} is outside a view of {len} elements"
        )));
    }
    Ok((start, end))
}

/// Host elements a view holds: `&[T]` for a [`View`], `&mut [T]` for a [`ViewMut`].
trait HostElems: Default + Deref {
    /// The elements `r` (in range: the caller checked it).
    fn cut(self, r: Range<usize>) -> Self;
}
impl<T> HostElems for &[T] {
    fn cut(self, r: Range<usize>) -> Self {
        &self[r]
    }
}
impl<T> HostElems for &mut [T] {
    fn cut(self, r: Range<usize>) -> Self {
        &mut self[r]
    }
}

/// What [`View`] and [`ViewMut`] are, either way they borrow the host elements: a length, a
/// place, and the elements when the place is the host (empty on a device).
#[derive(Clone)]
struct Region<H> {
    len: usize,
    place: Place,
    host: H,
}

impl<T: Pod, H: HostElems + Deref<Target = [T]>> Region<H> {
    fn host(data: H) -> Self {
        Region {
            len: data.len(),
            place: Place::Host,
            host: data,
        }
    }

    fn device(ptr: u64, len: usize, gpu: &Arc<Gpu>) -> Self {
        Region {
            len,
            place: Place::Device {
                ptr,
                gpu: gpu.clone(),
            },
            host: H::default(),
        }
    }

    /// `from_raw`: refuses a null or misaligned `ptr` (for a non-empty view) and a byte size past
    /// `isize::MAX`.
    fn raw(ptr: u64, len: usize, gpu: &Arc<Gpu>) -> Result<Self> {
        check_raw::<T>(ptr, len)?;
        Ok(Self::device(ptr, len, gpu))
    }

    /// The device memory of `buf`; `None` for a host buffer.
    fn device_buffer(buf: &Buffer<T>) -> Option<Self> {
        let (slice, gpu) = buf.device_parts()?;
        let (ptr, _record) = slice.device_ptr(gpu.stream());
        Some(Self::device(ptr, buf.len(), gpu))
    }

    /// The elements `bounds` of this region, checked against its length.
    fn narrow(self, bounds: impl RangeBounds<usize>) -> Result<Self> {
        let (start, end) = range(bounds, self.len)?;
        let (place, host) = match self.place {
            Place::Host => (Place::Host, self.host.cut(start..end)),
            Place::Device { ptr, gpu } => (
                Place::Device {
                    // In range: `start` is inside a view whose byte size fits isize.
                    ptr: ptr + (start * size_of::<T>()) as u64,
                    gpu,
                },
                H::default(),
            ),
        };
        Ok(Region {
            len: end - start,
            place,
            host,
        })
    }

    fn is_device(&self) -> bool {
        matches!(self.place, Place::Device { .. })
    }

    fn elements(&self) -> Result<&[T]> {
        match self.place {
            Place::Host => Ok(&*self.host),
            Place::Device { .. } => Err(Error::invalid(DEVICE_ON_CPU)),
        }
    }

    fn device_ptr(&self, on: &Gpu) -> Result<u64> {
        match &self.place {
            Place::Device { ptr, gpu } if gpu.ordinal() == on.ordinal() => Ok(*ptr),
            Place::Device { gpu, .. } => Err(Error::invalid(format!(
                "a view of GPU {} was passed to GPU {}",
                gpu.ordinal(),
                on.ordinal()
            ))),
            Place::Host => Err(Error::invalid(HOST_ON_GPU)),
        }
    }

    fn fmt(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.place {
            Place::Host => write!(f, "{name}(host, len {})", self.len),
            Place::Device { gpu, .. } => {
                write!(f, "{name}(cuda:{}, len {})", gpu.ordinal(), self.len)
            }
        }
    }
}

/// Memory the caller owns, read by an op: host elements or device memory of one [`Gpu`].
///
/// Made from a host slice ([`View::host`]), a cudarc slice or view ([`View::device`]), a raw
/// device pointer ([`View::from_raw`]) or a [`Buffer`] ([`View::of`]); narrowed with
/// [`View::slice`]. It borrows the memory for `'a`.
///
/// Ordering: a device view only records an address. The op queues its kernels on the
/// [`Gpu`]'s stream; work that writes the memory on another stream must be ordered before
/// (an event, or a synchronisation) by the caller.
///
/// ```
/// use ferrinfer_runtime::{Src, View};
/// let qkv = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let k = View::host(&qkv).slice(2..4)?;
/// assert_eq!(k.len(), 2);
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
#[derive(Clone)]
pub struct View<'a, T: Pod>(Region<&'a [T]>);

impl<'a, T: Pod> View<'a, T> {
    /// A view of host memory, for the CPU backend.
    ///
    /// ```
    /// use ferrinfer_runtime::{Src, View};
    /// assert_eq!(View::host(&[0u32; 5]).len(), 5);
    /// ```
    pub fn host(data: &'a [T]) -> Self {
        View(Region::host(data))
    }

    /// A view of a cudarc `CudaSlice`, `CudaView` or `CudaViewMut` that lives on `gpu` (the
    /// context of [`Backend::cuda`](crate::Backend::cuda)); a slice of another context is refused.
    ///
    /// ```no_run
    /// use ferrinfer_runtime::{Backend, View};
    /// # fn main() -> ferrinfer_runtime::Result<()> {
    /// let backend = Backend::cuda(0)?;
    /// let gpu = backend.gpu().unwrap();
    /// let qkv = gpu.stream().alloc_zeros::<half::bf16>(1024)?;
    /// let q = View::device(&qkv, gpu)?;
    /// let k_part = qkv.slice(512..768);
    /// let k = View::device(&k_part, gpu)?;
    /// # let _ = (q, k); Ok(()) }
    /// ```
    pub fn device<S: DevicePtr<T>>(slice: &'a S, gpu: &Arc<Gpu>) -> Result<Self> {
        same_context(slice, gpu)?;
        let (ptr, _record) = slice.device_ptr(gpu.stream());
        Ok(View(Region::device(ptr, slice.len(), gpu)))
    }

    /// A view of `len` elements at device address `ptr` on `gpu`, such as a tensor of another
    /// library. Refuses a null or misaligned `ptr` (for a non-empty view) and a byte size past
    /// `isize::MAX`.
    ///
    /// # Safety
    /// For as long as the view (and any launch queued with it) lives: `ptr..ptr + len *
    /// size_of::<T>()` is device memory allocated in `gpu`'s context, holding valid `T`s, and
    /// nothing writes it while an op reads it. (Views may overlap: a read never conflicts with a
    /// read.)
    ///
    /// ```no_run
    /// use ferrinfer_runtime::{Backend, View};
    /// # fn main() -> ferrinfer_runtime::Result<()> {
    /// let backend = Backend::cuda(0)?;
    /// let gpu = backend.gpu().unwrap();
    /// let mem = gpu.stream().alloc_zeros::<f32>(64)?;
    /// use ferrinfer_runtime::cudarc::driver::DevicePtr;
    /// let (ptr, _sync) = mem.device_ptr(gpu.stream());
    /// // SAFETY: `mem` is 64 f32 of this GPU and outlives the view.
    /// let view = unsafe { View::<f32>::from_raw(ptr, 64, gpu)? };
    /// # let _ = view; Ok(()) }
    /// ```
    pub unsafe fn from_raw(ptr: u64, len: usize, gpu: &Arc<Gpu>) -> Result<Self> {
        Ok(View(Region::raw(ptr, len, gpu)?))
    }

    /// A view of a whole [`Buffer`].
    ///
    /// ```
    /// use ferrinfer_runtime::{Backend, Src, View};
    /// let buf = Backend::Cpu.upload(&[1u8, 2, 3])?;
    /// assert_eq!(View::of(&buf).slice(1..)?.len(), 2);
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn of(buf: &'a Buffer<T>) -> Self {
        match Region::device_buffer(buf) {
            Some(region) => View(region),
            None => View::host(buf.host().unwrap_or(&[])),
        }
    }

    /// The elements `bounds` of this view (e.g. q, k or v inside a fused QKV tensor).
    ///
    /// ```
    /// use ferrinfer_runtime::{Src, View};
    /// let data = [0u16; 10];
    /// assert_eq!(View::host(&data).slice(4..)?.len(), 6);
    /// assert!(View::host(&data).slice(4..11).is_err());
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn slice(&self, bounds: impl RangeBounds<usize>) -> Result<View<'a, T>> {
        Ok(View(self.0.clone().narrow(bounds)?))
    }

    /// Whether the view is of device memory.
    ///
    /// ```
    /// assert!(!ferrinfer_runtime::View::host(&[1u8]).is_device());
    /// ```
    pub fn is_device(&self) -> bool {
        self.0.is_device()
    }
}

fn check_raw<T>(ptr: u64, len: usize) -> Result<()> {
    if len
        .checked_mul(size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Error::invalid(format!(
            "from_raw: {len} elements exceed the address space"
        )));
    }
    if len > 0 && (ptr == 0 || !ptr.is_multiple_of(align_of::<T>() as u64)) {
        return Err(Error::invalid(format!(
            "from_raw: device pointer {ptr:#x} is null or not aligned to {} bytes",
            align_of::<T>()
        )));
    }
    Ok(())
}

/// Memory the caller owns, written by an op: host elements or device memory of one [`Gpu`].
/// The mutable twin of [`View`], with the same constructors.
///
/// ```
/// use ferrinfer_runtime::{Src, ViewMut};
/// let mut out = [0.0f32; 8];
/// let mut view = ViewMut::host(&mut out);
/// assert_eq!(view.slice_mut(4..)?.len(), 4);
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
pub struct ViewMut<'a, T: Pod>(Region<&'a mut [T]>);

impl<'a, T: Pod> ViewMut<'a, T> {
    /// A view of host memory, for the CPU backend.
    ///
    /// ```
    /// use ferrinfer_runtime::{Src, ViewMut};
    /// assert_eq!(ViewMut::host(&mut [0u32; 5]).len(), 5);
    /// ```
    pub fn host(data: &'a mut [T]) -> Self {
        ViewMut(Region::host(data))
    }

    /// A view of a cudarc `CudaSlice` or `CudaViewMut` on `gpu`; see [`View::device`].
    ///
    /// ```no_run
    /// use ferrinfer_runtime::{Backend, ViewMut};
    /// # fn main() -> ferrinfer_runtime::Result<()> {
    /// let backend = Backend::cuda(0)?;
    /// let gpu = backend.gpu().unwrap();
    /// let mut o = gpu.stream().alloc_zeros::<half::bf16>(1024)?;
    /// let o = ViewMut::device(&mut o, gpu)?;
    /// # let _ = o; Ok(()) }
    /// ```
    pub fn device<S: DevicePtrMut<T>>(slice: &'a mut S, gpu: &Arc<Gpu>) -> Result<Self> {
        same_context(slice, gpu)?;
        let len = slice.len();
        let (ptr, _record) = slice.device_ptr_mut(gpu.stream());
        Ok(ViewMut(Region::device(ptr, len, gpu)))
    }

    /// A view of `len` elements at device address `ptr` on `gpu`; see [`View::from_raw`].
    ///
    /// # Safety
    /// For as long as the view (and any launch queued with it) lives: `ptr..ptr + len *
    /// size_of::<T>()` is device memory allocated in `gpu`'s context, holding valid `T`s, that
    /// nothing else reads or writes while an op writes it, and no other view passed to the same
    /// op overlaps the elements this one is written at.
    ///
    /// ```no_run
    /// use ferrinfer_runtime::{Backend, ViewMut};
    /// # fn main() -> ferrinfer_runtime::Result<()> {
    /// let backend = Backend::cuda(0)?;
    /// let gpu = backend.gpu().unwrap();
    /// let mem = gpu.stream().alloc_zeros::<f32>(64)?;
    /// use ferrinfer_runtime::cudarc::driver::DevicePtr;
    /// let (ptr, _sync) = mem.device_ptr(gpu.stream());
    /// // SAFETY: `mem` is 64 f32 of this GPU, outlives the view and nothing else uses it.
    /// let view = unsafe { ViewMut::<f32>::from_raw(ptr, 64, gpu)? };
    /// # let _ = view; Ok(()) }
    /// ```
    pub unsafe fn from_raw(ptr: u64, len: usize, gpu: &Arc<Gpu>) -> Result<Self> {
        Ok(ViewMut(Region::raw(ptr, len, gpu)?))
    }

    /// A mutable view of a whole [`Buffer`].
    ///
    /// ```
    /// use ferrinfer_runtime::{Backend, Src, ViewMut};
    /// let mut buf = Backend::Cpu.filled(6, 0u8)?;
    /// assert_eq!(ViewMut::of(&mut buf).slice_mut(..2)?.len(), 2);
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn of(buf: &'a mut Buffer<T>) -> Self {
        match Region::device_buffer(buf) {
            Some(region) => ViewMut(region),
            None => ViewMut::host(buf.host_mut().map(|v| &mut v[..]).unwrap_or(&mut [])),
        }
    }

    /// The elements `bounds` of this view, borrowed from it.
    ///
    /// ```
    /// use ferrinfer_runtime::{Src, ViewMut};
    /// let mut data = [0u16; 10];
    /// assert!(ViewMut::host(&mut data).slice_mut(9..=10).is_err());
    /// ```
    pub fn slice_mut(&mut self, bounds: impl RangeBounds<usize>) -> Result<ViewMut<'_, T>> {
        let whole = Region {
            len: self.0.len,
            place: self.0.place.clone(),
            host: &mut *self.0.host,
        };
        Ok(ViewMut(whole.narrow(bounds)?))
    }

    /// A read-only view of the same elements.
    ///
    /// ```
    /// use ferrinfer_runtime::{Src, ViewMut};
    /// let mut data = [0u8; 3];
    /// assert_eq!(ViewMut::host(&mut data).as_view().len(), 3);
    /// ```
    pub fn as_view(&self) -> View<'_, T> {
        View(Region {
            len: self.0.len,
            place: self.0.place.clone(),
            host: &*self.0.host,
        })
    }

    /// Whether the view is of device memory.
    ///
    /// ```
    /// assert!(!ferrinfer_runtime::ViewMut::host(&mut [1u8]).is_device());
    /// ```
    pub fn is_device(&self) -> bool {
        self.0.is_device()
    }
}

/// What [`View`] and [`ViewMut`] implement alike, from their [`Region`].
macro_rules! view_traits {
    ($view:ident) => {
        impl<T: Pod> fmt::Debug for $view<'_, T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(stringify!($view), f)
            }
        }
        impl<T: Pod> Access<T> for $view<'_, T> {
            fn host(&self) -> Result<&[T]> {
                self.0.elements()
            }
            fn device_ptr(&self, on: &Gpu) -> Result<u64> {
                self.0.device_ptr(on)
            }
        }
        impl<T: Pod> Src<T> for $view<'_, T> {
            fn len(&self) -> usize {
                self.0.len
            }
        }
    };
}
view_traits!(View);
view_traits!(ViewMut);

impl<T: Pod> AccessMut<T> for ViewMut<'_, T> {
    fn host_mut(&mut self) -> Result<&mut [T]> {
        match self.0.place {
            Place::Host => Ok(self.0.host),
            Place::Device { .. } => Err(Error::invalid(DEVICE_ON_CPU)),
        }
    }
}
impl<T: Pod> Dst<T> for ViewMut<'_, T> {}

impl<T: Pod> Access<T> for Buffer<T> {
    fn host(&self) -> Result<&[T]> {
        Buffer::host(self)
    }
    fn device_ptr(&self, on: &Gpu) -> Result<u64> {
        Buffer::device_ptr(self, on)
    }
}
impl<T: Pod> AccessMut<T> for Buffer<T> {
    fn host_mut(&mut self) -> Result<&mut [T]> {
        Ok(Buffer::host_mut(self)?)
    }
}
impl<T: Pod> Src<T> for Buffer<T> {
    fn len(&self) -> usize {
        Buffer::len(self)
    }
}
impl<T: Pod> Dst<T> for Buffer<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::backend::Backend;

    #[test]
    fn host_views_read_and_write_their_range() {
        let mut data = [1u32, 2, 3, 4, 5];
        {
            let mut v = ViewMut::host(&mut data);
            let mut tail = v.slice_mut(3..).unwrap();
            tail.host_mut().unwrap()[0] = 40;
            assert_eq!(tail.as_view().host().unwrap(), &[40, 5]);
        }
        assert_eq!(data, [1, 2, 3, 40, 5]);
        let v = View::host(&data);
        assert_eq!(v.slice(1..=2).unwrap().host().unwrap(), &[2, 3]);
        let e = v.slice(2..9).unwrap_err().to_string();
        assert!(e.contains("2..9 is outside a view of 5"), "{e}");
        let buf = Backend::Cpu.upload(&data).unwrap();
        assert_eq!(View::of(&buf).slice(4..).unwrap().host().unwrap(), &[5]);
        assert_eq!(format!("{:?}", v.slice(1..).unwrap()), "View(host, len 4)");
        assert_eq!(
            format!("{:?}", ViewMut::host(&mut data)),
            "ViewMut(host, len 5)"
        );
    }

    #[test]
    fn raw_views_are_checked() {
        assert!(check_raw::<u32>(0x1000, 4).is_ok());
        assert!(check_raw::<u32>(0, 0).is_ok());
        assert!(check_raw::<u32>(0, 4).is_err());
        assert!(check_raw::<u32>(0x1002, 4).is_err());
        assert!(check_raw::<u32>(0x1000, usize::MAX / 2).is_err());
    }
}
