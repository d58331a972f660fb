"""KV bytes per token and decode speed at a long context: full-precision cache vs the quantized cache.

Fills every layer of the default model's cache with ``--context`` tokens of random keys/values of the
model's own shape and dtype (bytes and step cost do not depend on the values), then measures

- KV bytes per token from the tensors each cache actually holds (codes, scales, zeros, window, sinks),
  as a ratio of the bf16 full-precision cache;
- decode tokens/s: ``--steps`` single-token forward passes of the real model after that cache, all
  configurations timed in the same process, round-robin one step at a time (median step time). Two full-precision
  baselines: the model's own attention (SDPA) and an exact grouped matmul-softmax-matmul (PROTOCOL
  ATTN-decode: on this CPU SDPA with one query token is far slower); ratios are against the faster.

    python benchmarks/kv_bytes_speed.py --context 8192 --steps 4 --threads 1 \
        --json benchmarks/results/kv_bytes_speed.json
    python benchmarks/kv_bytes_speed.py --context 8192 --bytes-only --json benchmarks/results/kv_bytes_8k_int2.json
    # decode speed of named settings (keys of CONFIGS or BYTES_CONFIGS) instead of CONFIGS:
    python benchmarks/kv_bytes_speed.py --context 8192 --steps 8 --threads 1 \
        --configs int2-g32-r128-s16-prerope-m4,int2-g32-r128-s16-prerope-m4-clip --json benchmarks/results/kv_speed.json

Each step is timed twice: wall clock and this process's CPU time (``time.process_time``). With one torch
thread on a machine shared with other jobs, the CPU time is the less load-dependent figure; both are reported.
``--paths folded,chunked`` times each quantized setting on both decode paths of ``quantized_decode_attention``
(a row per setting and path), ``--cache-file`` keeps the real-text prefill between runs:

    python benchmarks/kv_bytes_speed.py --context 8192 --real-text --threads 1 --steps 6 \
        --configs int4-g32-r128,int2-g32-r128,int2-mixed,int2-mixed-c8192 --paths folded,chunked \
        --cache-file /tmp/kv8k_wiki.pt --json benchmarks/results/kv/kv_speed_8k_folded_epyc.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shlex
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from compactlm.attention.runtime import attention_override
from compactlm.kv import KVQuant, QuantizedKVCache, dense_grouped_attention, full_cache_bytes, kv_cache
from compactlm.kv.attention import PATHS, force_path
from compactlm.kv.demo_step import prefill_cache_saved
from compactlm.kv.runtime import PRESETS
from compactlm.models import get_adapter, load
from compactlm.utils import machine_info, write_json_atomic

CONFIGS = {
    "int4-g32-r128": KVQuant(bits=4, group_size=32, residual=128),
    "int2-g32-r128": KVQuant(bits=2, group_size=32, residual=128),
    "int4-g128-r128": KVQuant(bits=4, group_size=128, residual=128, value_group_size=64),
    "int2-g128-r128": KVQuant(bits=2, group_size=128, residual=128, value_group_size=64),
    "int2-g32-r128 (dequantize, no fused attention)": KVQuant(bits=2, group_size=32, residual=128,
                                                               fused_attention=False),
}
# --bytes-only: the int2 settings screened for the <= 0.16x target (no timing; bytes do not depend on values)
BYTES_CONFIGS = {
    "int2-g32-r128": KVQuant(bits=2, group_size=32, residual=128),
    "int2-g32-r128-vg16-s16-prerope": KVQuant(bits=2, group_size=32, residual=128, value_group_size=16, sinks=16,
                                              pre_rope=True),
    "int2-g32-r128-m8": KVQuant(bits=2, group_size=32, residual=128, meta_dtype="int8"),
    "int2-g64-r128": KVQuant(bits=2, group_size=64, residual=128),
    "int2-g64-r128-m8": KVQuant(bits=2, group_size=64, residual=128, meta_dtype="int8"),
    "int2-g64-r128-s16-m8": KVQuant(bits=2, group_size=64, residual=128, sinks=16, meta_dtype="int8"),
    "int2-g32-r64-vg64-m8": KVQuant(bits=2, group_size=32, residual=64, value_group_size=64, meta_dtype="int8"),
    "int2-g128-r128": KVQuant(bits=2, group_size=128, residual=128, value_group_size=64),
    "int2-g128-r128-m8": KVQuant(bits=2, group_size=128, residual=128, value_group_size=64, meta_dtype="int8"),
    "int4-g32-r128-m8": KVQuant(bits=4, group_size=32, residual=128, meta_dtype="int8"),
    # int4 at <= 0.30x with fp16 metadata: key groups of 64 tokens, value groups of one head (64 channels)
    "int4-g64-r128": KVQuant(bits=4, group_size=64, residual=128),
    "int4-g128-r128": KVQuant(bits=4, group_size=128, residual=128, value_group_size=64),
    # the second int2 screen (sinks 16 with pre-RoPE keys, key groups of 16, residual 256, 4-bit keys)
    "int2-g32-r128-s16": KVQuant(bits=2, group_size=32, residual=128, sinks=16),
    "int2-g32-r128-s16-prerope": KVQuant(bits=2, group_size=32, residual=128, sinks=16, pre_rope=True),
    "int2-g32-r128-s16-prerope-m8": KVQuant(bits=2, group_size=32, residual=128, sinks=16, pre_rope=True,
                                            meta_dtype="int8"),
    "int2-g16-r128-vg32-s16": KVQuant(bits=2, group_size=16, residual=128, value_group_size=32, sinks=16),
    "int2-g16-r128-vg32-s16-prerope": KVQuant(bits=2, group_size=16, residual=128, value_group_size=32, sinks=16,
                                              pre_rope=True),
    "int2-g16-r128-vg32-s16-prerope-m8": KVQuant(bits=2, group_size=16, residual=128, value_group_size=32,
                                                 sinks=16, pre_rope=True, meta_dtype="int8"),
    "int2-g32-r256-s16": KVQuant(bits=2, group_size=32, residual=256, sinks=16),
    "k4v2-g32-r128-s16": KVQuant(bits=2, key_bits=4, group_size=32, residual=128, sinks=16),
    "k4v2-g32-r128-s16-prerope": KVQuant(bits=2, key_bits=4, group_size=32, residual=128, sinks=16, pre_rope=True),
    # the third int2 screen: error-fitted ranges, 1-byte metadata, Hadamard-rotated values (pre-RoPE positions
    # now held once per group: the earlier pre-RoPE rows above held one int32 per token, +118 B/token at 8K)
    "int2-g32-r128-s16-prerope-m8-clip": KVQuant(bits=2, group_size=32, residual=128, sinks=16, pre_rope=True,
                                                 meta_dtype="int8", clip_search=True),
    "int2-g32-r128-s16-prerope-m8-clip-vrot": KVQuant(bits=2, group_size=32, residual=128, sinks=16, pre_rope=True,
                                                      meta_dtype="int8", clip_search=True, value_rotation=True),
    "int2-g32-r128-s16-prerope-m4": KVQuant(bits=2, group_size=32, residual=128, sinks=16, pre_rope=True,
                                            meta_dtype="int4"),
    "int2-g32-r128-s16-prerope-m4-vrot": KVQuant(bits=2, group_size=32, residual=128, sinks=16, pre_rope=True,
                                                 meta_dtype="int4", value_rotation=True),
    # the recommended int2 setting (1-byte fitted metadata) with its range search on top
    "int2-g32-r128-s16-prerope-m4-clip": KVQuant(bits=2, group_size=32, residual=128, sinks=16, pre_rope=True,
                                                 meta_dtype="int4", clip_search=True),
    # per-channel key bits (0/2/4 averaging 2): bytes depend on the channel partition, so measure with --real-text
    "int2-g32-r128-s16-prerope-m4-kalloc": KVQuant(bits=2, group_size=32, residual=128, sinks=16, pre_rope=True,
                                                   meta_dtype="int4", key_allocation="importance"),
    "int2-g32-r128-s16-m4-kalloc": KVQuant(bits=2, group_size=32, residual=128, sinks=16, meta_dtype="int4",
                                           key_allocation="importance"),
    "int2-g32-r128-s16-m8-kalloc": KVQuant(bits=2, group_size=32, residual=128, sinks=16, meta_dtype="int8",
                                           key_allocation="importance"),
    "int2-g32-r128-s16-kalloc": KVQuant(bits=2, group_size=32, residual=128, sinks=16, key_allocation="importance"),
    # the recommended 2-bit cache, as `--kv int2-mixed` builds it (the same setting as int2-g32-r128-s16-m4-kalloc)
    "int2-mixed": KVQuant(bits=2, **PRESETS["int2-mixed"]),
    # the same with 8,192-token chunks (`--kv int2-mixed@chunk_tokens=8192`): fewer ops per layer at one query token
    "int2-mixed-c8192": KVQuant(bits=2, **PRESETS["int2-mixed"], chunk_tokens=8192),
}


def bytes_only(args, model, full: DynamicCache, full_bytes: int, bf16_bytes: int) -> None:
    """KV bytes per token of each BYTES_CONFIGS entry holding exactly ``--context`` tokens (no decode steps)."""
    rows = [{"config": "full (DynamicCache)", "kv_bytes": full_bytes, "bytes_per_token": full_bytes / args.context,
             "ratio_vs_bf16": full_bytes / bf16_bytes}]
    names = args.only.split(",") if args.only else list(BYTES_CONFIGS)
    unknown = [n for n in names if n not in BYTES_CONFIGS]
    if unknown:
        raise SystemExit(f"--only: unknown configs {unknown}; known: {sorted(BYTES_CONFIGS)}")
    for name in names:
        cfg = BYTES_CONFIGS[name]
        nbytes = QuantizedKVCache.from_cache(model, cfg, full).kv_bytes()
        rows.append({"config": name, "kv_bytes": nbytes, "bytes_per_token": nbytes / args.context,
                     "ratio_vs_bf16": nbytes / bf16_bytes, "kv_quant": cfg.to_dict()})
        print(f"{name:36s} {nbytes / args.context:9.1f} B/token  {nbytes / bf16_bytes:.4f}x bf16", flush=True)
    out = {"benchmark": "kv bytes per token (bytes only)", "model": args.model, "dtype": args.dtype,
           "context": args.context, "rows": rows,
           "note": ("cache filled by a real prefill of the first --context wiki tokens" if args.real_text else
                    "cache filled with exactly --context random keys/values of the model's shape (bytes do not "
                    "depend on the values, except the per-channel key bits of key_allocation='importance')")
                   + ", converted to each config, bytes summed over every tensor held: codes, scales, zeros, "
                   "full-precision window and sinks, key positions (pre_rope), channel partitions",
           "command": "python " + shlex.join(sys.argv), "machine": machine_info(args.dtype)}
    if args.json:
        write_json_atomic(args.json, out)


def speed_configs(names: str | None) -> dict[str, KVQuant]:
    """The settings a timed run measures: all of CONFIGS, or the named entries of CONFIGS / BYTES_CONFIGS."""
    if not names:
        return dict(CONFIGS)
    known = {**BYTES_CONFIGS, **CONFIGS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"--configs: unknown settings {unknown}; known: {sorted(known)}")
    return {n: known[n] for n in wanted}



def fill(model, context: int, dtype: torch.dtype) -> DynamicCache:
    a = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    cache = DynamicCache(config=model.config)
    for i in range(a.num_layers):
        k = torch.randn(1, a.num_kv_heads, context, a.head_dim, generator=g).to(dtype)
        v = torch.randn(1, a.num_kv_heads, context, a.head_dim, generator=g).to(dtype)
        cache.update(k, v, i)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--bytes-only", action="store_true", help="bytes per token of BYTES_CONFIGS, no timing")
    ap.add_argument("--only", default=None, help="--bytes-only: comma-separated BYTES_CONFIGS names to measure")
    ap.add_argument("--real-text", action="store_true",
                    help="fill the cache by a real prefill of the wiki text instead of random keys/values (the "
                         "per-channel key bits of key_allocation='importance' depend on the keys, and so do its bytes)")
    ap.add_argument("--cache-file", default=None,
                    help="--real-text: save the prefilled cache here, or load it when the file exists")
    ap.add_argument("--paths", default="folded",
                    help=f"timed run: comma-separated decode paths ({', '.join(PATHS)}) for each quantized setting "
                         "(compactlm.kv.attention.force_path); a row per setting and path")
    ap.add_argument("--configs", default=None,
                    help="timed run: comma-separated names from CONFIGS or BYTES_CONFIGS (default: all of CONFIGS)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, dtype=args.dtype)
    dtype = next(model.parameters()).dtype
    load_before = os.getloadavg()
    full = (prefill_cache_saved(model, tokenizer, args.context, args.cache_file) if args.real_text
            else fill(model, args.context, dtype))
    full_bytes = full_cache_bytes(full)
    bf16_bytes = full_bytes * 2 // torch.tensor([], dtype=dtype).element_size()
    layers = get_adapter(model).num_layers
    if args.bytes_only:
        return bytes_only(args, model, full, full_bytes, bf16_bytes)

    def grouped(module, query, key, value, attention_mask, scaling, fallback, **kw):
        if query.shape[-2] != 1:
            return fallback(module, query, key, value, attention_mask, scaling=scaling, **kw)
        return dense_grouped_attention(query, key, value, scaling, attention_mask), None

    # (name, config or None, cache, scope factory); timed round-robin, one step each per round, so a
    # change of machine load during the run hits every configuration alike.
    runs = [("full (DynamicCache, SDPA)", None, copy.deepcopy(full), contextlib.nullcontext),
            ("full (DynamicCache) + grouped dense attention", None, copy.deepcopy(full),
             lambda: attention_override(model, {i: grouped for i in range(layers)}))]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if any(p not in PATHS for p in paths):
        raise SystemExit(f"--paths: unknown {paths}; known: {PATHS}")

    @contextlib.contextmanager
    def kv_scope(cfg: KVQuant, path: str):
        with kv_cache(model, cfg), force_path(path):
            yield

    for name, cfg in speed_configs(args.configs).items():
        for path in paths:
            label = name if path == paths[0] else f"{name} [path={path}]"
            runs.append((label, cfg, QuantizedKVCache.from_cache(model, cfg, full),
                         lambda c=cfg, p=path: kv_scope(c, p)))
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    cpu: dict[str, list[float]] = {name: [] for name, *_ in runs}
    tok = torch.tensor([[42]])
    with torch.no_grad():
        for step in range(args.steps + 1):  # round 0 is a warm-up
            for name, _, cache, scope in runs:
                with scope():
                    t0, c0 = time.perf_counter(), time.process_time()
                    model(input_ids=tok, cache=cache, use_cache=True)
                    if step:
                        times[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.process_time() - c0)
    best = max(1 / statistics.median(times[n]) for n, *_ in runs[:2])
    best_cpu = min(statistics.median(cpu[n]) for n, *_ in runs[:2])
    rows = []
    for name, cfg, cache, _ in runs:
        nbytes = full_bytes if cfg is None else cache.kv_bytes()
        med = statistics.median(times[name])
        row = {"config": name, "kv_bytes": nbytes, "bytes_per_token": nbytes / args.context,
               "ratio_vs_bf16": nbytes / bf16_bytes, "step_ms_median": 1e3 * med, "tok_per_s": 1 / med,
               "speed_vs_best_full": (1 / med) / best, "step_ms_all": [1e3 * t for t in times[name]],
               "cpu_ms_median": 1e3 * statistics.median(cpu[name]),
               "cpu_speed_vs_best_full": best_cpu / statistics.median(cpu[name]),
               "cpu_ms_all": [1e3 * t for t in cpu[name]]}
        if cfg is not None:
            row["kv_quant"] = cfg.to_dict()
            row["path"] = name.split("[path=")[1].rstrip("]") if "[path=" in name else paths[0]
        rows.append(row)
        print(f"{name:48s} {row['bytes_per_token']:9.1f} B/token  {row['ratio_vs_bf16']:.3f}x bf16  "
              f"{row['tok_per_s']:.3f} tok/s ({row['speed_vs_best_full']:.2f}x best full; CPU "
              f"{row['cpu_ms_median']:.0f} ms/step, {row['cpu_speed_vs_best_full']:.2f}x)", flush=True)
    out = {"benchmark": "kv bytes per token and decode speed", "model": args.model, "dtype": args.dtype,
           "context": args.context, "steps": args.steps, "threads": args.threads, "rows": rows,
           "note": ("caches filled by a real prefill of the wiki text" if args.real_text else
                    "caches filled with random keys/values of the model's shape")
                   + "; bytes measured from the tensors held; decode steps timed round-robin across configurations; "
                   "wall and process CPU time per step",
           "command": "python " + shlex.join(sys.argv), "machine": machine_info(args.dtype),
           "paths": paths, "loadavg_before_after": [load_before, os.getloadavg()]}
    if args.json:
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
