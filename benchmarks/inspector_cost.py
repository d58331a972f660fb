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
import copy
import shlex
import sys
import time

import torch
from inspector_planted import rtn_

from compactlm.data import eval_windows
from compactlm.inspector import InspectConfig, inspect
from compactlm.models import get_adapter, load
from compactlm.utils import machine_info, peak_rss_mib, set_quiet, write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--impact-samples", type=int, default=2)
    ap.add_argument("--impact-top", type=int, default=0, help="swap only the N largest isolated errors (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--html")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    ref, tok = load(args.model)
    adapter = get_adapter(ref)
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        for i in range(adapter.num_layers):
            for lin in adapter.linears(i).values():
                rtn_(lin.weight, 4)
    ids = eval_windows(tok, "wiki", seqlen=args.seqlen, windows=args.samples)
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
            "machine": {**machine_info("float32"), "threads": args.threads,
                        "note": "shared 2-core machine, other engineers' jobs running; times are upper bounds"}})


if __name__ == "__main__":
    main()
