"""Where one block-sparse prefill attention call spends its time: torch.profiler over the selection and the kernel.

    .venv/bin/python benchmarks/prefill_kernel_profile.py --length 32k --share-len 256 --threads 1 \\
        --json benchmarks/results/prefill_kernel_profile_32k.json

ATTN-prefill's CPU shape and inputs (8 query heads / 2 KV heads / head dim 128, ``torch.randn`` with seed = length,
keep 0.25, ``lse``, ``dense_head`` 0, as ``compactlm bench prefill-attention``). One warm-up call, then
``--calls`` profiled calls of the selection and of the kernel; the table is the operators' self CPU time per
call, largest first, beside SDPA timed in the same process (``--sdpa``). CPU seconds from ``resource``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

from compactlm.attention.prefill_sparse import SparsePrefillConfig, select_blocks
from compactlm.cli.common import parse_lengths
from compactlm.kernels.block_prefill import block_attention
from compactlm.utils import machine_info, write_json_atomic


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", default="32k")
    p.add_argument("--share-len", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--impl", default="gather")
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--sdpa", type=int, default=1, help="SDPA calls timed beside (0 = none)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    (length,) = parse_lengths(args.length, minimum=128)
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(1, 8, length, 128, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 2, length, 128, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, 2, length, 128, generator=gen).to(torch.bfloat16)
    cfg = SparsePrefillConfig(share_len=args.share_len, block_size=args.block_size, dense_head=0, keep_ratio=0.25)
    timings: dict[str, list[float]] = {"select": [], "kernel": [], "sdpa": []}
    with torch.no_grad():
        block_attention(q, k, v, select_blocks(q, k, cfg), impl=args.impl)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                t0, c0 = time.perf_counter(), cpu_s()
                layout = select_blocks(q, k, cfg)
                t1, c1 = time.perf_counter(), cpu_s()
                block_attention(q, k, v, layout, impl=args.impl)
                t2, c2 = time.perf_counter(), cpu_s()
                timings["select"].append(c1 - c0)
                timings["kernel"].append(c2 - c1)
                print(f"select {1e3 * (t1 - t0):.0f} ms wall / {1e3 * (c1 - c0):.0f} ms CPU, kernel "
                      f"{1e3 * (t2 - t1):.0f} ms wall / {1e3 * (c2 - c1):.0f} ms CPU", flush=True)
        for _ in range(args.sdpa):
            c0 = cpu_s()
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            timings["sdpa"].append(cpu_s() - c0)
            print(f"SDPA {1e3 * timings['sdpa'][-1]:.0f} ms CPU", flush=True)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    rows = [{"op": e.key, "calls_per_call": e.count / args.calls,
             "self_ms_per_call": e.self_cpu_time_total / 1e3 / args.calls} for e in events]
    for r in rows:
        print(f"{r['self_ms_per_call']:9.1f} ms  x{r['calls_per_call']:7.1f}  {r['op']}")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "profile of one block-sparse prefill call (ATTN-prefill shape)",
            "command": " ".join([".venv/bin/python", *sys.argv]), "length": length, "config": cfg.to_dict(),
            "impl": args.impl, "cpu_seconds": timings, "block_fraction": layout.block_fraction(),
            "ops_by_self_cpu": rows,
            "machine": {**machine_info("bf16"), "load_average": os.getloadavg()},
            "notes": "profiler overhead included in the op times; CPU seconds from resource.getrusage"})


if __name__ == "__main__":
    main()
