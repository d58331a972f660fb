"""SALS ``index`` mode on the default model: r*-column latent (runtime) vs the stored-r layout it replaced.

One 2,048-token PPL-wiki window is prefilled densely once; copies of that cache are converted the way the runners
do (``make_cache``) in both layouts (the stored-r one by building the layers without ``score_dims``, as the cache
did before 5 Dec 2026). Reports KV bytes per token (all 30 layers; 0, 1, 29 dense), the process CPU time of the
conversion (which projects every cached key: r* columns now, r before; interleaved, median of ``--repeats``),
and decodes ``--new`` greedy tokens under each layout, checking that every decode step chose the same slots and
gave the same logits.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/attn_decode/index_narrow_check.py \\
        --json benchmarks/results/attn_decode/index_narrow_check_epyc.json
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
from contextlib import ExitStack
from unittest import mock

import torch

from compactlm.attention import sals as sals_mod
from compactlm.attention import sals_cache
from compactlm.attention.decode_common import RopeTable
from compactlm.attention.sals import SALSConfig, sals_method
from compactlm.attention.sals_cache import SALSLayer, kv_bytes_per_token
from compactlm.attention.sals_calib import ensure_projections, projections_for
from compactlm.cli.common import print_table
from compactlm.data import eval_windows
from compactlm.evaluation.generate import prefill
from compactlm.models import get_adapter, load
from compactlm.utils import machine_info, write_json_atomic


class WideLayer(SALSLayer):
    """The stored-r layout: an index-mode layer keeping all r latent columns (no ``score_dims``)."""

    def __init__(self, *args, score_dims=None, **kwargs):
        super().__init__(*args, **kwargs)


def layout(wide: bool) -> ExitStack:
    stack = ExitStack()
    if wide:
        stack.enter_context(mock.patch.object(sals_cache, "SALSLayer", WideLayer))
    return stack


def decode(model, method, cache, first: torch.Tensor, steps: int):
    """Greedy decode from ``first`` (B, 1); every SALS step's chosen slots and the logits."""
    chosen, logits = [], []
    inner = sals_mod.sals_decode

    def recording(*args, **kwargs):
        out, idx = inner(*args, **kwargs)
        chosen.append(idx.clone())
        return out, idx

    tok = first
    with torch.no_grad(), mock.patch.object(sals_mod, "sals_decode", recording), method.attach(model):
        for _ in range(steps):
            out = model(tok, cache=cache).logits[:, -1]
            logits.append(out.clone())
            tok = out.argmax(-1, keepdim=True)
    return chosen, torch.stack(logits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    model, tok = load("smollm2-135m", dtype=args.dtype)
    ensure_projections(model, tok)
    ids = eval_windows(tok, "wiki", seqlen=args.seqlen, windows=1)
    with torch.no_grad():
        dense, logits = prefill(model, ids)
    first = logits.argmax(-1, keepdim=True)  # (1, 1): the first generated token
    full = kv_bytes_per_token(dense)
    cfg = SALSConfig(rank=0.25, mode="index")
    method = sals_method(model, cfg, "sals-index")
    rows, caches, cpu = [{"cache": "full (DynamicCache)", "bytes_per_token": full, "vs_full": 1.0}], {}, {}
    names = {False: "sals-25% index, r* = 24 latent columns (runtime)", True: "sals-25% index, r = 48 columns (before)"}
    for wide in (False, True):
        with layout(wide):
            caches[wide] = method.make_cache(model, copy.deepcopy(dense))
        b = kv_bytes_per_token(caches[wide])
        rows.append({"cache": names[wide], "bytes_per_token": b, "vs_full": b / full})
    adapter = get_adapter(model)
    rope, sparse, proj = RopeTable(adapter), cfg.sparse_layers(adapter.num_layers), projections_for(model, None)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved: the same load for both layouts
        for wide in (False, True):
            src = copy.deepcopy(dense)  # untimed: only the conversion (unrope + projection + copies) is timed
            with layout(wide):
                t0 = time.process_time()
                sals_cache.convert_cache(src, adapter, cfg, proj, rope, sparse)
                times[wide].append(time.process_time() - t0)
    for wide in (False, True):
        cpu[names[wide]] = statistics.median(times[wide]) * 1e3
    proj_ms = projection_ms(caches, dense, max(args.repeats, 11))
    res = {}
    for wide in (False, True):
        with layout(wide):
            res[wide] = decode(model, method, caches[wide], first, args.new)
    same_sel = all(torch.equal(a, b) for a, b in zip(res[False][0], res[True][0], strict=True))
    same_logits = torch.equal(res[False][1], res[True][1])
    latent_equal = [torch.equal(caches[False].layers[i].latent_view(), caches[True].layers[i].latent_view()[..., :24])
                    for i in method_sparse(caches[False])]
    print_table(rows)
    print(f"conversion CPU ms (median of {args.repeats}): {cpu}")
    print(f"projection einsum alone, CPU ms (median): {proj_ms}")
    print(f"decode steps x layers: {len(res[False][0])}; same selections: {same_sel}; same logits: {same_logits}; "
          f"latent bit-identical in {sum(latent_equal)} of {len(latent_equal)} layers")
    if args.json:
        write_json_atomic(args.json, {
            "model": "smollm2-135m", "dtype": args.dtype, "prefill_tokens": int(ids.shape[1]),
            "config": "SALSConfig(rank=0.25, mode='index'): r = 48, r* = 24 (score_dims 0.5), layers 2-28 sparse",
            "results": rows, "conversion_cpu_ms_median": cpu, "conversion_repeats": args.repeats,
            "projection_cpu_ms_median": proj_ms,
            "decode": {"new_tokens": args.new, "sals_steps": len(res[False][0]), "same_selections": same_sel,
                       "same_logits": same_logits, "latent_bit_identical_layers": sum(latent_equal),
                       "sparse_layers": len(latent_equal)},
            "command": "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv),
            "machine": {**machine_info(args.dtype), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        })


def projection_ms(caches, dense, repeats: int) -> dict[str, float]:
    """CPU ms of the update-time projection alone (the einsum of ``SALSLayer.update``), one layer, both widths:
    the prompt's pre-RoPE-sized keys (all tokens) and one decode token; interleaved, median of ``repeats``."""
    i = method_sparse(caches[False])[0]
    keys = dense.layers[i].keys.float()  # (1, n_kv, T, d): the einsum costs the same on any values of this shape
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        for wide in (False, True):
            p = caches[wide].layers[i].proj_f32
            for name, k, n in (("prompt", keys, 1), ("decode token", keys[:, :, -1:], 200)):
                t0 = time.process_time()
                for _ in range(n):
                    torch.einsum("bhtd,hdr->btr", k, p)
                out.setdefault(f"{name}, r={p.shape[-1]}", []).append((time.process_time() - t0) / n * 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


def method_sparse(cache) -> list[int]:
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, SALSLayer)]


if __name__ == "__main__":
    main()
