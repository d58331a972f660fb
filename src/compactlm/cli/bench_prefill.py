"""``compactlm bench prefill-attention``: block-sparse prefill attention vs the fastest dense causal attention.

Protocol ATTN-prefill (``shared/PROTOCOL.md``): causal self-attention over S tokens, CPU shapes 8 query
heads / 2 KV heads / head dim 128, random inputs drawn fresh per size, median of >= 10 timed runs after
warm-up; the dense baseline is the faster of SDPA and a compiled dense FlexAttention in the same process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import ConfigError
from .common import add_bench_args, emit_json, parse_lengths, print_table


def register(groups) -> None:
    p = groups["bench"].add_parser(
        "prefill-attention", help="block-sparse prefill attention vs the best dense (ATTN-prefill)",
        description="Time block-sparse causal prefill attention (selection + kernel) against the fastest exact "
                    "dense causal attention (SDPA or compiled dense FlexAttention) on random inputs.")
    add_bench_args(p, lengths="4k,8k,16k,32k", lengths_help="sequence lengths (≥ 128)", threads=0,
                   threads_help="torch threads (default: leave as is)")
    p.add_argument("--keep", type=float, default=0.25, help="keep-ratio method's budget (default 0.25; 0 = skip)")
    p.add_argument("--threshold", type=float, default=0.9, help="threshold method's score mass (default 0.9; 0 = skip)")
    p.add_argument("--score", default="lse", help="block score: mean, max, lse (default), quest, vertical_slash")
    p.add_argument("--share-len", type=int, default=128, help="queries sharing one block set (default 128)")
    p.add_argument("--block-size", type=int, default=64, help="KV block size in tokens (default 64)")
    p.add_argument("--heads", type=int, default=8, help="query heads (default 8, the CPU shape)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (default 2)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    p.add_argument("--dense", default="sdpa,flex",
                   help="dense baselines to time (default sdpa,flex: the faster one is the baseline)")
    p.set_defaults(func=run)


def bench_length(length: int, methods: dict[str, Any], args, log) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from ..attention.prefill_sparse import select_blocks
    from ..kernels.block_prefill import block_attention_flex, dense_layout, flex_block_mask
    from ..utils import median_time, parse_dtype

    def time_ms(fn) -> float:  # one warm-up run: it also compiles FlexAttention
        return 1e3 * median_time(fn, warmup=1, repeat=args.repeats)

    dtype = parse_dtype(args.dtype)
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(1, args.heads, length, args.head_dim, generator=gen).to(dtype)
    k = torch.randn(1, args.kv_heads, length, args.head_dim, generator=gen).to(dtype)
    v = torch.randn(1, args.kv_heads, length, args.head_dim, generator=gen).to(dtype)
    sdpa_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    log(f"S={length}: SDPA {sdpa_ms:.1f} ms")
    flex_ms = None
    if "flex" in args.dense:
        full = dense_layout(1, args.kv_heads, length, length, args.block_size)
        full_mask = flex_block_mask(full, args.heads)
        flex_ms = time_ms(lambda: block_attention_flex(q, k, v, full, block_mask=full_mask))
        log(f"S={length}: dense FlexAttention {flex_ms:.1f} ms")
    dense_ms, dense_impl = min((sdpa_ms, "sdpa"), (flex_ms or float("inf"), "flex_dense"))
    rows = []
    with torch.no_grad():
        for name, cfg in methods.items():
            layout = select_blocks(q, k, cfg)
            select_ms = time_ms(lambda cfg=cfg: select_blocks(q, k, cfg))

            def step(cfg=cfg):
                lay = select_blocks(q, k, cfg)
                return block_attention_flex(q, k, v, lay)

            ms = time_ms(step)
            frac = layout.block_fraction()
            rows.append({"method": name, "length": length, "ms": ms, "dense_ms": dense_ms, "dense_impl": dense_impl,
                         "ratio": dense_ms / ms, "ideal_ratio": 1.0 / frac, "block_fraction": frac,
                         "select_share": select_ms / ms, "sdpa_ms": sdpa_ms, "flex_dense_ms": flex_ms,
                         "achieved_of_ideal": (dense_ms / ms) * frac})
            log(f"S={length}: {name} {ms:.1f} ms ({dense_ms / ms:.2f}x, ideal {1 / frac:.2f}x)")
    return rows


def run(args) -> int:
    import torch

    from ..attention.prefill_sparse import SparsePrefillConfig
    from ..utils import is_quiet, machine_info

    lengths = parse_lengths(args.lengths, minimum=128)
    if not args.dense or not set(args.dense.split(",")) <= {"sdpa", "flex"}:
        raise ConfigError(f"--dense takes sdpa, flex or sdpa,flex; got {args.dense!r}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if args.heads % args.kv_heads:
        raise ConfigError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(share_len=args.share_len, block_size=args.block_size, score=args.score, dense_head=0)
    methods = {}
    if args.keep:
        methods[f"sparse-keep{args.keep:g}"] = SparsePrefillConfig(**common, keep_ratio=args.keep)
    if args.threshold:
        methods[f"sparse-thr{args.threshold:g}"] = SparsePrefillConfig(**common, keep_ratio=None,
                                                                        threshold=args.threshold)
    if not methods:
        raise ConfigError("nothing to run: give --keep and/or --threshold a value > 0")

    def log(msg: str) -> None:
        if not is_quiet():
            print(msg, file=sys.stderr, flush=True)

    rows = []
    for length in lengths:
        rows.extend(bench_length(length, methods, args, log))
    print_table(rows, ["method", "length", "ms", "dense_ms", "dense_impl", "ratio", "ideal_ratio", "block_fraction",
                       "select_share"])
    emit_json(args.json, {
        "protocol": "ATTN-prefill", "command": " ".join(["compactlm", *sys.argv[1:]]),
        "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "batch": 1},
        "repeats": args.repeats, "configs": {n: c.to_dict() for n, c in methods.items()},
        "inputs": "torch.randn per length (seed = length)",
        "kernel": "compiled FlexAttention, BlockMask.from_kv_blocks",
        "results": rows, "machine": {**machine_info(args.dtype), "load_average": os.getloadavg()},
    })
    return 0
