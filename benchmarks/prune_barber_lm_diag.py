"""Diagnose Barber(objective="lm")'s step: held-out vs training loss of global swap fractions, with and without a
noise margin on the first-order gain (z standard errors of the per-sequence gradient mean), on the default model
after Wanda 50 %.

    python benchmarks/prune_barber_lm_diag.py --train 8 --heldout 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=8)
    p.add_argument("--heldout", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--z", default="0,2,4")
    p.add_argument("--ratios", default="0.0003,0.001,0.003")
    p.add_argument("--out", default=str(ROOT / "results" / "prune" / "barber_lm_diag_wanda_50pct.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import compactlm
    from compactlm.data import calibration_set
    from compactlm.prune import Wanda
    from compactlm.prune.barber_lm import LMRebuild, RecordRun
    from compactlm.prune.common import execute
    from compactlm.prune.lm_statistics import lm_loss, lm_statistics
    from compactlm.utils import machine_info, set_quiet, write_json_atomic

    set_quiet(True)
    load_start = os.getloadavg()
    cpu0 = time.process_time()
    model, tok = compactlm.models.load("smollm2-135m", dtype="fp32")
    calib = calibration_set(tok, "essays", nsamples=40, seqlen=512, seed=0)
    train, held = calib[:args.train], calib[32:32 + args.heldout]
    run = RecordRun(Wanda(sparsity=0.5))
    execute(model, Wanda(sparsity=0.5), run, calib[:32], None)
    named = dict(model.named_modules())
    modules = {n: named[n] for n in run.all_masks}
    grad, curv, train_loss, noise = lm_statistics(model, {n: m.weight for n, m in modules.items()}, train,
                                                  with_noise=True)
    base = {"train": lm_loss(model, train), "heldout": lm_loss(model, held)}
    rows = []
    for z in (float(v) for v in args.z.split(",")):
        rb = LMRebuild(modules, run.all_dense, run.all_masks)
        ratios = [float(r) for r in args.ratios.split(",")]
        # score folds the margin into the G it is given and empties noise (barber_lm.fold_margin): fresh copies per z
        prof = rb.score({n: g.clone() for n, g in grad.items()}, curv, "row", None, max(ratios),
                        noise={n: s.clone() for n, s in noise.items()}, z=z)
        for ratio in ratios:
            swaps, log = rb.apply(ratio)
            pred = float(rb.best[:int(ratio * prof)].sum()) if prof else 0.0
            rec = {"z": z, "ratio": ratio, "profitable": prof, "swaps": swaps, "predicted_gain": pred,
                   "train": lm_loss(model, train) - base["train"], "heldout": lm_loss(model, held) - base["heldout"]}
            by = {}
            for n, _, d, _ in log:
                key = n.split(".")[-1]
                by[key] = by.get(key, 0) + int(d[0].numel())
            rec["swaps_by_kind"] = by
            rb.undo(log)
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    write_json_atomic(Path(args.out), {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "base": base, "train_loss": train_loss,
        "rows": rows, "cpu_seconds": time.process_time() - cpu0, "threads": args.threads,
        "machine": machine_info("fp32"), "load_average": {"start": load_start, "end": os.getloadavg()},
        "note": "losses are changes vs the Wanda 50 % mask (nats); train = the gradient sequences, heldout = "
                "CALIB-pg-512 sequences 32.."})
    return 0


if __name__ == "__main__":
    sys.exit(main())
