"""RULER-syn, dense vs block-sparse prefill, same prompts in one run, with the block fraction actually computed.

    .venv/bin/python benchmarks/prefill_ruler.py --lengths 2k,4k --samples 2 --threads 1 \\
        --json benchmarks/results/longctx/prefill_ruler_syn_2k4k.json

The runner is issue 5's ``run_ruler`` (full attention with a full-precision cache always scored beside, from the
same seeded prompts). The sparse method is ``attn:sparse-prefill``'s config, attached per prompt through a scope
that also keeps the handler's record, so the JSON says how many of the causal (query block, KV block) tiles the
prefill computed (dense-head and dense-tail groups count as computed), and which calls went dense and why.
``block_fraction_by_length`` counts the layers that run sparse only (the handler never sees ``dense_layers``);
``block_fraction_all_layers_by_length`` adds each dense layer as fully computed (every layer has the same
causal tile count). Decoding is untouched (the config has no decode handlers).

``--full-from A.json B.json`` takes full attention's rows from earlier RULER JSONs of the same model and dtype
(e.g. the committed 20-sample runs of ``run_longctx.py``) instead of running it again: ``run_ruler`` still runs
full attention on the first ``--full-check`` samples of every task and refuses the files unless it reproduces
their outputs exactly, and checks every reused prompt's answers, depth and length against the regenerated one.
That halves the cost of a run, since the sparse prefill cannot share full attention's prefill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from compactlm.attention.prefill_sparse import SparsePrefillConfig
from compactlm.attention.runtime import sparse_attention
from compactlm.evaluation.methods import RuntimeMethod
from compactlm.evaluation.ruler import TASKS, check_tasks, parse_lengths, run_ruler
from compactlm.models import load
from compactlm.models.adapter import get_adapter
from compactlm.utils import machine_info, write_json_atomic


def recording_method(cfg: SparsePrefillConfig, records: list[dict]) -> RuntimeMethod:
    """``attn:sparse-prefill`` with the same config, plus a per-prompt copy of the handler's statistics."""

    @contextlib.contextmanager
    def attach(model):
        with sparse_attention(model, cfg) as built:
            yield built
        stats = built[0].state
        records.append({"computed_blocks": stats.computed_blocks, "causal_blocks": stats.causal_blocks,
                        **stats.summary()})

    def make_cache(model, prefill_cache):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    return RuntimeMethod("sparse-prefill", attach=attach, make_cache=make_cache, shares_prefill=False,
                         description=f"block-sparse prefill {cfg.to_json()}")


def prompt_differences(records: list[dict], method: str = "sparse-prefill") -> list[dict]:
    """The prompts whose score under ``method`` differs from full attention's (same seeded prompt), with both."""
    full = {(r["length"], r["task"], r["index"]): r["score"] for r in records if r["method"] == "full"}
    return [{"length": r["length"], "task": r["task"], "index": r["index"], "full": full[key], method: r["score"]}
            for r in records if r["method"] == method
            for key in [(r["length"], r["task"], r["index"])] if r["score"] != full[key]]


def reused_full_records(paths: list[str], model: str, dtype: str) -> tuple[list[dict], list[dict]]:
    """Full attention's records from earlier RULER JSONs, refused unless they name the same model and dtype."""
    records, sources = [], []
    for path in paths:
        if not os.path.exists(path):
            raise SystemExit(f"--full-from: no such file {path}")
        with open(path) as f:
            data = json.load(f)
        if (data.get("model"), data.get("dtype")) != (model, dtype):
            raise SystemExit(f"--full-from: {path} is {data.get('model')} in {data.get('dtype')}, this run is "
                             f"{model} in {dtype}")
        rows = [r for r in data.get("records", []) if r.get("method") == "full"]
        if not rows:
            raise SystemExit(f"--full-from: {path} holds no full-attention records")
        records += rows
        sources.append({"path": path, "records": len(rows), "git_commit": data.get("machine", {}).get("git_commit"),
                        "command": data.get("command")})
    return records, sources


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--lengths", default="2k,4k")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--tasks", default=None, help="comma-separated subset of the 8 tasks (default: all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--config", default="{}", help="SparsePrefillConfig fields as JSON, e.g. '{\"dense_head\": 512}'")
    p.add_argument("--full-from", nargs="+", metavar="JSON",
                   help="reuse full attention's records from these RULER JSONs (same model and dtype)")
    p.add_argument("--full-check", type=int, default=1,
                   help="with --full-from: samples per task on which full attention still runs and must reproduce "
                        "the reused output (default 1)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SparsePrefillConfig(**json.loads(args.config))
    lengths = parse_lengths(args.lengths)
    tasks = check_tasks(args.tasks.split(",")) if args.tasks else TASKS
    model, tok = load(args.model, dtype=args.dtype)
    full_records, full_from = reused_full_records(args.full_from or [], args.model, args.dtype)
    records: list[dict] = []
    result = run_ruler(model, tok, [recording_method(cfg, records)], lengths=lengths, samples=args.samples,
                       tasks=tasks, full_records=full_records if args.full_from else None,
                       full_check=args.full_check)
    sparse_rows = [r for r in result.records if r["method"] == "sparse-prefill"]
    for rec, row in zip(records, sparse_rows, strict=True):
        rec.update(length=row["length"], task=row["task"], index=row["index"], tokens=row["tokens"])
    fractions = {}
    for n in lengths:
        rs = [r for r in records if r["length"] == n]
        fractions[str(n)] = sum(r["computed_blocks"] for r in rs) / max(1, sum(r["causal_blocks"] for r in rs))
    diffs = prompt_differences(result.records)
    prompts = {n: sum(1 for r in sparse_rows if r["length"] == n) for n in lengths}
    for n in lengths:
        ds = [d for d in diffs if d["length"] == n]
        up = sum(d["sparse-prefill"] > d["full"] for d in ds)
        # a prompt weighs 1 / (samples x tasks) of a length's mean: a 0 <-> 100 swing moves it by 100 / that
        print(f"{n}: {len(ds)} of {prompts[n]} prompts differ ({up} up, {len(ds) - up} down); one prompt moves the "
              f"mean by up to {100 / max(1, prompts[n]):.1f} points")
    if args.full_from:
        print(f"full attention: {result.full_reused} records reused from {len(args.full_from)} file(s), "
              f"{result.full_checked} re-run and reproduced exactly")
    layers = get_adapter(model).num_layers
    dense = len(cfg.dense_layers)
    all_layers = {n: ((layers - dense) * f + dense) / layers for n, f in fractions.items()}
    for name, res in result.methods.items():
        print(f"{name}: score {res['score']:.1f}; by length "
              + ", ".join(f"{n}: {v['score']:.1f}" for n, v in res["by_length"].items()))
    print("block fraction computed by the sparse prefill, sparse layers (all layers): "
          + ", ".join(f"{n}: {f:.3f} ({all_layers[n]:.3f})" for n, f in fractions.items())
          + f"; {result.seconds:.0f} s")
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "RULER-syn dense vs block-sparse prefill", "model": args.model, "dtype": args.dtype,
            "command": " ".join([".venv/bin/python", *sys.argv]), "config": cfg.to_dict(),
            "block_fraction_by_length": fractions,
            "block_fraction_all_layers_by_length": all_layers, "prompts_differing": diffs, "full_from": full_from,
            "sparse_prefill_records": records, **result.to_dict(),
            "machine": {**machine_info(args.dtype), "threads": torch.get_num_threads(),
                        "load_average": os.getloadavg()},
            "notes": "2-core machine shared with other engineers' jobs (see load_average)"})


if __name__ == "__main__":
    main()
