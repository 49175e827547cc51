"""Timestamps of the FA3 prefill kernel's item boundaries (kernels/notes/fa3.md, session 18).

Writes a copy of kernels/cuda whose attention/prefill_sm90.cuh records clock64() at each item's
steps, for CTAs 0-3 of one launch, into a module global `fi_trace_buf[cta][role][item][8]`:
role 0, the producer's thread 0: item read, Q slot free, Q copy issued, last K/V tile issued,
tiles; roles 1 and 2, thread 0 of each consumer warpgroup: Q landed, first S done, last S done,
last P V done, epilogue done, (unused: the item-crossing S of the kernel session 18 traced),
tiles. No printf: a call in the kernel makes ptxas serialize every wgmma. The dump is host side
(bench/trace/dump.patch):

    python3 bench/trace/sm90_trace.py /tmp/ktrace [LAUNCH]     # LAUNCH: the module's n-th launch (12)
    git apply bench/trace/dump.patch && cargo build --release -p ferrinfer-bench
    FERRINFER_TRACE=1 FERRINFER_KERNEL_DIR=/tmp/ktrace ferrinfer-bench \
        --filter prefill_ragged_b16_l1024_causal > trace.log
    python3 bench/trace/boundaries.py trace.log

The text patterns match prefill_sm90.cuh as of session 18 (the calls of kernels/notes/fa3.md,
session 18, traced the kernel before its item-crossing S was removed); edit them with the kernel.
"""
import os
import shutil
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
src = os.path.join(root, "kernels", "cuda")
dst = sys.argv[1]
launch = sys.argv[2] if len(sys.argv) > 2 else "12"
if os.path.exists(dst):
    shutil.rmtree(dst)
shutil.copytree(src, dst)
p = os.path.join(dst, "attention", "prefill_sm90.cuh")


def rep(old, new, count=1):
    global s
    assert s.count(old) == count, (old, s.count(old))
    s = s.replace(old, new)


s = open(p).read()
rep("template <class V, class P, class T, int D>\n__device__ void prefill_sm90(",
"""extern "C" {
__device__ unsigned fi_trace_ctr;
__device__ unsigned fi_trace_flag[1024];
__device__ long long fi_trace_buf[4][3][64][8];
}
#ifndef FI_TRACE_LAUNCH
#define FI_TRACE_LAUNCH @LAUNCH@
#endif
#define FI_T(role, n, e) do { if (fi_trace_on && (n) < 64) fi_trace_buf[blockIdx.x][role][n][e] = clock64(); } while (0)
#define FI_TV(role, n, e, v) do { if (fi_trace_on && (n) < 64) fi_trace_buf[blockIdx.x][role][n][e] = (v); } while (0)
template <class V, class P, class T, int D>
__device__ void prefill_sm90(""")
rep("    mbar_init_fence();\n  }\n  __syncthreads();\n",
"""    mbar_init_fence();
  }
  if (threadIdx.x == 0) {
    const unsigned c = atomicAdd(&fi_trace_ctr, 1u) / gridDim.x;
    fi_trace_flag[blockIdx.x] = (c == FI_TRACE_LAUNCH && blockIdx.x < 4) ? 1u : 0u;
  }
  __syncthreads();
  const unsigned fi_trace_on = *(volatile unsigned*)&fi_trace_flag[blockIdx.x];
""")
rep("      if (pt == 0) item_at(it, item_index(n));\n      if (n >= Sh::kQSlots) mbar_wait(q_empty(slot), ((n / Sh::kQSlots) - 1) & 1);\n",
"""      if (pt == 0) item_at(it, item_index(n));
      if (pt == 0) FI_T(0, n, 0);
      if (n >= Sh::kQSlots) mbar_wait(q_empty(slot), ((n / Sh::kQSlots) - 1) & 1);
      if (pt == 0) FI_T(0, n, 1);
""")
rep("""            tma_load_3d(sq + cb * kTileQ * 128, &maps.q, q_full(slot), cb * 64, head, row);
          }
""", """            tma_load_3d(sq + cb * kTileQ * 128, &maps.q, q_full(slot), cb * 64, head, row);
          }
          FI_T(0, n, 2);
""")
rep("      g += tiles;\n", "      if (pt == 0) { FI_T(0, n, 3); FI_TV(0, n, 4, tiles); }\n      g += tiles;\n")
rep("""    if (!it.w.valid) break;
    const WorkItem& w = it.w;
""", """    if (!it.w.valid) break;
    if (wt == 0) FI_T(1 + cw, n, 0);
    const WorkItem& w = it.w;
""")
rep("""        s_alone(g);
        mbar_arrive_if(q_empty(slot), keys.tiles == 1);
""", """        s_alone(g);
        if (wt == 0) { FI_T(1 + cw, n, 1); FI_TV(1 + cw, n, 6, keys.tiles); }
        mbar_arrive_if(q_empty(slot), keys.tiles == 1);
""")
rep("""        mbar_arrive_if(q_empty(slot), t + 1 == keys.tiles);  // the item's last S: Q is free
        softmax_tile(t);
        wgmma_wait<0>();""", """        mbar_arrive_if(q_empty(slot), t + 1 == keys.tiles);  // the item's last S: Q is free
        if (wt == 0 && t + 1 == keys.tiles) FI_T(1 + cw, n, 2);
        softmax_tile(t);
        wgmma_wait<0>();""")
rep("""      if (keys.tiles > 0) pv_alone(g + keys.tiles - 1);
      epilogue();
""", """      if (keys.tiles > 0) pv_alone(g + keys.tiles - 1);
      if (wt == 0) FI_T(1 + cw, n, 3);
      epilogue();
      if (wt == 0) FI_T(1 + cw, n, 4);
""")
open(p, 'w').write(s.replace("@LAUNCH@", launch))
