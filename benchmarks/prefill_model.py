"""End-to-end prefill of the default model, dense vs block-sparse, same run: time and PPL on 8K wiki windows.

    .venv/bin/python benchmarks/prefill_model.py --windows 2 --json benchmarks/results/prefill_model_8k.json

PPL here is over whole 8K windows of the PPL-wiki text (not PPL-wiki-512): the figure that changes when
prefill attention is sparse. Both methods score the same windows in the same process.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from compactlm.attention.prefill_bench import compare_prefill
from compactlm.attention.prefill_sparse import SparsePrefillConfig
from compactlm.data import eval_windows
from compactlm.models import load
from compactlm.utils import machine_info, write_json_atomic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--config", default="{}", help="SparsePrefillConfig fields as JSON, e.g. '{\"keep_ratio\": 0.3}'")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import json

    cfg = SparsePrefillConfig(**json.loads(args.config))
    model, tok = load(args.model, dtype=args.dtype)
    windows = eval_windows(tok, "wiki", args.length, args.windows)
    result = compare_prefill(model, windows, cfg, log=lambda m: print(m, flush=True))
    print(f"PPL on {result['windows']} x {args.length}-token windows: dense {result['dense_ppl']:.4f}, sparse "
          f"{result['sparse_ppl']:.4f} ({100 * result['ppl_change']:+.2f} %); prefill {result['dense_s']:.1f} s -> "
          f"{result['sparse_s']:.1f} s ({result['speedup']:.2f}x)")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "prefill end-to-end + PPL on 8K wiki windows", "model": args.model,
            "command": " ".join([".venv/bin/python", *sys.argv]), **result,
            "machine": {**machine_info(args.dtype), "load_average": os.getloadavg()},
            "notes": "machine shared with 5 other engineers' jobs; times are upper bounds"})


if __name__ == "__main__":
    main()
