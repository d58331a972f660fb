"""``compactlm bench decode-attention``: ATTN-decode (PROTOCOL.md) for SALS and the decode baselines.

One new query token against a cache of L tokens, batch 1, 32 query heads / 8 KV heads / head dim 128, random
inputs drawn fresh per length. The dense baseline is the faster of SDPA and a grouped matmul-softmax-matmul
that never materialises the GQA repeat. Each method reports ms, the dense baseline's ms and name, their
ratio, the ideal ratio (dense KV bytes / bytes the method must read) and the achieved fraction of it, both in
wall time and in process CPU time (all entries timed round-robin), at the process's thread count and at one
thread. Also ``compactlm sals calibrate MODEL --out PATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from .common import add_bench_args, add_common, emit_json, interleaved_ms, print_table
from .common import parse_lengths as common_parse_lengths

METHODS = ("sals", "sals-index", "sals-index-mean", "sals-cpu", "sals-index-cpu", "sals-index-mean-cpu",
           "sals-index-wide-cpu", "sals-index-mean-wide-cpu", "quest", "streaming", "oracle")
# "-cpu": the same SALS step with impl="cpu" (compiled top-k and select-gather-attend, kernels/sparse_decode_cpu.py).
# "sals-index*" read the runtime's index-mode latent: only the r* scoring columns, contiguous (attention/sals_cache.py
# stores no more since 5 Dec 2026); "sals" / "sals-cpu" (compressed mode) read the r-column latent.
# "-wide": index mode on the layout the cache used before, all r columns stored and the first r* read strided by the
# scoring GEMM; not a runtime layout any more, kept so that one run shows what the narrow latent gains.


def parse_lengths(text: str) -> list[int]:
    """ATTN-decode cache lengths: ``4k,16k`` or ``4096``, each ≥ 256 tokens."""
    return common_parse_lengths(text, minimum=256)


def _case(length: int, dtype: torch.dtype, heads: int, kv_heads: int, d: int, rank: float, seed: int,
          huge_pages: bool = True):
    from ..attention.selection import page_minmax
    from ..kernels.huge_pages import empty as empty_on_huge_pages
    from ..kernels.sparse_decode import DecodeBuffers, SelectParams

    g = torch.Generator().manual_seed(seed + length)
    r = int(kv_heads * d * rank)

    def cache_buffer(*shape: int) -> torch.Tensor:
        # Allocated as the runtime's SALS cache allocates (attention/sals_cache.py): on 2 MB pages unless
        # --cache-pages 4k. Dense baseline and methods read the same buffers.
        out = empty_on_huge_pages(shape, dtype, "cpu", enabled=huge_pages)
        return out.copy_(torch.randn(*shape, generator=g))

    c: dict[str, Any] = {
        "q": torch.randn(1, heads, 1, d, generator=g).to(dtype),
        "k": cache_buffer(1, kv_heads, length, d),
        "v": cache_buffer(1, kv_heads, length, d),
        "latent": cache_buffer(1, length, r),
        "proj": torch.linalg.qr(torch.randn(kv_heads * d, r, generator=g))[0].reshape(kv_heads, d, r).to(dtype),
        "pos": torch.arange(length, dtype=torch.int32)[None],
        "r": r, "r_star": r // 2, "buffers": DecodeBuffers(),
        "params": SelectParams(k=length // 8, sink=16, recent=64),
    }
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(length + 1).float()[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    c["cos"], c["sin"] = ang.cos().to(dtype), ang.sin().to(dtype)
    c["kmin"], c["kmax"] = (t.to(dtype) for t in page_minmax(c["k"], 16))
    # Index mode's latent holds the leading r* columns (the same numbers), in a buffer of its own.
    c["latent_index"] = empty_on_huge_pages((1, length, c["r_star"]), dtype, "cpu", enabled=huge_pages)
    c["latent_index"].copy_(c["latent"][..., : c["r_star"]])
    c["proj_index"] = c["proj"][..., : c["r_star"]].contiguous()
    return c


def _method_fn(name: str, c: dict[str, Any], scaling: float) -> Callable[[], Any]:
    from ..attention.selection import blocks_to_tokens, quest_bounds, streaming_tokens, topk_tokens
    from ..kernels.sparse_decode import sals_decode, sparse_gather_decode

    q, k, v, p, buf = c["q"], c["k"], c["v"], c["params"], c["buffers"]
    b, h, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    qc, qs = c["cos"][-1:][None], c["sin"][-1:][None]
    if name.startswith("sals"):
        keys = k if name.startswith("sals-index") else None
        impl = "cpu" if name.endswith("-cpu") else "torch"
        if "-mean" in name:
            p = dataclasses.replace(p, pool="mean")
        latent, proj = c["latent"], c["proj"]
        if keys is not None and "-wide" not in name:  # what an index-mode SALSLayer stores: r* columns
            latent, proj = c["latent_index"], c["proj_index"]
        return lambda: sals_decode(q, qc, qs, latent, v, c["pos"], proj, c["r_star"], c["cos"], c["sin"],
                                   p, scaling, keys=keys, buffers=buf, impl=impl)
    if name == "streaming":
        idx = streaming_tokens(length, p.sink, p.k + p.recent, b, hkv)
        return lambda: sparse_gather_decode(q, k, v, idx, scaling, buffers=buf)
    if name == "oracle":
        def oracle():
            s = torch.matmul(q.view(b, hkv, h // hkv, d), k.transpose(-1, -2)).amax(2)
            return sparse_gather_decode(q, k, v, topk_tokens(s, p.k, p.sink, p.recent), scaling, buffers=buf)
        return oracle

    def quest():  # page bounds are kept by the cache, as in Quest; choosing pages is timed
        bound = quest_bounds(q.view(b, hkv, h // hkv, d), c["kmin"], c["kmax"]).amax(2)
        chosen = bound.topk(-(-p.k // 16), dim=-1, sorted=False).indices
        idx, _ = blocks_to_tokens(chosen, 16, length)
        return sparse_gather_decode(q, k, v, idx, scaling, buffers=buf)
    return quest


def _ideal(name: str, c: dict[str, Any]) -> float:
    k, p = c["k"], c["params"]
    hkv, length, d = k.shape[1], k.shape[2], k.shape[3]
    e = k.element_size()
    n = min(length, p.k + p.sink + p.recent)
    dense = 2 * hkv * length * d * e
    read = {
        "sals": length * c["r_star"] * e + hkv * n * (c["r"] + d) * e + hkv * n * 4,
        "sals-index": length * c["r_star"] * e + hkv * n * 2 * d * e,
        "sals-index-mean": length * c["r_star"] * e + hkv * n * 2 * d * e,
        "quest": 2 * hkv * (length // 16) * d * e + hkv * (-(-p.k // 16) * 16) * 2 * d * e,
        "streaming": hkv * n * 2 * d * e,
        "oracle": hkv * length * d * e + hkv * n * d * e,
    }[name.removesuffix("-cpu").removesuffix("-wide")]
    return dense / read


def run_bench(lengths: list[int], methods: list[str], dtype: torch.dtype, repeats: int,
              threads: list[int], huge_pages: bool = True) -> list[dict[str, Any]]:
    from ..kernels.huge_pages import on_huge_pages
    from ..kernels.sparse_decode import dense_grouped_decode
    from ..utils import progress

    heads, kv_heads, d = 32, 8, 128
    scaling = d ** -0.5
    rows = []
    before = torch.get_num_threads()
    try:
        for length in progress(lengths, desc="ATTN-decode"):
            c = _case(length, dtype, heads, kv_heads, d, 0.25, seed=0, huge_pages=huge_pages)
            # what the kernel granted, not what was asked: the share of the K/V cache on 2 MB pages
            huge_share = (on_huge_pages(c["k"]) + on_huge_pages(c["v"])) / (c["k"].nbytes + c["v"].nbytes)
            for nt in threads:
                torch.set_num_threads(nt)
                q, k, v = c["q"], c["k"], c["v"]
                entries = {
                    "sdpa": lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, scale=scaling, enable_gqa=True),
                    "grouped": lambda q=q, k=k, v=v: dense_grouped_decode(q, k, v, scaling),
                }
                entries.update({m: _method_fn(m, c, scaling) for m in methods})
                wall, cpu = interleaved_ms(entries, repeats, warmup=2)
                dense_ms, impl = min((wall["sdpa"], "sdpa"), (wall["grouped"], "grouped"))
                dense_cpu_ms = min(cpu["sdpa"], cpu["grouped"])
                for m in methods:
                    ideal = _ideal(m, c)
                    rows.append({"method": m, "length": length, "threads": nt, "ms": wall[m], "dense_ms": dense_ms,
                                 "dense_impl": impl, "sdpa_ms": wall["sdpa"], "grouped_ms": wall["grouped"],
                                 "ratio": dense_ms / wall[m], "ideal_ratio": ideal,
                                 "achieved": dense_ms / wall[m] / ideal,
                                 "cpu_ms": cpu[m], "dense_cpu_ms": dense_cpu_ms,
                                 "ratio_cpu": dense_cpu_ms / cpu[m], "achieved_cpu": dense_cpu_ms / cpu[m] / ideal,
                                 "kv_on_huge_pages": round(huge_share, 4)})
    finally:
        torch.set_num_threads(before)
    return rows


def huge_page_state() -> dict[str, str | None]:
    """Whether large tensors sit on transparent huge pages: PyTorch's ``THP_MEM_ALLOC_ENABLE`` and the kernel's mode.

    The sparse steps gather scattered 256-byte rows from caches of 100+ MB; with 4 KB pages nearly every row is a
    TLB miss. On the AMD EPYC here ``attend_chosen`` at 32K took 4.69 ms with 4 KB pages and 2.98 ms with
    ``THP_MEM_ALLOC_ENABLE=1`` (kernel mode ``madvise``), so results must say which they ran with (the bench's own
    cache buffers follow ``--cache-pages``, recorded beside this).
    """
    from ..kernels.huge_pages import thp_mode

    return {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "transparent_hugepage": thp_mode()}


def _bench(args: argparse.Namespace) -> int:
    from ..utils import machine_info, parse_dtype

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if args.repeats < 10:
        raise ConfigError("--repeats must be ≥ 10 (ATTN-decode takes the median of at least 10 timed runs)")
    dtype = parse_dtype(args.dtype)
    threads = sorted({torch.get_num_threads(), 1}, reverse=True) if args.threads is None else [args.threads]
    load_before = os.getloadavg()  # on a shared machine, the load says how far to trust the timings
    rows = run_bench(parse_lengths(args.lengths), methods, dtype, args.repeats, threads,
                     huge_pages=args.cache_pages == "huge")
    print_table(rows, ["method", "length", "threads", "ms", "dense_ms", "dense_impl", "ratio", "ideal_ratio",
                       "achieved", "cpu_ms", "dense_cpu_ms", "ratio_cpu", "achieved_cpu"])
    emit_json(args.json, {
        "protocol": "ATTN-decode", "command": "compactlm " + shlex.join(sys.argv[1:]),
        "shapes": {"heads": 32, "kv_heads": 8, "head_dim": 128, "batch": 1},
        "budget": "keep L/8 + sink 16 + recent 64; SALS rank 25% (r=256), r*=128; Quest page 16",
        "timing": "round-robin over dense and every method; ms = median wall, cpu_ms = median process CPU time",
        "results": rows,
        "machine": {**machine_info(dtype), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "huge_pages": {**huge_page_state(), "cache_pages": args.cache_pages}},
    })
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from ..attention.sals_calib import calibrate_sals, save_projections
    from ..data import calibration_set
    from ..models import load
    from ..utils import parse_dtype

    model, tok = load(args.model, dtype=parse_dtype(args.dtype))
    if tok is None:
        raise ConfigError(f"{args.model} has no tokenizer; SALS calibration needs CALIB-pg-512 text")
    calib = calibration_set(tok, "essays", nsamples=args.nsamples, seqlen=512, seed=0)
    meta = {"model": args.model, "calibration": f"CALIB-pg-512 ({args.nsamples}x512)"}
    proj = calibrate_sals(model, calib, meta=meta)
    path = save_projections(proj, args.out)
    width = proj.width
    rows = [{"layer": i, "energy_r25": proj.energy(i, width // 4), "energy_r12.5": proj.energy(i, width // 8)}
            for i in range(proj.eigvecs.shape[0])]
    print_table(rows)
    print(f"saved {path}")
    emit_json(args.json, {"projections": str(path), "layers": rows})
    return 0


def register(groups: dict[str, Any]) -> None:
    p = groups["bench"].add_parser("decode-attention", help="ATTN-decode: SALS and baselines vs the best dense decode")
    add_bench_args(p, lengths="4k,16k,32k,64k", lengths_help="cache lengths (≥ 256)", threads=None,
                   threads_help="one thread count (default: current and 1)", min_repeats=10)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--cache-pages", choices=("huge", "4k"), default="huge",
                   help="cache buffers on 2 MB transparent huge pages as the SALS cache allocates them (default), "
                        "or on 4 KB pages")
    p.set_defaults(func=_bench)

    sals = groups[""].add_parser("sals", help="SALS tools (calibrate the latent projections)")
    sub = sals.add_subparsers(dest="sals_command", required=True, metavar="ACTION")
    c = sub.add_parser("calibrate", help="calibrate per-layer key projections on CALIB-pg-512 and save them")
    add_common(c)
    c.add_argument("--out", required=True, help="a .safetensors path or a model folder")
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences of 512 tokens (default 128)")
    c.set_defaults(func=_calibrate)
