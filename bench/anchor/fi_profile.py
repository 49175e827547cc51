"""One FlashInfer 0.5.3 FA3 prefill row, timed and then run once for a profiler
(kernels/notes/fa3.md, session 17: ncu of ours beside FlashInfer's kernel).

Times the row as flashinfer_anchor.py does (triton's do_bench, its L2 flush, median of 200), then
runs it once more between cudaProfilerStart and cudaProfilerStop, so that
    ncu --set full --profile-from-start off python3 fi_profile.py ragged
profiles exactly one launch of FlashInfer's kernel. Ours, the same row:
    ncu --set full -k regex:ferrinfer_prefill_hd128_bf16_q128_k128_sm90a --launch-skip 5 \
        --launch-count 1 ferrinfer-bench --filter prefill_ragged_b16
Rows: `ragged` (prefill_ragged_b16_l1024_causal), `s8192` (prefill_single_s8192_causal), `full`
(prefill_single_s8192_full) and `paged_b4` (prefill_paged_b4_l8192_p16_causal, its pages laid
out by flashinfer_anchor.py's `paged`).
Needs FlashInfer on PYTHONPATH (the anchor's wheels) and a GPU with torch and triton.
"""
import itertools
import sys
import time

import flashinfer
import torch
from triton.testing import do_bench

from flashinfer_anchor import paged  # the anchor's page layout (pages in a seeded random order)

H, HKV, D, DT, DEV = 32, 8, 128, torch.bfloat16, torch.device("cuda")


def indptr_of(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEV)


def causal_flops(lens):
    return sum(4 * H * D * (n * (n + 1) // 2) for n in lens)


def row(kind):
    if kind == "ragged":
        lens = [1024] * 16
        q = torch.randn(sum(lens), H, D, dtype=DT, device=DEV)
        k = torch.randn(sum(lens), HKV, D, dtype=DT, device=DEV)
        v = torch.randn_like(k)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa3")
        w.plan(indptr_of(lens), indptr_of(lens), H, HKV, D, causal=True,
               q_data_type=DT, kv_data_type=DT)
        return (lambda: w.run(q, k, v)), causal_flops(lens)
    if kind in ("s8192", "full"):
        causal = kind == "s8192"
        q = torch.randn(8192, H, D, dtype=DT, device=DEV)
        k = torch.randn(8192, HKV, D, dtype=DT, device=DEV)
        v = torch.randn_like(k)
        flops = causal_flops([8192]) if causal else 4 * H * D * 8192 * 8192
        return (lambda: flashinfer.single_prefill_with_kv_cache(
            q, k, v, causal=causal, backend="fa3")), flops
    if kind == "paged_b4":
        lens, page = [8192] * 4, 16
        kv, page_indptr, indices, last = paged(lens, page)
        q = torch.randn(sum(lens), H, D, dtype=DT, device=DEV)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa3")
        w.plan(indptr_of(lens), page_indptr, indices, last, H, HKV, D, page, causal=True,
               q_data_type=DT, kv_data_type=DT)
        return (lambda: w.run(q, kv)), causal_flops(lens)
    raise SystemExit(f"unknown row {kind!r} (ragged, s8192, full or paged_b4)")


def main():
    kind = sys.argv[1] if len(sys.argv) > 1 else "ragged"
    f, flops = row(kind)
    t0 = time.time()
    f()
    torch.cuda.synchronize()
    print(f"first call {time.time() - t0:.1f} s", flush=True)
    ms = do_bench(f, warmup=25, rep=200, return_mode="median")
    print(f"{kind} fi-fa3 {ms:.4f} ms {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
