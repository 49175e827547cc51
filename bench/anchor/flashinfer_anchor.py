"""Anchor numbers for the standard benchmark configurations (see BENCHMARKS.md, "What is measured").

Runs FlashInfer (flashinfer-python 0.5.3, JIT) and PyTorch SDPA on the GPU machine over the same
configurations that the project's own benchmark reports, and writes one JSON object:
    {"<config key>@<impl>": {"value": float, "unit": "GB/s" | "TFLOP/s", "ms": float}, ...}
plus "copy@torch" (device-to-device copy bandwidth) and "gemm@torch" (bf16 8192^3 matmul).

Usage on the GPU machine (python3 there has torch and triton):
    [ANCHOR_WARM_MS=1500] [ANCHOR_TIME_MS=200] [ANCHOR_PREFILL_BACKENDS=fa3] \
        python3 flashinfer_anchor.py OUT.json [substring filter, comma-separated]
ANCHOR_ONLY_FLASHINFER=1 leaves out the torch rows (ceilings, SDPA). The filter "ops" runs only
the serving-ops rows (norms, activation, RoPE, KV append, sampling).
FlashInfer itself is optional: without it only the torch rows are written.
"""
import json
import os
import sys
import time
import traceback

import torch
from triton.testing import do_bench

H, HKV, D = 32, 8, 128
DT = torch.bfloat16
DEV = torch.device("cuda")
OUT = sys.argv[1] if len(sys.argv) > 1 else "anchor.json"
FILTER = sys.argv[2] if len(sys.argv) > 2 else ""
res = {}


def selects(key):
    """whether the filter (comma-separated; substrings, or =KEY for one key) takes this key"""
    return any(key == f[1:] if f.startswith("=") else f in key for f in FILTER.split(","))


def log(*a):
    print(*a, flush=True)


# Milliseconds each row runs untimed before do_bench (as ferrinfer-bench's --warm-ms; 0 by
# default), and do_bench's rep (200 by default, as ferrinfer-bench's --time-ms). An H200 at its
# 700 W cap boosts for about the first 100 ms of a dense kernel and then settles lower, so without
# a warm-up a row after the JIT's idle times mostly the boost.
WARM_MS = float(os.environ.get("ANCHOR_WARM_MS", "0"))
TIME_MS = int(os.environ.get("ANCHOR_TIME_MS", "200"))
_flush = None
# FlashInfer's prefill templates to time ("fa2,fa3" by default; each costs a JIT compile a module).
PREFILL_BACKENDS = os.environ.get("ANCHOR_PREFILL_BACKENDS", "fa2,fa3").split(",")


def bench_ms(fn):
    global _flush
    fn()
    torch.cuda.synchronize()
    if WARM_MS > 0:
        if _flush is None:
            _flush = torch.empty(256 << 20, dtype=torch.int8, device=DEV)
        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1e3 < WARM_MS:
            for _ in range(8):
                _flush.zero_()
                fn()
            torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=TIME_MS, return_mode="median")


def put(key, value, unit, ms):
    res[key] = {"value": value, "unit": unit, "ms": ms}
    log(f"{key:60s} {value:9.1f} {unit:8s} {ms:8.3f} ms")


# ---- the standard configurations -------------------------------------------------------------
def skew_lengths(b):
    """every 16th request is long (8192), the rest short (512): a skewed batch"""
    return [8192 if i % 16 == 0 else 512 for i in range(b)]


DECODE = {  # key: (kv lengths per request, page size, logits soft cap or 0)
    "decode_b64_l4096_p16": ([4096] * 64, 16, 0.0),
    "decode_b16_l32768_p16": ([32768] * 16, 16, 0.0),
    "decode_b128_l1024_p1": ([1024] * 128, 1, 0.0),
    "decode_b256_l2048_p16": ([2048] * 256, 16, 0.0),
    "decode_skew_b64_p16": (skew_lengths(64), 16, 0.0),
    "decode_b64_l4096_p16_softcap30": ([4096] * 64, 16, 30.0),
}
PREFILL = {  # key: (kind, qo lengths, kv lengths, page size, causal, soft cap)
    "prefill_single_s8192_causal": ("single", [8192], [8192], 0, True, 0.0),
    "prefill_single_s8192_full": ("single", [8192], [8192], 0, False, 0.0),
    "prefill_single_s8192_causal_softcap30": ("single", [8192], [8192], 0, True, 30.0),
    "prefill_ragged_b16_l1024_causal": ("ragged", [1024] * 16, [1024] * 16, 0, True, 0.0),
    "prefill_paged_b16_l1024_p16_causal": ("paged", [1024] * 16, [1024] * 16, 16, True, 0.0),
    "prefill_paged_b4_l8192_p16_causal": ("paged", [8192] * 4, [8192] * 4, 16, True, 0.0),
    "append_paged_b16_q256_kv4096_p16_causal": ("paged", [256] * 16, [4096] * 16, 16, True, 0.0),
}


DECODE_GROUPS = {  # key: (query heads, KV heads), 64 requests x 4096 tokens, page 16
    "decode_mha_b64_l4096_p16": (32, 32),
    "decode_gqa2_b64_l4096_p16": (32, 16),
    "decode_gqa8_b64_l4096_p16": (64, 8),
}


def decode_configs():
    """(key, (kv lengths, page, soft cap, query heads, KV heads)) of every decode configuration."""
    for key, (lens, page, cap) in DECODE.items():
        yield key, (lens, page, cap, H, HKV)
    for key, (hq, hk) in DECODE_GROUPS.items():
        yield key, ([4096] * 64, 16, 0.0, hq, hk)


def decode_bytes(lens, hq=H, hk=HKV, elt=2):
    return sum(lens) * hk * D * 2 * elt + 2 * len(lens) * hq * D * elt


def prefill_flops(qo, kv, causal):
    pairs = 0
    for q, k in zip(qo, kv):
        pairs += q * k - (q * (q - 1) // 2 if causal else 0)
    return 4 * H * D * pairs


def paged(lens, page, hk=HKV):
    npages = [(l + page - 1) // page for l in lens]
    total = sum(npages)
    g = torch.Generator(device="cpu").manual_seed(0)
    indices = torch.randperm(total, generator=g).to(torch.int32)
    indptr = torch.tensor([0] + list(torch.tensor(npages).cumsum(0)), dtype=torch.int32)
    last = torch.tensor([(l - 1) % page + 1 for l in lens], dtype=torch.int32)
    kv = torch.randn(total, 2, page, hk, D, dtype=DT, device=DEV)
    return kv, indptr.to(DEV), indices.to(DEV), last.to(DEV)


def indptr_of(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)


def ceilings():
    x = torch.empty(1024**3, dtype=DT, device=DEV).normal_()
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    put("copy@torch", 2 * x.numel() * 2 / ms / 1e6, "GB/s", ms)
    ms = bench_ms(lambda: x.sum(dtype=torch.float32))
    put("read@torch", x.numel() * 2 / ms / 1e6, "GB/s", ms)
    del x, y
    a = torch.randn(8192, 8192, dtype=DT, device=DEV)
    b = torch.randn_like(a)
    ms = bench_ms(lambda: a @ b)
    put("gemm@torch", 2 * 8192**3 / ms / 1e9, "TFLOP/s", ms)


def sdpa_rows():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for key, (kind, qo, kv, _, causal, cap) in PREFILL.items():
        if kind != "single" or cap or not selects(key):
            continue
        s = qo[0]
        q = torch.randn(1, H, s, D, dtype=DT, device=DEV)
        k = torch.randn(1, HKV, s, D, dtype=DT, device=DEV)
        v = torch.randn_like(k)
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("torch-fa2", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    f = lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=causal, enable_gqa=True)
                    ms = bench_ms(f)
                put(f"{key}@{name}", prefill_flops(qo, kv, causal) / ms / 1e9, "TFLOP/s", ms)
            except Exception as e:  # a backend may refuse GQA
                log(key, name, "failed:", repr(e)[:160])


def flashinfer_rows():
    import flashinfer
    log("flashinfer", flashinfer.__version__)
    ws = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=DEV)
    # Both of FlashInfer's decode paths: the default (CUDA cores, "@fi") and use_tensor_cores=True
    # ("@fi-tc", what serving engines enable for grouped heads). The best of the two is the anchor.
    for key, (lens, page, cap, hq, hk) in decode_configs():
        if not selects(key):
            continue
        kv, indptr, indices, last = paged(lens, page, hk)
        q = torch.randn(len(lens), hq, D, dtype=DT, device=DEV)
        for tc in (False, True):
            try:
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
                w.plan(indptr, indices, last, hq, hk, D, page, q_data_type=DT, kv_data_type=DT,
                       logits_soft_cap=cap or None)
                ms = bench_ms(lambda: w.run(q, kv))
                put(f"{key}@fi{'-tc' if tc else ''}", decode_bytes(lens, hq, hk) / ms / 1e6, "GB/s", ms)
            except Exception as e:
                log(key, "tc" if tc else "cc", "failed:", repr(e)[:300])
                traceback.print_exc()
        del kv
    for key, (kind, qo, kvl, page, causal, cap) in PREFILL.items():
        if not selects(key):
            continue
        for backend in PREFILL_BACKENDS:
            try:
                t0 = time.time()
                if kind == "single":
                    q = torch.randn(qo[0], H, D, dtype=DT, device=DEV)
                    k = torch.randn(kvl[0], HKV, D, dtype=DT, device=DEV)
                    v = torch.randn_like(k)
                    f = lambda: flashinfer.single_prefill_with_kv_cache(
                        q, k, v, causal=causal, backend=backend, logits_soft_cap=cap or None)
                elif kind == "ragged":
                    q = torch.randn(sum(qo), H, D, dtype=DT, device=DEV)
                    k = torch.randn(sum(kvl), HKV, D, dtype=DT, device=DEV)
                    v = torch.randn_like(k)
                    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
                    w.plan(indptr_of(qo), indptr_of(kvl), H, HKV, D, causal=causal,
                           q_data_type=DT, kv_data_type=DT, logits_soft_cap=cap or None)
                    f = lambda: w.run(q, k, v)
                else:
                    kv, indptr, indices, last = paged(kvl, page)
                    q = torch.randn(sum(qo), H, D, dtype=DT, device=DEV)
                    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
                    w.plan(indptr_of(qo), indptr, indices, last, H, HKV, D, page, causal=causal,
                           q_data_type=DT, kv_data_type=DT, logits_soft_cap=cap or None)
                    f = lambda: w.run(q, kv)
                f()
                torch.cuda.synchronize()
                log(f"  (first call of {key}@fi-{backend}: {time.time() - t0:.1f} s, JIT included)")
                ms = bench_ms(f)
                put(f"{key}@fi-{backend}", prefill_flops(qo, kvl, causal) / ms / 1e9, "TFLOP/s", ms)
            except Exception as e:
                log(key, backend, "failed:", repr(e)[:300])


# ---- serving ops: memory-bound, reported as GB/s of bytes read + written (higher is better) ----
T, HID, INTER, VOCAB = 2048, 8192, 14336, 128256
OPS = [  # key, bytes
    ("rmsnorm_t2048_h8192", 2 * T * HID * 2 + HID * 2),
    ("fused_add_rmsnorm_t2048_h8192", 4 * T * HID * 2 + HID * 2),
    ("silu_and_mul_t2048_i14336", 3 * T * INTER * 2),
    ("rope_llama31_t4096_h32x8_d128", 2 * 4096 * (H + HKV) * D * 2),
    ("append_kv_decode_b256_l2048_p16", 2 * 256 * HKV * D * 2 * 2),
    ("append_kv_prefill_b16_l1024_p16", 2 * 16 * 1024 * HKV * D * 2 * 2),
    ("sample_top_k_top_p_logits_b128_v128256", 128 * VOCAB * 4),
    ("sample_top_p_probs_b128_v128256", 128 * VOCAB * 4),
    ("sample_min_p_probs_b128_v128256", 128 * VOCAB * 4),
    ("sample_top_k_probs_b128_v128256", 128 * VOCAB * 4),
    ("chain_speculative_b64_n4_v128256", 64 * 9 * VOCAB * 4),
]


def ops_rows():
    import flashinfer
    g = torch.Generator(device=DEV).manual_seed(0)
    for key, nbytes in OPS:
        if FILTER not in ("", "ops") and not selects(key):
            continue
        try:
            f = op_fn(flashinfer, key, g)
            t0 = time.time()
            f()
            torch.cuda.synchronize()
            log(f"  (first call of {key}@fi: {time.time() - t0:.1f} s, JIT included)")
            ms = bench_ms(f)
            put(f"{key}@fi", nbytes / ms / 1e6, "GB/s", ms)
        except Exception as e:
            log(key, "failed:", repr(e)[:300])


def op_fn(fi, key, g):
    """The FlashInfer call of one ops configuration (inputs made here, outside the timing)."""
    rn = lambda *shape: torch.randn(*shape, dtype=DT, device=DEV, generator=g)
    if key.startswith("rmsnorm"):
        x, w = rn(T, HID), rn(HID)
        return lambda: fi.norm.rmsnorm(x, w, 1e-6)
    if key.startswith("fused_add_rmsnorm"):
        x, r, w = rn(T, HID), rn(T, HID), rn(HID)
        return lambda: fi.norm.fused_add_rmsnorm(x, r, w, 1e-6)
    if key.startswith("silu_and_mul"):
        x = rn(T, 2 * INTER)
        return lambda: fi.activation.silu_and_mul(x)
    if key.startswith("rope_llama31"):
        q, k = rn(4096, H, D), rn(4096, HKV, D)
        pos = torch.arange(4096, dtype=torch.int32, device=DEV)
        return lambda: fi.rope.apply_llama31_rope_pos_ids_inplace(q, k, pos)
    if key.startswith("append_kv"):
        b, l = (256, 2048) if "decode" in key else (16, 1024)
        new = 1 if "decode" in key else l
        lens = [l] * b
        kv, indptr, indices, last = paged(lens, 16)
        k_new, v_new = rn(b * new, HKV, D), rn(b * new, HKV, D)
        append_indptr = torch.arange(0, b * new + 1, new, dtype=torch.int32, device=DEV)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        bi, pos = fi.page.get_batch_indices_positions(append_indptr, seq_lens, b * new)
        return lambda: fi.page.append_paged_kv_cache(k_new, v_new, bi, pos, kv, indices, indptr, last, "NHD")
    logits = torch.randn(128, VOCAB, device=DEV, generator=g) * 2
    probs = torch.softmax(logits, -1)
    s = fi.sampling
    if key.startswith("sample_top_k_top_p_logits"):
        return lambda: s.top_k_top_p_sampling_from_logits(logits, 50, 0.9)
    if key.startswith("sample_top_p_probs"):
        return lambda: s.top_p_sampling_from_probs(probs, 0.9)
    if key.startswith("sample_min_p_probs"):
        return lambda: s.min_p_sampling_from_probs(probs, 0.05)
    if key.startswith("sample_top_k_probs"):
        return lambda: s.top_k_sampling_from_probs(probs, 50)
    if key.startswith("chain_speculative"):
        draft = torch.softmax(torch.randn(64, 4, VOCAB, device=DEV, generator=g) * 2, -1)
        target = torch.softmax(torch.randn(64, 5, VOCAB, device=DEV, generator=g) * 2, -1)
        ids = torch.multinomial(draft.view(-1, VOCAB), 1).view(64, 4).to(torch.int32)
        return lambda: s.chain_speculative_sampling(draft, ids, target)
    raise KeyError(key)


if __name__ == "__main__":
    torch.manual_seed(0)
    log("device", torch.cuda.get_device_name(0))
    if os.environ.get("ANCHOR_ONLY_FLASHINFER", "0") != "1":
        ceilings()
        sdpa_rows()
    try:
        if FILTER != "ops":
            flashinfer_rows()
        ops_rows()
    except ImportError as e:
        log("flashinfer not importable, torch rows only:", e)
    with open(OUT, "w") as fh:
        json.dump(res, fh, indent=1, sort_keys=True)
    log("wrote", OUT)
