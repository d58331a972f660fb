"""``compactlm bench prefill-attention``: block-sparse prefill attention vs the fastest dense causal attention.

Protocol ATTN-prefill (``shared/PROTOCOL.md``): causal self-attention over S tokens, CPU shapes 8 query
heads / 2 KV heads / head dim 128, random inputs drawn fresh per size, median of >= 10 timed runs after
warm-up; the dense baseline is the faster of SDPA and a compiled dense FlexAttention in the same process.
Every timed entry (dense baselines, the selection alone, each sparse kernel with its selection) runs once
per round, round-robin, so the ratios are side by side even when the machine's load moves.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import ConfigError
from .common import add_bench_args, emit_json, interleaved_ms, parse_lengths, print_table


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
    p.add_argument("--share-len", default="128",
                   help="queries sharing one block set (default 128); a comma-separated list times one row per value, "
                        "all in the same rounds")
    p.add_argument("--long-share-len", type=int, default=256,
                   help="query group size from --long-from keys on, when larger than --share-len (default 256, the "
                        "config default; 0 = --share-len at every length)")
    p.add_argument("--long-from", type=int, default=16384, help="length where --long-share-len starts (default 16384)")
    p.add_argument("--block-size", type=int, default=64, help="KV block size in tokens (default 64)")
    p.add_argument("--heads", type=int, default=8, help="query heads (default 8, the CPU shape)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (default 2)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    p.add_argument("--dense", default="sdpa,flex",
                   help="dense baselines to time (default sdpa,flex: the faster one is the baseline)")
    p.add_argument("--impl", default="gather",
                   help="sparse kernel(s) to time, comma-separated: gather (default, CPU gather-then-dense), flex "
                        "(compiled FlexAttention), reference; each gets its own row")
    p.set_defaults(func=run)


def bench_length(length: int, methods: dict[str, Any], args, log) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from ..attention.prefill_sparse import select_blocks
    from ..kernels.block_prefill import block_attention, block_attention_flex, dense_layout, flex_block_mask
    from ..utils import parse_dtype

    dtype = parse_dtype(args.dtype)
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(1, args.heads, length, args.head_dim, generator=gen).to(dtype)
    k = torch.randn(1, args.kv_heads, length, args.head_dim, generator=gen).to(dtype)
    v = torch.randn(1, args.kv_heads, length, args.head_dim, generator=gen).to(dtype)
    entries = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    if "flex" in args.dense:
        full = dense_layout(1, args.kv_heads, length, length, args.block_size)
        full_mask = flex_block_mask(full, args.heads)
        entries["flex_dense"] = lambda: block_attention_flex(q, k, v, full, block_mask=full_mask)
    layouts = {}
    for name, cfg in methods.items():
        layouts[name] = select_blocks(q, k, cfg)
        entries[f"select:{name}"] = lambda cfg=cfg: select_blocks(q, k, cfg)
        for impl in args.impl.split(","):
            entries[f"{name}:{impl}"] = lambda cfg=cfg, impl=impl: block_attention(q, k, v, select_blocks(q, k, cfg),
                                                                                   impl=impl)
    with torch.no_grad():
        ms, cpu_ms = interleaved_ms(entries, args.repeats, log=log)
    sdpa_ms, flex_ms = ms["sdpa"], ms.get("flex_dense")
    dense_ms, dense_impl = min((sdpa_ms, "sdpa"), (flex_ms or float("inf"), "flex_dense"))
    dense_cpu_ms = cpu_ms[dense_impl]
    log(f"S={length}: SDPA {sdpa_ms:.1f} ms" + (f", dense FlexAttention {flex_ms:.1f} ms" if flex_ms else ""))
    rows = []
    for name in methods:
        frac, select_ms = layouts[name].block_fraction(), ms[f"select:{name}"]
        for impl in args.impl.split(","):
            t = ms[f"{name}:{impl}"]
            t_cpu = cpu_ms[f"{name}:{impl}"]
            rows.append({"method": name, "impl": impl, "length": length, "ms": t, "dense_ms": dense_ms,
                         "dense_impl": dense_impl, "ratio": dense_ms / t, "cpu_ms": t_cpu, "dense_cpu_ms": dense_cpu_ms,
                         "ratio_cpu": dense_cpu_ms / t_cpu, "ideal_ratio": 1.0 / frac,
                         "block_fraction": frac, "select_ms": select_ms, "select_share": select_ms / t,
                         "sdpa_ms": sdpa_ms, "flex_dense_ms": flex_ms, "achieved_of_ideal": (dense_ms / t) * frac})
            log(f"S={length}: {name} [{impl}] {t:.1f} ms ({dense_ms / t:.2f}x; CPU {t_cpu:.1f} ms, "
                f"{dense_cpu_ms / t_cpu:.2f}x; ideal {1 / frac:.2f}x, select {select_ms:.1f} ms)")
    return rows


def run(args) -> int:
    import torch

    from ..attention.prefill_sparse import SparsePrefillConfig
    from ..utils import is_quiet, machine_info

    lengths = parse_lengths(args.lengths, minimum=128)
    if not args.dense or not set(args.dense.split(",")) <= {"sdpa", "flex"}:
        raise ConfigError(f"--dense takes sdpa, flex or sdpa,flex; got {args.dense!r}")
    if not args.impl or not set(args.impl.split(",")) <= {"gather", "flex", "reference"}:
        raise ConfigError(f"--impl takes gather, flex, reference or a comma-separated list; got {args.impl!r}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if args.heads % args.kv_heads:
        raise ConfigError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shares = [int(x) for x in str(args.share_len).split(",")]
    except ValueError:
        raise ConfigError(f"--share-len takes integers, comma-separated (e.g. 128,256), got {args.share_len!r}"
                          ) from None
    methods = {}
    for share in shares:
        common = dict(share_len=share, long_share_len=args.long_share_len or None, long_from=args.long_from,
                      block_size=args.block_size, score=args.score, dense_head=0)
        tag = f"-share{share}" if len(shares) > 1 else ""
        if args.keep:
            methods[f"sparse-keep{args.keep:g}{tag}"] = SparsePrefillConfig(**common, keep_ratio=args.keep)
        if args.threshold:
            methods[f"sparse-thr{args.threshold:g}{tag}"] = SparsePrefillConfig(**common, keep_ratio=None,
                                                                                 threshold=args.threshold)
    if not methods:
        raise ConfigError("nothing to run: give --keep and/or --threshold a value > 0")

    def log(msg: str) -> None:
        if not is_quiet():
            print(msg, file=sys.stderr, flush=True)

    rows = []
    for length in lengths:
        rows.extend(bench_length(length, methods, args, log))
    print_table(rows, ["method", "impl", "length", "ms", "dense_ms", "dense_impl", "ratio", "ratio_cpu",
                       "ideal_ratio", "block_fraction", "select_share"])
    emit_json(args.json, {
        "protocol": "ATTN-prefill", "command": " ".join(["compactlm", *sys.argv[1:]]),
        "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "batch": 1},
        "repeats": args.repeats, "configs": {n: c.to_dict() for n, c in methods.items()},
        "inputs": "torch.randn per length (seed = length)",
        "kernels": {"gather": "gather-then-dense: index_select kept blocks + ATen CPU flash calls, LSE merge",
                    "flex": "compiled FlexAttention, BlockMask.from_kv_blocks", "reference": "plain PyTorch"},
        "threads": torch.get_num_threads(), "timing": "round-robin; ms = median wall, cpu_ms = median process CPU",
        "results": rows, "machine": {**machine_info(args.dtype), "load_average": os.getloadavg()},
    })
    return 0
