"""Copy of a PPL-decode run JSON keeping only some methods (``full`` always), so that a screening run's
window can be merged with later one-window runs of fewer methods (``run_longctx.py merge`` needs the
same methods in every part). Nothing is recomputed: per-method NLL/tokens and per-window PPL are copied.

    python benchmarks/kv_subset_methods.py benchmarks/results/longctx/kv_int2_screen_w0.json \
        int2@sinks=16@pre_rope=true@value_group_size=16 --json /tmp/w0.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from compactlm.utils import write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source")
    ap.add_argument("methods", help="comma-separated method names to keep (besides full)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    run = json.load(open(args.source))
    keep = ["full", *(m for m in args.methods.split(",") if m and m != "full")]
    missing = [m for m in keep if m not in run["methods"]]
    if missing:
        raise SystemExit(f"{args.source} has no methods {missing}; it has {sorted(run['methods'])}")
    run["methods"] = {m: run["methods"][m] for m in keep}
    for w in run["per_window"]:
        w["ppl"] = {m: w["ppl"][m] for m in keep}
    run["subset_of"] = {"path": args.source, "command": "python " + shlex.join(sys.argv)}
    write_json_atomic(args.json, run)


if __name__ == "__main__":
    main()
