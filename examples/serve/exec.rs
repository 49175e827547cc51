//! What the model needs beside ferrinfer's ops, on the CPU or on the GPU: memory, the GEMMs
//! (plain Rust, or cuBLAS on the engine's stream), a row gather (embedding lookup, last rows)
//! and a random fill, the last two as tiny NVRTC kernels through cudarc.

use std::sync::Arc;

use ferrinfer::cudarc::cublas::{CudaBlas, result as blas, sys as bsys};
use ferrinfer::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use ferrinfer::cudarc::nvrtc;
use ferrinfer::device::Gpu;
use ferrinfer::prelude::*;

/// Errors of the example: strings with context.
pub type Res<T> = Result<T, String>;

/// Turn any error into the example's.
pub fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Memory of the model: a host vector on the CPU backend, a cudarc slice (no events) on the GPU.
pub enum Mem<T> {
    /// CPU backend.
    Host(Vec<T>),
    /// GPU backend.
    Dev(CudaSlice<T>),
}

impl<T> Mem<T> {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            Mem::Host(v) => v.len(),
            Mem::Dev(s) => s.len(),
        }
    }
}

/// The GPU side: the engine's context (event tracking off: one stream orders everything),
/// its stream, ferrinfer on that stream, cuBLAS on it with a fixed workspace (so that a CUDA
/// graph can capture the GEMMs), and the two helper kernels.
pub struct Device {
    pub stream: Arc<CudaStream>,
    pub gpu: Arc<Gpu>,
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    gather: CudaFunction,
    fill: CudaFunction,
}

const KERNELS: &str = r#"
// bf16 moved as raw 16-bit words: no header needed.
extern "C" __global__ void gather_rows(const int* idx, const unsigned short* table,
                                       unsigned short* out, int rows, int row_len, int table_rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    int t = idx[r];
    bool ok = t >= 0 && t < table_rows;  // a bad id gives a zero row, never a wild read
    for (int i = threadIdx.x; i < row_len; i += blockDim.x)
        out[(long long)r * row_len + i] = ok ? table[(long long)t * row_len + i] : 0;
}
// Uniform in [-scale, scale) from a hash of (seed, index), rounded down to bf16.
extern "C" __global__ void fill_random(unsigned short* out, unsigned long long n,
                                       unsigned int seed, float scale) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned int h = (unsigned int)i * 2654435761u ^ (unsigned int)(i >> 32) * 40503u ^ seed;
        h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
        float u = (h >> 8) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
        out[i] = (unsigned short)(__float_as_uint(u * scale) >> 16);
    }
}
"#;

/// cuBLAS workspace: enough for Hopper's largest GEMM kernels (NVIDIA recommends 32 MiB).
const WORKSPACE: usize = 32 << 20;

impl Device {
    /// GPU `ordinal`, or why not.
    pub fn new(ordinal: usize) -> Res<Self> {
        // ferrinfer looks for the driver first and says why not; cudarc would panic without one.
        Gpu::get(ordinal).map_err(err("CUDA"))?;
        let ctx = CudaContext::new(ordinal).map_err(err("CUDA"))?;
        // SAFETY: this handle's buffers are all used on the one stream made below, so cudarc's
        // cross-stream events are not needed; without them a capture records no event waits.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(err("stream"))?;
        let gpu = Gpu::on_stream(stream.clone()).map_err(err("ferrinfer on the stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(err("cuBLAS"))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE)
            .map_err(err("workspace"))?;
        let (ws, _) = workspace.device_ptr(&stream);
        // SAFETY: the workspace is WORKSPACE bytes of this context, kept alive by `Device` for as
        // long as the handle that uses it.
        unsafe { bsys::cublasSetWorkspace_v2(*blas.handle(), ws as *mut _, WORKSPACE) }
            .result()
            .map_err(err("cublasSetWorkspace"))?;
        let arch = gpu.arch();
        let opts = nvrtc::CompileOptions {
            options: vec![format!(
                "--gpu-architecture=compute_{}{}",
                arch.major, arch.minor
            )],
            ..Default::default()
        };
        let ptx = nvrtc::compile_ptx_with_opts(KERNELS, opts).map_err(err("NVRTC"))?;
        let module = ctx.load_module(ptx).map_err(err("load module"))?;
        Ok(Device {
            gather: module
                .load_function("gather_rows")
                .map_err(err("gather_rows"))?,
            fill: module
                .load_function("fill_random")
                .map_err(err("fill_random"))?,
            stream,
            gpu,
            blas,
            _workspace: workspace,
        })
    }

    /// Device address of a slice (no events: tracking is off).
    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.stream).0
    }
}

/// Where the model runs.
pub struct Exec {
    /// ferrinfer's backend: the CPU reference or the GPU on [`Device::stream`].
    pub backend: Backend,
    /// The GPU side, if any.
    pub dev: Option<Device>,
}

impl Exec {
    /// The CPU backend.
    pub fn cpu() -> Self {
        Exec {
            backend: Backend::Cpu,
            dev: None,
        }
    }
    /// GPU `ordinal`.
    pub fn gpu(ordinal: usize) -> Res<Self> {
        let dev = Device::new(ordinal)?;
        Ok(Exec {
            backend: Backend::Cuda(dev.gpu.clone()),
            dev: Some(dev),
        })
    }

    /// `n` zeros.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits + Clone + Default>(
        &self,
        n: usize,
    ) -> Res<Mem<T>> {
        Ok(match &self.dev {
            None => Mem::Host(vec![T::default(); n]),
            Some(d) => Mem::Dev(d.stream.alloc_zeros(n.max(1)).map_err(err("alloc"))?),
        })
    }
    /// A copy of `data`.
    pub fn upload<T: DeviceRepr + Clone>(&self, data: &[T]) -> Res<Mem<T>> {
        Ok(match &self.dev {
            None => Mem::Host(data.to_vec()),
            Some(d) => Mem::Dev(d.stream.clone_htod(data).map_err(err("upload"))?),
        })
    }
    /// Overwrite the start of `m` with `data`.
    pub fn write<T: DeviceRepr + Copy>(&self, m: &mut Mem<T>, data: &[T]) -> Res<()> {
        if data.len() > m.len() {
            return Err(format!("write: {} elements into {}", data.len(), m.len()));
        }
        match (m, &self.dev) {
            (Mem::Host(v), _) => v[..data.len()].copy_from_slice(data),
            (Mem::Dev(s), Some(d)) => d
                .stream
                .memcpy_htod(data, &mut s.slice_mut(..data.len()))
                .map_err(err("write"))?,
            (Mem::Dev(_), None) => return Err("device memory without a device".into()),
        }
        Ok(())
    }
    /// The first `n` elements on the host (waits for the stream).
    pub fn read<T: DeviceRepr + Copy + Default>(&self, m: &Mem<T>, n: usize) -> Res<Vec<T>> {
        if n > m.len() {
            return Err(format!("read: {n} elements of {}", m.len()));
        }
        match (m, &self.dev) {
            (Mem::Host(v), _) => Ok(v[..n].to_vec()),
            (Mem::Dev(s), Some(d)) => d.stream.clone_dtoh(&s.slice(..n)).map_err(err("read")),
            (Mem::Dev(_), None) => Err("device memory without a device".into()),
        }
    }
    /// Elements `range` of `m` for a ferrinfer op.
    pub fn view<'a, T: ferrinfer::device::Pod + DeviceRepr>(
        &self,
        m: &'a Mem<T>,
        range: std::ops::Range<usize>,
    ) -> Res<View<'a, T>> {
        if range.start > range.end || range.end > m.len() {
            return Err(format!("view {range:?} of {} elements", m.len()));
        }
        match (m, &self.dev) {
            (Mem::Host(v), _) => Ok(View::host(&v[range])),
            (Mem::Dev(s), Some(d)) => {
                // A sub-slice of the allocation; the view checks its context.
                let ptr = d.ptr(s) + (range.start * std::mem::size_of::<T>()) as u64;
                // SAFETY: `range` lies inside `s` (checked above), which is memory of `d`'s
                // context holding initialised Ts, borrowed for 'a by the returned view.
                unsafe { View::from_raw(ptr, range.len(), &d.gpu) }.map_err(err("view"))
            }
            (Mem::Dev(_), None) => Err("device memory without a device".into()),
        }
    }
    /// Elements `range` of `m`, writable.
    pub fn view_mut<'a, T: ferrinfer::device::Pod + DeviceRepr>(
        &self,
        m: &'a mut Mem<T>,
        range: std::ops::Range<usize>,
    ) -> Res<ViewMut<'a, T>> {
        if range.start > range.end || range.end > m.len() {
            return Err(format!("view {range:?} of {} elements", m.len()));
        }
        match (m, &self.dev) {
            (Mem::Host(v), _) => Ok(ViewMut::host(&mut v[range])),
            (Mem::Dev(s), Some(d)) => {
                let ptr = d.ptr(s) + (range.start * std::mem::size_of::<T>()) as u64;
                // SAFETY: as in `view`; the &'a mut borrow of `m` makes the view the only access.
                unsafe { ViewMut::from_raw(ptr, range.len(), &d.gpu) }.map_err(err("view"))
            }
            (Mem::Dev(_), None) => Err("device memory without a device".into()),
        }
    }

    /// `y[m, n] = x[m, k] w[n, k]^T` (bf16 in, f32 accumulate), y bf16 or f32.
    pub fn gemm<Y: Out>(
        &self,
        x: &Mem<bf16>,
        w: &Mem<bf16>,
        y: &mut Mem<Y>,
        (m, n, k): (usize, usize, usize),
    ) -> Res<()> {
        if x.len() < m * k || w.len() != n * k || y.len() < m * n {
            return Err(format!(
                "gemm {m}x{n}x{k}: x {} w {} y {} elements",
                x.len(),
                w.len(),
                y.len()
            ));
        }
        if m == 0 {
            return Ok(());
        }
        match (x, w, y, &self.dev) {
            (Mem::Host(x), Mem::Host(w), Mem::Host(y), _) => {
                gemm_host(&x[..m * k], w, &mut y[..m * n], n, k);
                Ok(())
            }
            (Mem::Dev(x), Mem::Dev(w), Mem::Dev(y), Some(d)) => {
                let (alpha, beta) = (1.0f32, 0.0f32);
                let (m, n, k) = (m as i32, n as i32, k as i32);
                // Row-major y = x w^T is column-major y^T = w^T(as stored, k x n) x^T: A = w
                // transposed, B = x, C = y, leading dimensions k, k, n.
                // SAFETY: the lengths were checked above (w holds n*k, x at least m*k, y at least
                // m*n elements), every slice is memory of this context, and alpha/beta are host
                // f32 as CUBLAS_COMPUTE_32F expects (pointer mode host, cuBLAS's default).
                unsafe {
                    blas::gemm_ex(
                        *d.blas.handle(),
                        bsys::cublasOperation_t::CUBLAS_OP_T,
                        bsys::cublasOperation_t::CUBLAS_OP_N,
                        n,
                        m,
                        k,
                        (&alpha) as *const f32 as *const _,
                        d.ptr(w) as *const _,
                        bsys::cudaDataType_t::CUDA_R_16BF,
                        k,
                        d.ptr(x) as *const _,
                        bsys::cudaDataType_t::CUDA_R_16BF,
                        k,
                        (&beta) as *const f32 as *const _,
                        d.ptr(y) as *mut _,
                        Y::CUDA,
                        n,
                        bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(err("cublasGemmEx"))
            }
            _ => Err("gemm: operands on different backends".into()),
        }
    }

    /// `out[r] = table[idx[r]]` for `rows` rows of `row_len` (a row of zeros for an id outside
    /// the table).
    pub fn gather(
        &self,
        idx: &Mem<i32>,
        rows: usize,
        table: &Mem<bf16>,
        row_len: usize,
        out: &mut Mem<bf16>,
    ) -> Res<()> {
        let table_rows = table.len() / row_len;
        if idx.len() < rows || out.len() < rows * row_len || table_rows == 0 {
            return Err(format!(
                "gather: {rows} rows of {row_len} from {} ids, {} table, {} out",
                idx.len(),
                table.len(),
                out.len()
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        match (idx, table, out, &self.dev) {
            (Mem::Host(i), Mem::Host(t), Mem::Host(o), _) => {
                for (r, &id) in i[..rows].iter().enumerate() {
                    let dst = &mut o[r * row_len..(r + 1) * row_len];
                    match usize::try_from(id).ok().filter(|&id| id < table_rows) {
                        Some(id) => dst.copy_from_slice(&t[id * row_len..(id + 1) * row_len]),
                        None => dst.fill(bf16::ZERO),
                    }
                }
                Ok(())
            }
            (Mem::Dev(i), Mem::Dev(t), Mem::Dev(o), Some(d)) => {
                let (pi, pt, po) = (d.ptr(i), d.ptr(t), d.ptr(o));
                let (rows, row_len, table_rows) = (rows as i32, row_len as i32, table_rows as i32);
                let mut b = d.stream.launch_builder(&d.gather);
                b.arg(&pi)
                    .arg(&pt)
                    .arg(&po)
                    .arg(&rows)
                    .arg(&row_len)
                    .arg(&table_rows);
                let cfg = LaunchConfig {
                    grid_dim: (rows as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the kernel reads idx[0..rows] and rows of the table only for ids inside
                // it (checked in the kernel against table_rows), and writes out[0..rows*row_len];
                // all three lengths were checked above.
                unsafe { b.launch(cfg) }
                    .map(|_| ())
                    .map_err(err("gather_rows"))
            }
            _ => Err("gather: operands on different backends".into()),
        }
    }

    /// Fill `m` with uniform values in `[-scale, scale)` from `seed` (GPU only; the CPU fills on
    /// the host).
    pub fn fill_random(&self, m: &mut Mem<bf16>, seed: u32, scale: f32) -> Res<()> {
        match (m, &self.dev) {
            (Mem::Dev(s), Some(d)) => {
                let (p, n) = (d.ptr(s), s.len() as u64);
                let mut b = d.stream.launch_builder(&d.fill);
                b.arg(&p).arg(&n).arg(&seed).arg(&scale);
                let cfg = LaunchConfig {
                    grid_dim: (d.gpu.sm_count() * 8, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the grid-stride loop writes elements 0..n of `s`, n = its length.
                unsafe { b.launch(cfg) }
                    .map(|_| ())
                    .map_err(err("fill_random"))
            }
            (Mem::Host(v), _) => {
                let mut rng = ferrinfer_testkit::Rng::new(u64::from(seed));
                v.iter_mut()
                    .for_each(|x| *x = bf16::from_f32((rng.uniform() * 2.0 - 1.0) * scale));
                Ok(())
            }
            (Mem::Dev(_), None) => Err("device memory without a device".into()),
        }
    }

    /// Zero the first `n` elements.
    pub fn zero(&self, m: &mut Mem<bf16>, n: usize) -> Res<()> {
        if n > m.len() {
            return Err(format!("zero: {n} of {}", m.len()));
        }
        match (m, &self.dev) {
            (Mem::Host(v), _) => v[..n].fill(bf16::ZERO),
            (Mem::Dev(s), Some(d)) => d
                .stream
                .memset_zeros(&mut s.slice_mut(..n))
                .map_err(err("memset"))?,
            (Mem::Dev(_), None) => return Err("device memory without a device".into()),
        }
        Ok(())
    }

    /// Wait for the stream.
    pub fn sync(&self) -> Res<()> {
        match &self.dev {
            Some(d) => d.stream.synchronize().map_err(err("synchronize")),
            None => Ok(()),
        }
    }
}

/// A GEMM output type: bf16 activations or f32 logits.
pub trait Out: DeviceRepr + Copy {
    /// cuBLAS's name for it.
    const CUDA: bsys::cudaDataType_t;
    /// From the f32 accumulator (the CPU path).
    fn from_f32(x: f32) -> Self;
}
impl Out for bf16 {
    const CUDA: bsys::cudaDataType_t = bsys::cudaDataType_t::CUDA_R_16BF;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl Out for f32 {
    const CUDA: bsys::cudaDataType_t = bsys::cudaDataType_t::CUDA_R_32F;
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// The CPU GEMM: rows of x against rows of w, f32 accumulation (tiny configs only).
fn gemm_host<Y: Out>(x: &[bf16], w: &[bf16], y: &mut [Y], n: usize, k: usize) {
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
        let xf: Vec<f32> = xr.iter().map(|v| v.to_f32()).collect();
        for (j, out) in yr.iter_mut().enumerate() {
            let wr = &wf[j * k..(j + 1) * k];
            *out = Y::from_f32(xf.iter().zip(wr).map(|(a, b)| a * b).sum());
        }
    }
}
