"""Where a SALS `index` decode step spends its time: thread CPU ms per part, tensor path vs impl="cpu".

ATTN-decode shapes (32 q / 8 KV heads, d 128, bf16, batch 1, keep L/8 + 16 sink + 64 recent, r = 256, r* = 128).
Each round calls dense grouped attention first (so every part starts from caches the way a real step does, as in
the bench's round-robin), then the parts of each path in order, each timed with ``time.thread_time``; medians
over the rounds after 3 warm-up rounds. The parts re-implement ``sals_decode``'s two paths step by step with
the same functions; the whole call is timed too, so the sum of parts can be checked against it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/attn_decode/profile_parts.py --json OUT.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import torch


def pool_chain(scores: torch.Tensor, gq: int, hkv: int, bufs) -> torch.Tensor:
    """Max over the G query heads of each KV head with torch maxima (sals_select_cpu's path where the C++ cannot)."""
    if gq == 1:
        return scores
    b, length = scores.shape[:2]
    s4, out = scores.view(b, length, gq, hkv), bufs.get("p", (b, length, hkv), scores.dtype, scores.device)
    torch.maximum(s4[:, :, 0], s4[:, :, 1], out=out)
    for j in range(2, gq):
        torch.maximum(out, s4[:, :, j], out=out)
    return out


def profile(length: int, pool: str, rounds: int) -> dict[str, float]:
    from compactlm.attention.selection import topk_tokens
    from compactlm.cli.bench_decode import _case
    from compactlm.kernels import sparse_decode_cpu as cpu
    from compactlm.kernels.sparse_decode import (
        DecodeBuffers,
        chosen_attention,
        dense_grouped_decode,
        gather_heads,
        latent_queries,
        pooled_latent_scores,
        sals_decode,
        unrope,
    )

    c = _case(length, torch.bfloat16, 32, 8, 128, 0.25, seed=0)
    q, k, v, proj, lat, pos = c["q"], c["k"], c["v"], c["proj"], c["latent"], c["pos"]
    b, h, _, d = q.shape
    hkv, g, rs = 8, 4, c["r_star"]
    p = dataclasses.replace(c["params"], pool=pool)
    qc, qs = c["cos"][-1:][None], c["sin"][-1:][None]
    sc = d ** -0.5
    ps, zs = proj[:, :, :rs].contiguous(), lat[:, :, :rs]  # sals_decode keeps this copy per layer (derived)
    n = p.k + p.sink + p.recent
    parts: dict[str, list[float]] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.thread_time()
        out = fn(*args, **kwargs)
        parts.setdefault(name, []).append(1e3 * (time.thread_time() - t0))
        return out

    bufs, bufs_t = DecodeBuffers(), DecodeBuffers()
    kbuf = torch.empty(b, hkv, n, d, dtype=k.dtype)
    for _ in range(rounds + 3):
        timed("dense grouped (whole step)", dense_grouped_decode, q, k, v, sc)
        q_g = q.view(b, hkv, g, d)
        q_pre = timed("torch: unrope query", unrope, q_g, qc[:, None], qs[:, None])
        # tensor path (impl="torch")
        pooled = timed("torch: latent scores + pooling", pooled_latent_scores, q_pre, ps, zs, pool, sc)
        idx_t = timed("torch: topk_tokens", topk_tokens, pooled, p.k, p.sink, p.recent, pos, None)
        k_sel = timed("torch: gather chosen keys", gather_heads, k, idx_t, kbuf)
        timed("torch: q.k, softmax, p.V (embedding_bag)", chosen_attention, q_g, k_sel, v, idx_t, sc)
        # compiled path (impl="cpu")
        timed("(torch latent queries, for comparison; not used)", latent_queries, q_pre, ps, pool == "mean")
        cols = timed("cpu: unrope + latent queries (C++)", cpu.latent_queries, q_g, qc, qs, ps, pool == "mean")
        gq = cols.shape[1] // hkv
        scores = bufs.get("s", (b, length, gq * hkv), zs.dtype, zs.device)
        timed("cpu: scoring GEMM (into a reused buffer)", torch.mm, zs[0], cols[0].t(), out=scores[0])
        # bf16 with 16 % H_kv == 0 and G <= 4: the C++ pools; no padding: sink/recent as slot ranges (as
        # sals_select_cpu does)
        idx_c = timed("cpu: pooled_topk incl. pooling (C++)", cpu.pooled_topk, scores, hkv, n, sink_slots=p.sink,
                      recent_slots=p.recent)
        if cpu.fused_scoring_applies(zs, hkv, cols.shape[1]):  # what sals_select_cpu runs instead of the two above
            idx_c = timed("cpu: scored_topk, instead of GEMM + pooled_topk (C++)", cpu.scored_topk, zs, cols, hkv, n,
                          sink_slots=p.sink, recent_slots=p.recent)
        timed("cpu: attend_chosen (C++)", cpu.attend_chosen, q_g, k, v, idx_c, sc)
        timed("(torch maxima chain, for comparison; not used)", pool_chain, scores, gq, hkv, bufs)
        step = (q, qc, qs, lat, v, pos, proj, rs, c["cos"], c["sin"], p, sc)
        timed("whole sals_decode impl=torch", sals_decode, *step, keys=k, buffers=bufs_t, impl="torch")
        timed("whole sals_decode impl=cpu", sals_decode, *step, keys=k, buffers=bufs, impl="cpu")
    return {name: statistics.median(ts[3:]) for name, ts in parts.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,65536")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = []
    for length in (int(x) for x in args.lengths.split(",")):
        for pool in ("max", "mean"):
            ms = profile(length, pool, args.rounds)
            results.append({"length": length, "pool": pool, "cpu_ms": ms})
            print(f"L={length} pool={pool}")
            for name, t in ms.items():
                print(f"  {name:44s} {t:8.3f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(args.json, "w") as f:
        json.dump({"command": "OMP_NUM_THREADS=1 .venv/bin/python " + shlex.join(sys.argv),
                   "what": "thread CPU ms per part of one SALS index decode step, median of rounds, round-robin "
                           "after a dense step (ATTN-decode shapes, bf16, keep L/8 + 16 + 64)",
                   "git_commit": commit, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "cpu": "AMD EPYC, 2 cores", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
