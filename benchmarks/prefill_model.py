"""End-to-end prefill of the default model, dense vs block-sparse, same run: time and PPL on 8K wiki windows.

    .venv/bin/python benchmarks/prefill_model.py --windows 2 --json benchmarks/results/prefill_model_8k.json
    .venv/bin/python benchmarks/prefill_model.py --profile 2 --json benchmarks/results/prefill_profile_8k.json

``--profile N`` runs the layer profiler instead (``profile_layers``) on N prompts of ``--length`` tokens cut
from the calibration essays (CALIB-pg offsets, ``random.Random(0)``; never the wiki eval text) and writes each
layer's captured attention mass, block fraction and the proposed ``dense_layers``.

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
    p.add_argument("--profile", type=int, default=0,
                   help="profile layers on this many calibration-essay prompts instead of comparing PPL")
    p.add_argument("--min-mass", type=float, default=0.9, help="profiler: propose layers below this captured mass")
    p.add_argument("--query-stride", type=int, default=1,
                   help="profiler: score every n-th query only (cost / n; default 1 = all)")
    p.add_argument("--profiled", action="store_true",
                   help="add the profiler's dense layers to --config as `--attn sparse-prefill-profiled` does "
                        "(profiled on calibration essays once per model, then cached)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import json

    cfg = SparsePrefillConfig(**json.loads(args.config))
    model, tok = load(args.model, dtype=args.dtype)
    if args.profile:
        profile(model, tok, cfg, args)
        return
    if args.profiled:
        from compactlm.attention.prefill_profiled import profiled_config

        cfg = profiled_config(model, cfg, tok)
        print(f"profiled config: {cfg.to_json()}", flush=True)
    windows = eval_windows(tok, "wiki", args.length, args.windows)
    cpu = cpu_seconds_per_forward(model)
    result = compare_prefill(model, windows, cfg, log=lambda m: print(m, flush=True))
    add_cpu_times(result, cpu)
    print(f"PPL on {result['windows']} x {args.length}-token windows: dense {result['dense_ppl']:.4f}, sparse "
          f"{result['sparse_ppl']:.4f} ({100 * result['ppl_change']:+.2f} %); prefill {result['dense_s']:.1f} s -> "
          f"{result['sparse_s']:.1f} s ({result['speedup']:.2f}x); CPU {result['dense_cpu_s']:.1f} s -> "
          f"{result['sparse_cpu_s']:.1f} s ({result['speedup_cpu']:.2f}x)")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "prefill end-to-end + PPL on 8K wiki windows", "model": args.model,
            "command": " ".join([".venv/bin/python", *sys.argv]), **result,
            "machine": {**machine_info(args.dtype), "load_average": os.getloadavg()},
            "notes": "2-core machine shared with other engineers' jobs (see load_average); times are upper bounds"})


def cpu_seconds_per_forward(model) -> list[float]:
    """Process CPU seconds of every top-level forward call, in call order (hooks on the model itself).

    Why: on a shared machine the wall time of a one-thread pass depends on the other jobs; the process CPU time
    is what the pass itself cost. ``compare_prefill`` calls the model once per window and method (dense, then
    sparse), so the list pairs up with its rows. The NLL scoring after each forward is outside the hooks.
    """
    import time

    seconds: list[float] = []
    start: list[float] = []
    model.register_forward_pre_hook(lambda mod, args: start.append(time.process_time()))
    model.register_forward_hook(lambda mod, args, out: seconds.append(time.process_time() - start.pop()))
    return seconds


def add_cpu_times(result: dict, cpu: list[float]) -> None:
    """Per-window and total process CPU seconds of the dense and sparse prefill passes, and their ratio."""
    if len(cpu) != 2 * len(result["rows"]):
        raise RuntimeError(f"expected one dense and one sparse forward per window, timed {len(cpu)} forwards")
    for row, dense, sparse in zip(result["rows"], cpu[0::2], cpu[1::2], strict=True):
        row.update(dense_cpu_s=dense, sparse_cpu_s=sparse, speedup_cpu=dense / sparse)
    result.update(dense_cpu_s=sum(cpu[0::2]), sparse_cpu_s=sum(cpu[1::2]))
    result["speedup_cpu"] = result["dense_cpu_s"] / result["sparse_cpu_s"]


def profile(model, tok, cfg: SparsePrefillConfig, args) -> None:
    """Per-layer captured attention mass on calibration prompts (essays only) and the proposed dense layers."""
    import time

    from compactlm.attention.prefill_profile import profile_layers
    from compactlm.data import calibration_set

    prompts = calibration_set(tok, "essays", args.profile, args.length, seed=0)
    start = time.perf_counter()
    prof = profile_layers(model, [prompts[i:i + 1] for i in range(prompts.shape[0])], cfg, min_mass=args.min_mass,
                         query_stride=args.query_stride)
    seconds = time.perf_counter() - start
    order = sorted(range(len(prof.mass)), key=lambda i: prof.mass[i])
    for i in order:
        print(f"layer {i:2d}: captured mass {prof.mass[i]:.4f}, block fraction {prof.block_fraction[i]:.3f}")
    print(f"proposed dense_layers (mass < {args.min_mass}): {list(prof.proposed)}; {seconds:.0f} s")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "prefill layer profile on calibration essays", "model": args.model,
            "command": " ".join([".venv/bin/python", *sys.argv]), "config": cfg.to_dict(),
            "prompts": f"{args.profile} x {args.length} tokens of the essays (CALIB-pg offsets, seed 0)",
            "query_stride": args.query_stride,
            **prof.to_dict(), "layers_by_mass": order, "seconds": seconds,
            "machine": {**machine_info(args.dtype), "load_average": os.getloadavg()},
            "notes": "machine shared with other engineers' jobs"})


if __name__ == "__main__":
    main()
