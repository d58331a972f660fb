"""Gather ``benchmarks/results/prune/<tag>/*.json`` (from prune_ppl.py) into one JSON and a markdown table.

    python benchmarks/prune_summary.py --tag quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ORDER = ["magnitude", "wanda", "barber-wanda", "barber-wanda-taylor", "barber-wanda-lm", "sparsegpt",
         "barber-sparsegpt", "barber-sparsegpt-lm", "barber-sparsegpt-taylor", "barber-magnitude",
         "wanda+w4-gptq-g64", "sparsegpt+w4-gptq-g64"]
SETTINGS = ["30pct", "50pct", "2:4", "4:8"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="quick")
    args = p.parse_args()
    folder = ROOT / "results" / "prune" / args.tag
    runs = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
    dense = [r for r in runs if r["method"] == "dense"]
    methods = [m for m in ORDER if any(r["method"] == m for r in runs)]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in runs)]
    cell = {(r["setting"], r["method"]): r for r in runs}
    lines = ["| method | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    if dense:
        lines.append("| dense | " + " | ".join(f"{dense[0]['ppl']:.2f}" for _ in settings) + " |")
    for m in methods:
        row = []
        for s in settings:
            r = cell.get((s, m))
            cpu = f", {r['prune_cpu_seconds']:.0f} s CPU" if r and "prune_cpu_seconds" in r else ""
            row.append("—" if r is None else
                       f"{r['ppl']:.2f} ({r['prune_seconds']:.0f} s wall{cpu}, {r['peak_rss_mib']:.0f} MiB)")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "results" / f"prune_{args.tag}.json"
    from compactlm.utils import write_json_atomic

    write_json_atomic(out, {"protocol": sorted({r["protocol"] for r in runs}), "runs": runs, "table_markdown": table})
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
