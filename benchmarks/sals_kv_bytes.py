"""KV bytes per token: SALS compressed/index caches vs the full-precision cache, on the default model.

Prefills one 1,024-token PPL-wiki window densely, converts copies of that cache the way the runners do
(``make_cache``) and counts the bytes every layer holds per token (dense layers 0, 1, 29 stay full).
Also records the key energy the calibrated projections keep per layer at r = 25 % and 12.5 %, and each SALS
row's per-layer latent ranks (energy ranks differ by layer). Exact sink/recent keys are a constant per layer,
so their share per token shrinks with the context (1,024 tokens here).

    .venv/bin/python benchmarks/sals_kv_bytes.py --dtype bf16 --json benchmarks/results/sals_kv_bytes.json
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

import torch

from compactlm.attention.sals import SALSConfig, sals_method
from compactlm.attention.sals_cache import kv_bytes_per_token
from compactlm.attention.sals_calib import ensure_projections
from compactlm.cli.common import print_table
from compactlm.data import eval_windows
from compactlm.evaluation.generate import prefill
from compactlm.models import load
from compactlm.utils import machine_info, write_json_atomic

CONFIGS = {
    "sals-25% compressed": SALSConfig(rank=0.25),
    "sals-12.5% compressed": SALSConfig(rank=0.125),
    "sals-25% compressed, values int4": SALSConfig(rank=0.25, value_bits=4),
    "sals-12.5% compressed, values int4": SALSConfig(rank=0.125, value_bits=4),
    "sals-25% index": SALSConfig(rank=0.25, mode="index"),
    "sals-50% compressed": SALSConfig(rank=0.5),
    "sals energy:0.99 compressed": SALSConfig(rank="energy:0.99"),
    "sals energy:0.999 budget 50% compressed": SALSConfig(rank="energy:0.999", rank_budget=0.5),
    "sals-25% compressed, exact sink 16 + recent 64 keys": SALSConfig(rank=0.25, exact_sink=16, exact_recent=64),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok = load("smollm2-135m", dtype=args.dtype)
    proj = ensure_projections(model, tok)
    ids = eval_windows(tok, "wiki", seqlen=1024, windows=1)
    with torch.no_grad():
        dense, _ = prefill(model, ids)
    full = kv_bytes_per_token(dense)
    rows = [{"cache": "full (DynamicCache)", "bytes_per_token": full, "vs_full": 1.0}]
    for name, cfg in CONFIGS.items():
        cache = sals_method(model, cfg, name).make_cache(model, copy.deepcopy(dense))
        b = kv_bytes_per_token(cache)
        ranks = cfg.layer_ranks(proj, len(cache.layers))
        mean_rank = sum(r for r, _ in ranks.values()) / len(ranks)
        rows.append({"cache": name, "bytes_per_token": b, "vs_full": b / full, "mean_rank": mean_rank,
                     "ranks": {str(i): r for i, (r, _) in ranks.items()}})
    print_table([{k: v for k, v in row.items() if k != "ranks"} for row in rows])
    width = proj.width
    energy = [{"layer": i, "r25": proj.energy(i, width // 4), "r12.5": proj.energy(i, width // 8)}
              for i in range(proj.eigvecs.shape[0])]
    if args.json:
        write_json_atomic(args.json, {"model": "smollm2-135m", "dtype": args.dtype, "tokens": int(ids.shape[1]),
                                      "results": rows, "key_energy_kept": energy, "calibration": proj.meta,
                                      "command": "python " + shlex.join(sys.argv), "machine": machine_info(args.dtype)})


if __name__ == "__main__":
    main()
