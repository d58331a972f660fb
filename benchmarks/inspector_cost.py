"""Cost of inspecting the default model: capture (isolated + accumulated, attention probabilities) and
consumer-aware impact timed separately, with a whole-model candidate (every decoder linear fake-quantized
to 4-bit RTN g64 asym, so every linear differs and is swapped for impact).

    python benchmarks/inspector_cost.py --samples 8 --seqlen 512 --impact-samples 2 \
        --json benchmarks/results/inspector_cost.json

The capture time is also reported in units of "a plain forward of both models on the same tokens"
(measured in the same process just before), a figure that does not depend on how loaded the machine is.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
from _inspector_common import add_args, machine, setup

from compactlm.inspector import InspectConfig, inspect
from compactlm.utils import peak_rss_mib, write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap, samples=8, impact_samples=2, impact_top_help="swap only the N largest isolated errors (0 = all)")
    ap.add_argument("--html")
    args = ap.parse_args()
    s = setup(args, quantize_bits=4)
    ref, cand, ids = s.ref, s.cand, s.ids
    # Plain forward time of both models on the same tokens, the unit the inspector's cost is measured in.
    start = time.perf_counter()
    with torch.no_grad():
        for row in ids.split(1):
            ref(input_ids=row, use_cache=False)
            cand(input_ids=row, use_cache=False)
    two_forwards_s = time.perf_counter() - start
    cfg = InspectConfig(impact_samples=args.impact_samples, impact_top=args.impact_top)
    start = time.perf_counter()
    report = inspect(ref, cand, ids, cfg)
    total = time.perf_counter() - start
    t = report.data["timing"]
    print(report.table(10))
    print(f"capture {t['capture_s']:.1f} s, impact {t['impact_s']:.1f} s ({t['impact_units']} swaps on "
          f"{t['impact_tokens']} tokens), total {total:.1f} s; two plain forwards {two_forwards_s:.1f} s; "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    if args.html:
        report.write_html(args.html)
    if args.json:
        top = [{"name": o["name"], "impact_kl": o["impact"]["kl"], "loss_delta": o["impact"]["loss_delta"],
                "isolated_sqnr_db": o["isolated"]["sqnr_db"]} for o in report.top(10)]
        write_json_atomic(args.json, {
            "benchmark": "inspector cost", "model": args.model, "candidate": "every decoder linear RTN W4 g64 asym",
            "tokens": report.data["tokens"], "samples": args.samples, "seqlen": args.seqlen,
            "capture_s": t["capture_s"], "impact_s": t["impact_s"], "impact_swaps": t["impact_units"],
            "impact_tokens": t["impact_tokens"], "total_s": total, "two_plain_forwards_s": two_forwards_s,
            "capture_in_plain_forward_pairs": t["capture_s"] / two_forwards_s,
            "impact_s_per_swap": t["impact_s"] / max(1, t["impact_units"]),
            "operators": len(report.operators), "final_logits": report.data["final_logits"], "top10": top,
            "peak_rss_mib": peak_rss_mib(), "config": cfg.to_dict(), "command": "python " + shlex.join(sys.argv),
            "machine": machine(args)})


if __name__ == "__main__":
    main()
