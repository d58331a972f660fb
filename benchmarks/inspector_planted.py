"""Planted-fault recall of the precision inspector on the default model.

Each plant damages ONE random decoder linear of a copy of the default model (fp32) and leaves the rest
as is (``--background none``, the issue's protocol) or RTN-quantized (``--background w4``: every other
decoder linear fake-quantized to 4-bit g64 asym, so the plant must stand out among 210 differing
operators). Faults alternate between

- ``rtn2``: the linear's weight fake-quantized to 2 bits (asymmetric round-to-nearest, groups of 64);
- ``scale100``: one random input channel (weight column) multiplied by 100.

The inspector runs on ``--samples`` wiki windows (PPL-wiki-512 text and windowing) with consumer-aware
impact on ``--impact-samples`` of them; recall@1 = share of plants whose linear is ranked first.
The tied ``lm_head`` / embedding is not planted (damaging one damages both).

    python benchmarks/inspector_planted.py --plants 24 --json benchmarks/results/inspector_planted.json
    python benchmarks/inspector_planted.py --plants 12 --background w4 --impact-top 16 \
        --json benchmarks/results/inspector_planted_w4.json
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import time

import torch
from _inspector_common import add_args, machine, setup

from compactlm.inspector import InspectConfig, inspect
from compactlm.inspector.faults import fake_rtn_ as rtn_
from compactlm.utils import peak_rss_mib, write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap, samples=1, impact_samples=1)
    ap.add_argument("--plants", type=int, default=24)
    ap.add_argument("--background", choices=["none", "w4"], default="none")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    s = setup(args, quantize_bits=4 if args.background == "w4" else None)
    ref, cand, names, ids = s.ref, s.cand, s.names, s.ids
    cfg = InspectConfig(impact_samples=args.impact_samples, impact_top=args.impact_top)
    rng = random.Random(args.seed)
    records = []
    for k in range(args.plants):
        name = rng.choice(names)
        fault = ("rtn2", "scale100")[k % 2]
        weight = cand.get_submodule(name).weight
        saved = weight.data.clone()
        channel = rng.randrange(weight.shape[1])
        with torch.no_grad():
            if fault == "rtn2":
                rtn_(weight, 2)
            else:
                weight[:, channel] *= 100.0
        start = time.perf_counter()
        report = inspect(ref, cand, ids, cfg)
        seconds = time.perf_counter() - start
        weight.data.copy_(saved)
        units = report.top(10_000)
        rank = next((i for i, o in enumerate(units, 1) if o["name"] == name), None)
        planted = next(o for o in report.operators if o["name"] == name)
        top = units[0]
        runner_up = units[1] if len(units) > 1 else None
        records.append({"plant": name, "fault": fault, "channel": channel if fault == "scale100" else None,
                        "rank": rank, "top1": top["name"], "top1_impact_kl": (top["impact"] or {}).get("kl"),
                        "impact_kl": (planted["impact"] or {}).get("kl"),
                        "loss_delta": (planted["impact"] or {}).get("loss_delta"),
                        "isolated_sqnr_db": (planted["isolated"] or {}).get("sqnr_db"),
                        "runner_up": runner_up and runner_up["name"],
                        "runner_up_impact_kl": runner_up and (runner_up["impact"] or {}).get("kl"),
                        "final_logit_kl": report.data["final_logits"]["kl"], "units": len(units),
                        "impact_swaps": report.data["timing"]["impact_units"],
                        "capture_s": report.data["timing"]["capture_s"], "impact_s": report.data["timing"]["impact_s"],
                        "seconds": seconds})
        print(f"[{k + 1}/{args.plants}] {fault:8s} {name:40s} rank {rank} (top: {top['name']}) "
              f"impact KL {records[-1]['impact_kl']} in {seconds:.1f} s", flush=True)
    hits = sum(r["rank"] == 1 for r in records)
    summary = {"recall_at_1": hits / len(records), "hits": hits, "plants": len(records),
               "by_fault": {f: sum(r["rank"] == 1 for r in records if r["fault"] == f) /
                            max(1, sum(r["fault"] == f for r in records)) for f in ("rtn2", "scale100")},
               "mean_seconds_per_plant": sum(r["seconds"] for r in records) / len(records)}
    print(f"recall@1 = {hits}/{len(records)} = {summary['recall_at_1']:.3f}")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "inspector planted-fault recall", "model": args.model, "background": args.background,
            "protocol": f"PPL-wiki-512 windowing, first {args.samples} window(s) of {args.seqlen} tokens; impact on "
                        f"{args.impact_samples}", "config": cfg.to_dict(), "summary": summary, "records": records,
            "peak_rss_mib": peak_rss_mib(), "command": "python " + shlex.join(sys.argv),
            "machine": machine(args)})


if __name__ == "__main__":
    main()
