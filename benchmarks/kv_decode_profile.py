"""Where one decode step's attention over the quantized KV cache spends its CPU time, layer by layer.

Fills the default model's cache by a real prefill of ``--context`` wiki tokens (or loads one saved by an
earlier run with ``--cache-file``), converts it to ``--kv`` (default: the recommended ``int2-mixed``), then for
every layer times :func:`quantized_decode_attention` on a random query (the model's query-head count, bf16),
and the same computation split into its stages, each timed in thread CPU time (``time.thread_time``):

- ``key_unpack``: packed key codes -> code tensor, per width class (``unpack_codes``)
- ``key_meta``: the stored metadata -> float scale and zero (``decode_meta``: 1-byte or 2-byte formats)
- ``key_dequant``: codes·scale + zero, the 0-bit class's group means, scattering the classes back into
  channel order (``index_copy_``) and the head permute
- ``score_gemm``: ``q @ k^T`` per KV head
- ``value_unpack`` / ``value_meta`` / ``value_fold``: the same for the values (``_folded_values``)
- ``softmax``: the online-softmax update around them (running max, exp, sums, rescale)

and ``torch.profiler``'s self CPU time and call count per aten op over one step's 30 layers. ``--paths``
names the paths of ``quantized_decode_attention(..., path=...)`` timed side by side, so the same script
profiles the ``"folded"`` path beside the ``"chunked"`` one (the stages are those of ``"chunked"``).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/kv_decode_profile.py --context 8192 --threads 1 \
        --cache-file /tmp/kv8k_wiki.pt --json benchmarks/results/kv/kv_decode_profile_8k_int2_mixed.json
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import sys
import time

import torch

from compactlm.kv import KVQuant, QuantizedKVCache, quantized_decode_attention
from compactlm.kv.attention import _Online
from compactlm.kv.demo_step import prefill_cache_saved
from compactlm.kv.key_bits import MixedKeyStore
from compactlm.kv.quantizer import decode_meta, unpack_codes, unpack_to
from compactlm.kv.runtime import PRESETS
from compactlm.models import get_adapter, load
from compactlm.utils import machine_info, write_json_atomic

STAGES = ("key_unpack", "key_meta", "key_dequant", "score_gemm", "value_unpack", "value_meta", "value_fold",
          "softmax")



class Clock:
    """Accumulates thread CPU seconds per stage: ``with clock("name"): ...``."""

    def __init__(self):
        self.total: dict[str, float] = collections.defaultdict(float)
        self.name = ""

    def __call__(self, name: str) -> Clock:
        self.name = name
        return self

    def __enter__(self) -> None:
        self.t0 = time.thread_time()

    def __exit__(self, *exc) -> None:
        self.total[self.name] += time.thread_time() - self.t0


def staged_attention(query, layer, scaling: float, clock: Clock) -> torch.Tensor:
    """The ``"chunked"`` (dequantize-then-matmul) path of ``quantized_decode_attention`` for mixed keys, stage by stage.

    Same ops as ``MixedKeyStore.dequantize`` + ``q @ k^T`` + ``_folded_values`` + ``_Online.add``; no mask, Tq = 1.
    """
    b, h, tq, d = query.shape
    hkv = layer.keys.shape[1]
    dt = query.dtype
    q = query.reshape(b, hkv, (h // hkv) * tq, d) * scaling
    acc = _Online(q)
    qk: MixedKeyStore = layer.qk
    qv = layer.qv
    g, gv = qk.group_size, qv.group_size
    with clock("softmax"):
        acc.add((q @ layer.sink_k.transpose(-1, -2)).float(), layer.sink_v)
    for start in range(0, layer.quantized_length, layer.cfg.chunk_tokens):
        end = min(start + layer.cfg.chunk_tokens, layer.quantized_length)
        t, rows = end - start, slice(start // g, end // g)
        out = torch.empty(b, 1, t, qk.heads * qk.head_dim, dtype=dt)
        for w, store in qk.stores.items():
            idx = qk.channels[w]
            with clock("key_unpack"):
                codes = unpack_codes(store.packed[..., start:end, :], store.bits)
            with clock("key_meta"):
                s, z = decode_meta(store.scale[..., rows, :], store._zero_rows(rows), dt)
            with clock("key_dequant"):
                s = torch.where(s > 0, s, torch.ones_like(s))
                x = (codes.to(dt).reshape(b, 1, t // g, g, -1) * s.unsqueeze(-2) + z.unsqueeze(-2)).reshape(b, 1, t, -1)
                out.index_copy_(-1, idx, x[..., : idx.numel()])
        with clock("key_dequant"):
            if qk.means is not None:
                out.index_copy_(-1, qk.channels[0], qk.means[..., rows, :].to(dt).repeat_interleave(g, -2))
            k = out.view(b, t, qk.heads, qk.head_dim).permute(0, 2, 1, 3)
        with clock("score_gemm"):
            scores = (q @ k.transpose(-1, -2)).float()
        with clock("softmax"):  # _Online.add, with p @ V split out below
            scores = scores.float()
            m_new = torch.maximum(acc.m, scores.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(scores - safe)
            corr = torch.exp(acc.m - safe)
            acc.s = acc.s * corr + p.sum(-1, keepdim=True)
        with clock("value_unpack"):
            vcodes = unpack_to(qv.packed[..., start:end, :], qv.bits, dt)  # (B, H, C, D)
        with clock("value_meta"):
            scale, zero = qv.meta(start, end, dt)  # (B, H, C, D/Gv)
        with clock("value_fold"):  # _folded_values after its unpack and metadata decode
            n = p.shape[2]
            pd = p.to(dt)
            ps = pd.unsqueeze(2) * scale.permute(0, 1, 3, 2).unsqueeze(3)
            cv = vcodes.view(b, hkv, t, d // gv, gv).permute(0, 1, 3, 2, 4)
            o = (ps @ cv).float().permute(0, 1, 3, 2, 4)
            pv = (o + (pd @ zero).float().unsqueeze(-1)).reshape(b, hkv, n, d)
        with clock("softmax"):
            acc.acc = acc.acc * corr + pv
            acc.m = m_new
    with clock("softmax"):
        acc.add((q @ layer.keys.to(dt).transpose(-1, -2)).float(), layer.values.to(dt))
        return acc.result().reshape(b, h, tq, d).transpose(1, 2).to(dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="timed passes over all layers (after one warm-up)")
    ap.add_argument("--kv", default="int2-mixed", help="'int2-mixed' or a KVQuant JSON dict")
    ap.add_argument("--paths", default="chunked,folded",
                    help="comma-separated paths of quantized_decode_attention to time (attention.PATHS)")
    ap.add_argument("--cache-file", default=None, help="save/load the prefilled full-precision cache here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, dtype=args.dtype)
    load_before = os.getloadavg()
    cfg = (KVQuant(bits=2, **PRESETS["int2-mixed"]) if args.kv == "int2-mixed"
           else KVQuant.from_dict(__import__("json").loads(args.kv)))
    full = prefill_cache_saved(model, tokenizer, args.context, args.cache_file)
    cache = QuantizedKVCache.from_cache(model, cfg, full)
    a = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    queries = [torch.randn(1, a.num_heads, 1, a.head_dim, generator=gen).to(torch.bfloat16)
               for _ in range(a.num_layers)]
    scaling = a.head_dim ** -0.5
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]

    def attend(path, i):
        return quantized_decode_attention(queries[i], cache.layers[i], scaling, path=path)

    per_layer = {p: [0.0] * a.num_layers for p in paths}
    clock = Clock()
    with torch.no_grad():
        for rep in range(args.reps + 1):  # rep 0 warms up
            for i, layer in enumerate(cache.layers):
                for p in paths:
                    t0 = time.thread_time()
                    attend(p, i)
                    if rep:
                        per_layer[p][i] += (time.thread_time() - t0) / args.reps
                if rep and isinstance(layer.qk, MixedKeyStore) and not cfg.pre_rope:
                    staged_attention(queries[i], layer, scaling, clock)
        # op counts and self CPU time per aten op over one step (all layers), each path
        ops = {}
        for p in paths:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for i in range(a.num_layers):
                    attend(p, i)
            table = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            ops[p] = {"op_calls_per_step": sum(e.count for e in table),
                      "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                                  for e in table[:15]]}
    stages = {k: 1e3 * clock.total[k] / args.reps for k in STAGES}
    qk = cache.layers[0].qk
    classes = ({w: int(idx.numel()) for w, idx in qk.channels.items()} if isinstance(qk, MixedKeyStore) else None)
    out = {"benchmark": "quantized decode attention profile (one step, all layers)", "model": args.model,
           "dtype": args.dtype, "context": args.context, "threads": args.threads, "reps": args.reps,
           "kv_quant": cfg.to_dict(), "quantized_tokens_per_layer": cache.layers[0].quantized_length,
           "chunk_tokens": cfg.chunk_tokens, "layer0_channels_per_width": classes,
           "attention_cpu_ms_per_step": {p: 1e3 * sum(v) for p, v in per_layer.items()},
           "attention_cpu_ms_per_layer": {p: [1e3 * x for x in v] for p, v in per_layer.items()},
           "chunked_path_stages_cpu_ms_per_step": stages, "chunked_path_stages_sum_ms": sum(stages.values()),
           "ops": ops,
           "note": "thread CPU time; stage timers add their own overhead (their sum is above the untimed total)",
           "command": "python " + shlex.join(sys.argv), "machine": machine_info(args.dtype),
           "loadavg_before_after": [load_before, os.getloadavg()]}
    for p, v in out["attention_cpu_ms_per_step"].items():
        print(f"path {p}: {v:.1f} CPU ms per step of attention ({args.reps} reps)")
    for k, v in stages.items():
        print(f"  {k:14s} {v:7.1f} ms")
    for p, o in ops.items():
        print(p, o["op_calls_per_step"], "op calls;", [(t["op"], t["calls"], round(t["self_cpu_ms"], 1))
                                                       for t in o["top_ops"][:8]])
    if args.json:
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
