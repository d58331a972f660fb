"""Choose LLM-Barber's ``rebuild_ratio`` / ``group`` on held-out wiki windows (150-159: disjoint from PPL-wiki-512-q).

    python benchmarks/prune_ratio_sweep.py --calib-samples 8 --sparsity 0.5 wanda row:0.01 row:0.1 layer:0.1

Each config is ``wanda`` (the initial mask alone) or ``GROUP:RATIO`` for Barber(init=Wanda). One process, the
configs in turn; appends one JSON line per config to ``benchmarks/results/prune/ratio_sweep.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=None)
    p.add_argument("--pattern", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import compactlm
    from compactlm.data import calibration_set, eval_windows
    from compactlm.evaluation import nll_sum
    from compactlm.prune import Barber, Wanda
    from compactlm.utils import machine_info, set_quiet

    set_quiet(True)
    spec = {"pattern": args.pattern} if args.pattern else {"sparsity": args.sparsity or 0.5}
    _, tok = compactlm.models.load("smollm2-135m", dtype="fp32")
    calib = calibration_set(tok, "essays", nsamples=args.calib_samples, seqlen=512, seed=0)
    held_out = eval_windows(tok, "wiki", 512, 160)[150:160]
    out = ROOT / "results" / "prune" / "ratio_sweep.jsonl"
    for c in args.configs:
        model, _ = compactlm.models.load("smollm2-135m", dtype="fp32")
        if c == "wanda":
            config = Wanda(**spec)
        else:
            group, ratio = c.split(":")
            config = Barber(init=Wanda(**spec), rebuild_ratio=float(ratio), group=group)
        start, cpu = time.perf_counter(), time.process_time()
        report = compactlm.prune(model, config, calib=calib)
        record = {"config": config.to_dict(), "prune_seconds": time.perf_counter() - start,
                  "prune_cpu_seconds": time.process_time() - cpu}
        if isinstance(config, Barber):
            record["swaps"] = sum(sum(r["swaps"].values()) for r in report.layer_records)
            record["reverted_blocks"] = sum(len(r.get("reverted", [])) for r in report.layer_records)
        nll, n = 0.0, 0
        for ids in held_out.split(2):
            a, b = nll_sum(model, ids)
            nll, n = nll + a, n + b
        record.update(heldout_ppl=math.exp(nll / n), heldout="wiki windows 150-159 of 512 tokens", tokens=n,
                      calibration=f"CALIB-pg-512 (first {args.calib_samples} of 128 sequences)",
                      command="python " + " ".join(shlex.quote(a) for a in sys.argv),
                      machine={**machine_info("fp32"), "load_average": os.getloadavg()})
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:  # one line per finished config: a killed sweep keeps what it measured
            f.write(json.dumps(record) + "\n")
        print(c, f"held-out PPL {record['heldout_ppl']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
