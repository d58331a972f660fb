"""Two parts of the compiled SALS step in isolation: scored_topk vs GEMM + pooled_topk, and attend_chosen's gathers.

ATTN-decode shapes (32 q / 8 KV heads, d 128, bf16, r* 128, 32K tokens, keep L/8 + 80), one thread; every timed call
follows a dense grouped step (caches cold, as in the bench's round-robin); thread CPU ms, medians over the rounds
after 2 warm-up rounds. attend_chosen is timed at several prefetch distances (rows ahead into L1, L2). Run once
plainly and once with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch puts large allocations on transparent huge pages): the
JSON records which.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/attn_decode/scoring_and_gather_check.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import torch


def main() -> int:
    from compactlm.cli.bench_decode import huge_page_state
    from compactlm.kernels import sparse_decode_cpu as cpu
    from compactlm.kernels.sparse_decode import dense_grouped_decode

    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=14)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    length, n = args.length, args.length // 8 + 80
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, length, 128, generator=g).bfloat16()
    cols = torch.randn(1, 32, 128, generator=g).bfloat16()
    q = torch.randn(1, 32, 1, 128, generator=g).bfloat16()
    k = torch.randn(1, 8, length, 128, generator=g).bfloat16()
    v = torch.randn(1, 8, length, 128, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(length, generator=g)[:n].sort().values for _ in range(8)])[None]
    scores = torch.empty(1, length, 32, dtype=torch.bfloat16)
    qg = q.view(1, 8, 4, 128)

    def gemm_then_pooled():
        torch.mm(z[0], cols[0].t(), out=scores[0])
        return cpu.pooled_topk(scores, 8, n, sink_slots=16, recent_slots=64)

    parts = {"scored_topk": lambda: cpu.scored_topk(z, cols, 8, n, sink_slots=16, recent_slots=64),
             "GEMM + pooled_topk": gemm_then_pooled}
    for near, far in [(2, 16), (4, 32), (4, 64), (8, 64), (4, 128), (8, 128), (16, 128)]:
        parts[f"attend_chosen prefetch {near}/{far}"] = (
            lambda near=near, far=far: cpu.attend_chosen(qg, k, v, idx, 0.1, prefetch=near, prefetch_l2=far))
    times: dict[str, list[float]] = {name: [] for name in parts}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, fn in parts.items():
            dense_grouped_decode(q, k, v, 0.1)
            t0 = time.thread_time()
            fn()
            times[name].append(1e3 * (time.thread_time() - t0))
    ms = {name: statistics.median(ts[2:]) for name, ts in times.items()}
    for name, t in ms.items():
        print(f"{name:34s} {t:7.3f} ms")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(args.json, "w") as f:
        json.dump({"command": "OMP_NUM_THREADS=1 .venv/bin/python " + shlex.join(sys.argv),
                   "what": "thread CPU ms, median, each call right after a dense grouped decode step",
                   "length": length, "chosen_rows_per_head": n, "ms": ms, "huge_pages": huge_page_state(),
                   "git_commit": commit, "torch": torch.__version__, "cpu": "AMD EPYC, 2 cores, 1 thread",
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "loadavg_before": load_before, "loadavg_after": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
