"""SALS selection fidelity per layer on the default model, and attention mass at equal budget vs the baselines.

For the last ``--queries`` positions of ``--samples`` essay prompts (CALIB text, never the eval text), during a
dense prefill: overlap of latent top-k with true top-k, and the true attention mass (group mean) each method's
token set captures at the same budget (keep 1/8 of the context + 16 sink + 64 recent; Quest pages of 16):
SALS (latent scores), oracle (true scores), Quest (page bounds), StreamingLLM. A prefill-time proxy of decode
quality, used here because decode-time runs (PPL-decode, RULER-syn) did not fit the loaded machine.

    .venv/bin/python benchmarks/sals_profile.py --json benchmarks/results/sals_profile.json
"""

from __future__ import annotations

import argparse
import shlex
import sys

from compactlm.attention.profile import profile_overlap, propose_dense
from compactlm.attention.sals_calib import ensure_projections
from compactlm.cli.common import print_table
from compactlm.data import calibration_set
from compactlm.models import load
from compactlm.utils import machine_info, write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--ranks", default="0.25,0.125")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok = load("smollm2-135m", dtype=args.dtype)
    proj = ensure_projections(model, tok)
    calib = calibration_set(tok, "essays", nsamples=args.samples, seqlen=args.seqlen, seed=1)
    out = {}
    for rank in (float(r) for r in args.ranks.split(",")):
        prof = profile_overlap(model, calib, proj, rank=rank, keep=0.125, queries=args.queries)
        rows = [{"layer": p.layer, "overlap": p.overlap, "mass_vs_oracle_topk": p.mass,
                 **{f"mass_{k}": v for k, v in (p.budget_mass or {}).items()}} for p in prof]
        print(f"rank {rank}")
        print_table(rows)
        sparse = [r for r in rows if r["layer"] not in (0, 1, len(rows) - 1)]
        mean = {k: sum(r[k] for r in sparse) / len(sparse) for k in rows[0] if k != "layer"}
        print("mean over the default sparse layers (2..28):", mean)
        out[str(rank)] = {"layers": rows, "mean_sparse_layers": mean,
                          "proposed_dense_budget_mass_lt_0.9_of_oracle": propose_dense(prof, 0.9)}
    if args.json:
        write_json_atomic(args.json, {"model": "smollm2-135m", "dtype": args.dtype,
                                      "calib": f"essays, {args.samples} x {args.seqlen} tokens, seed 1",
                                      "queries_per_prompt": args.queries,
                                      "budget": "keep 1/8 + sink 16 + recent 64; Quest page 16", "results": out,
                                      "projections": proj.meta, "command": "python " + shlex.join(sys.argv),
                                      "machine": machine_info(args.dtype)})


if __name__ == "__main__":
    main()
