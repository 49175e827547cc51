"""What the benchmark's L2 flush costs the kernel it times (BENCHMARKS.md, "What is measured").

Both benchmarks (ours and triton's do_bench in flashinfer_anchor.py) zero 256 MB before every timed
call, which leaves L2 full of dirty lines that the timed kernel writes back. This times a kernel
that only reads N bytes (16-byte streaming loads) after a 256 MB zero, after a 256 MB read (clean
lines) and after nothing: the median of 60 calls each, CUDA events.

Usage on the GPU machine (CuPy): python3 l2_flush.py OUT.json
"""
import cupy as cp, numpy as np, json, sys
src = r'''
extern "C" __global__ void rd(const uint4* __restrict__ x, unsigned long long n, unsigned* out) {
  unsigned acc = 0;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    uint4 v = __ldcs(x + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) out[0] = acc;
}'''
k = cp.RawKernel(src, 'rd')
dev = cp.cuda.Device()
sms = dev.attributes['MultiProcessorCount']
out = cp.zeros(1, dtype=cp.uint32)
flush = cp.zeros(256 << 20, dtype=cp.uint8)
def read(buf):
    n = buf.nbytes // 16
    k((sms * 8,), (512,), (buf, cp.uint64(n), out))
res = {}
for mb in [256, 1024, 4096]:
    x = cp.ones(mb << 20, dtype=cp.uint8)
    for mode in ['zero', 'read', 'none']:
        ts = []
        for it in range(70):
            if mode == 'zero': flush.fill(0)
            elif mode == 'read': read(flush)
            s, e = cp.cuda.Event(), cp.cuda.Event()
            s.record(); read(x); e.record(); e.synchronize()
            if it >= 10: ts.append(cp.cuda.get_elapsed_time(s, e))
        t = float(np.median(ts))
        res[f'{mb}MB_{mode}'] = t
        print(f'{mb} MB flush={mode}: {t*1e3:.1f} us  {x.nbytes/t/1e6:.0f} GB/s', flush=True)
json.dump(res, open(sys.argv[1], 'w'), indent=1)
