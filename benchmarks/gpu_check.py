"""One prepared GPU run: check the Triton kernels against their references on CUDA, then time them (ATTN-*).

Written to be run once when a session is lent a GPU (the device tool gives minutes, not hours), so it checks first
and times second, writes one JSON, and keeps every size small enough to finish in ~5 minutes on an H100/H200:

1. correctness on CUDA (bf16 and fp32): the SALS decode kernel (:mod:`compactlm.kernels.sparse_decode_triton`,
   compressed and index mode) against :func:`~compactlm.kernels.reference.sals_decode_reference`, and the
   block-sparse prefill kernel against :func:`~compactlm.kernels.block_prefill.block_attention_reference`;
2. ATTN-decode at GPU shapes (32 query / 8 KV heads, head dim 128, batch 1) for 4K-64K: SALS compressed and index
   (keep 1/8 + 16 sink + 64 recent, r = 25 %) against SDPA (FlashAttention backend where available), CUDA-event
   timing, median of 50 after warm-up;
3. ATTN-prefill at GPU shapes for 4K-32K, keep 25 %: the Triton block-sparse kernel against causal SDPA.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu/gpu_check_h200.json

Without CUDA it exits with a clear message (use the TRITON_INTERPRET tests in tests/kernels on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _cuda_ms(fn, warmup: int = 10, repeat: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_decode(dtype: torch.dtype) -> list[dict]:
    from compactlm.kernels.reference import sals_decode_reference
    from compactlm.kernels.sparse_decode import SelectParams, sals_decode

    rows = []
    g = torch.Generator().manual_seed(0)
    for mode in ("compressed", "index"):
        b, h, hkv, d, length, r = 2, 32, 8, 128, 3000, 256
        q = torch.randn(b, h, 1, d, generator=g)
        latent = torch.randn(b, length, r, generator=g)
        values = torch.randn(b, hkv, length, d, generator=g)
        proj = torch.linalg.qr(torch.randn(hkv * d, r, generator=g))[0].reshape(hkv, d, r)
        pos = torch.arange(length).expand(b, length).to(torch.int32)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
        ang = torch.arange(length + 1).double()[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        ct, st = ang.cos().float(), ang.sin().float()
        qc, qs = ct[-1:][None], st[-1:][None]
        keys = torch.randn(b, hkv, length, d, generator=g) if mode == "index" else None
        p = SelectParams(k=length // 8, sink=16, recent=64)
        ref, _ = sals_decode_reference(q.double(), qc.double(), qs.double(), latent.double(), values.double(), pos,
                                       proj.double(), r // 2, ct.double(), st.double(), p, d ** -0.5,
                                       keys=None if keys is None else keys.double())
        dev = [t.cuda().to(dtype) if t.is_floating_point() else t.cuda() for t in (q, qc, qs, latent, values, pos,
                                                                                    proj, ct, st)]
        kd = None if keys is None else keys.cuda().to(dtype)
        out, _ = sals_decode(dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], dev[6], r // 2, dev[7], dev[8], p,
                             d ** -0.5, keys=kd, impl="triton")
        torch_out, _ = sals_decode(dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], dev[6], r // 2, dev[7], dev[8], p,
                                   d ** -0.5, keys=kd, impl="torch")
        rows.append({"check": f"sals-decode-{mode}", "dtype": str(dtype),
                     "max_vs_reference": (out.double().cpu() - ref).abs().max().item(),
                     "max_vs_torch_path": (out.double() - torch_out.double()).abs().max().item()})
    return rows


def check_prefill(dtype: torch.dtype) -> list[dict]:
    from compactlm.attention.prefill_sparse import SparsePrefillConfig, select_blocks
    from compactlm.kernels.block_prefill import block_attention, block_attention_reference

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 2048, 128, generator=g).cuda().to(dtype)
    k = torch.randn(1, 2, 2048, 128, generator=g).cuda().to(dtype)
    v = torch.randn(1, 2, 2048, 128, generator=g).cuda().to(dtype)
    layout = select_blocks(q, k, SparsePrefillConfig())
    out = block_attention(q, k, v, layout, impl="triton")
    ref = block_attention_reference(q.float(), k.float(), v.float(), layout)
    return [{"check": "block-prefill", "dtype": str(dtype), "max_vs_reference": (out.float() - ref).abs().max().item()}]


def time_decode(lengths: list[int]) -> list[dict]:
    return [row for length in lengths for row in _decode_rows(length)]


def _decode_rows(length: int) -> list[dict]:
    from compactlm.kernels.sparse_decode import SelectParams, sals_decode

    rows = []
    heads, hkv, d, r = 32, 8, 128, 256
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(length)
    q = torch.randn(1, heads, 1, d, device="cuda", generator=g, dtype=dt)
    k = torch.randn(1, hkv, length, d, device="cuda", generator=g, dtype=dt)
    v = torch.randn(1, hkv, length, d, device="cuda", generator=g, dtype=dt)
    latent = torch.randn(1, length, r, device="cuda", generator=g, dtype=dt)
    proj = torch.linalg.qr(torch.randn(hkv * d, r, device="cuda", generator=g))[0].reshape(hkv, d, r).to(dt)
    pos = torch.arange(length, device="cuda", dtype=torch.int32)[None]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    ang = torch.arange(length + 1, device="cuda").float()[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    ct, st = ang.cos().to(dt), ang.sin().to(dt)
    qc, qs = ct[-1:][None], st[-1:][None]
    p = SelectParams(k=length // 8, sink=16, recent=64)
    dense = _cuda_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    for name, keys in (("sals-triton", None), ("sals-index-triton", k)):
        ms = _cuda_ms(lambda keys=keys: sals_decode(q, qc, qs, latent, v, pos, proj, r // 2, ct, st, p,
                                                    d ** -0.5, keys=keys, impl="triton"))
        rows.append({"method": name, "length": length, "ms": ms, "dense_ms": dense, "dense_impl": "sdpa",
                     "ratio": dense / ms})
    return rows


def time_prefill(lengths: list[int]) -> list[dict]:
    return [_prefill_row(length) for length in lengths]


def _prefill_row(length: int) -> dict:
    from compactlm.attention.prefill_sparse import SparsePrefillConfig, select_blocks
    from compactlm.kernels.block_prefill import block_attention

    g = torch.Generator(device="cuda").manual_seed(length)
    q, k, v = (torch.randn(1, hh, length, 128, device="cuda", generator=g, dtype=torch.bfloat16)
               for hh in (32, 8, 8))
    cfg = SparsePrefillConfig()
    dense = _cuda_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True), repeat=20)
    layout = select_blocks(q, k, cfg)
    kernel = _cuda_ms(lambda: block_attention(q, k, v, layout, impl="triton"), repeat=20)
    total = _cuda_ms(lambda: block_attention(q, k, v, select_blocks(q, k, cfg), impl="triton"), repeat=20)
    return {"method": "block-sparse-triton", "length": length, "kernel_ms": kernel, "with_select_ms": total,
            "dense_ms": dense, "dense_impl": "sdpa", "ratio": dense / total, "block_fraction": layout.block_fraction()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--decode-lengths", default="4096,16384,32768,65536")
    p.add_argument("--prefill-lengths", default="4096,8192,16384,32768")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device; on CPU run the TRITON_INTERPRET tests in tests/kernels",
              file=sys.stderr)
        return 2
    from compactlm.utils import write_json_atomic

    started = time.time()
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["checks"] = check_decode(torch.float32) + check_decode(torch.bfloat16) + check_prefill(torch.bfloat16)
    print(json.dumps(result["checks"], indent=1), flush=True)
    write_json_atomic(args.json, result)  # keep the checks even if timing dies
    result["attn_decode"] = time_decode([int(x) for x in args.decode_lengths.split(",")])
    write_json_atomic(args.json, result)
    result["attn_prefill"] = time_prefill([int(x) for x in args.prefill_lengths.split(",")])
    result["seconds"] = time.time() - started
    write_json_atomic(args.json, result)
    print(json.dumps({k: result[k] for k in ("attn_decode", "attn_prefill")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
