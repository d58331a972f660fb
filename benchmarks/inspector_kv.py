"""Planted KV-cache faults: a 2-bit KV cache on one random layer, a milder one elsewhere; is it ranked first?

The candidate is the reference model itself with a runtime KV cache (KIVI-style, simulated in the forward
as the cache holds keys/values when each token is decoded): ``PerLayer({planted: KVQuant(bits=2),
"_default": KVQuant(bits=background)})``. Every layer's attention block differs, so every one is a unit
swapped for the consumer-aware impact; recall@1 = the planted layer ranked first.

    python benchmarks/inspector_kv.py --plants 6 --seqlen 512 --threads 1 \\
        --json benchmarks/results/inspector_kv_planted.json
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import time

from _inspector_common import add_args, machine, setup

from compactlm.config import PerLayer
from compactlm.inspector import InspectConfig, inspect
from compactlm.kv import KVQuant
from compactlm.models import get_adapter
from compactlm.utils import peak_rss_mib, write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap, samples=1, impact_samples=1)
    ap.add_argument("--plants", type=int, default=6)
    ap.add_argument("--background", type=int, default=4, choices=(4, 8), help="KV bits of the other layers")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    s = setup(args)
    ref = s.ref
    adapter = get_adapter(ref)
    names = {id(m): n for n, m in ref.named_modules()}
    attn = [names[id(adapter.attention(i))] for i in range(adapter.num_layers)]
    layers = random.Random(args.seed).sample(range(adapter.num_layers), args.plants)
    kv = dict(group_size=args.group_size, residual=args.residual)
    rows = []
    for layer in layers:
        runtime = PerLayer({attn[layer]: KVQuant(bits=2, **kv), "_default": KVQuant(bits=args.background, **kv)})
        start = time.perf_counter()
        report = inspect(ref, ref, s.ids, InspectConfig(impact_samples=args.impact_samples, impact_top=args.impact_top),
                         candidate_runtime=runtime)
        units = report.top(len(report.operators))
        by_sqnr = sorted(units, key=lambda o: o["isolated"]["sqnr_db"])
        rank = next(r for r, o in enumerate(units, 1) if o["name"] == attn[layer])
        planted = units[rank - 1]
        runner_up = next(o for o in units if o["name"] != attn[layer])
        rows.append({"layer": layer, "rank": rank, "rank_by_isolated_sqnr": 1 + [o["name"] for o in by_sqnr].index(
            attn[layer]), "planted_impact_kl": planted["impact"]["kl"],
            "planted_isolated_sqnr_db": planted["isolated"]["sqnr_db"], "runner_up": runner_up["name"],
            "runner_up_impact_kl": runner_up["impact"]["kl"], "final_logits_kl": report.data["final_logits"]["kl"],
            "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
    hits = sum(r["rank"] == 1 for r in rows)
    print(f"recall@1 {hits}/{len(rows)}")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "inspector planted KV faults", "model": args.model,
            "candidate": f"the reference with a simulated KIVI KV cache: int2 on one layer, int{args.background} on "
                         f"the others, group {args.group_size}, residual {args.residual}",
            "data": f"first {args.samples} PPL-wiki window(s) of {args.seqlen} tokens; impact on "
                    f"{args.impact_samples}", "recall_at_1": hits / len(rows), "plants": rows,
            "peak_rss_mib": peak_rss_mib(), "command": "python " + shlex.join(sys.argv), "machine": machine(args)})


if __name__ == "__main__":
    main()
