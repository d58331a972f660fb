"""APTQ's objective in isolation: attention-output error of one layer's quantized q/k/v on the default model.

For decoder layer ``--layer`` (default 0), q/k/v are quantized from real calibration activations
(CALIB-pg-512 sequences) by RTN, GPTQ (Hessian ``2XXᵀ``) and GPTQ with APTQ's attention-aware
Hessians (:func:`compactlm.quant.aptq.attention_stats`), at each bit width; the error is measured on
held-out text (PPL-wiki-512 windows) at the attention output (softmax included, before o_proj):
``‖O(Ŵ) − O(W)‖² / ‖O(W)‖²``, and at the linear outputs. Only the layer's own inputs are needed, so
this runs in seconds where the full-model benchmark needs a calibration pass over every layer.

    .venv/bin/python benchmarks/quant_attention_error.py --json benchmarks/results/quant/attention_error.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import compactlm
from compactlm.data import calibration_set, eval_windows
from compactlm.models import get_adapter
from compactlm.primitives.hessian import HessianAccumulator
from compactlm.primitives.quant import QuantSpec, dequantize, rtn
from compactlm.quant.aptq import attention_stats
from compactlm.quant.gptq import GPTQ, solve_rows
from compactlm.utils import machine_info, write_json_atomic


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model, adapter, ids, layer):
    """The inputs of layer ``layer``'s q_proj (normed hidden states) for ``ids``; stops the forward there."""
    got = []

    def hook(_m, args):
        got.append(args[0].detach())
        raise _Stop

    h = adapter.attention(layer).get_submodule(adapter.family.q).register_forward_pre_hook(hook)
    try:
        for b in ids.split(4):
            try:
                model(input_ids=b, use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(got)  # (N, T, hidden)


@torch.no_grad()
def attention(adapter, layer, x, wq, wk, wv):
    B, T, _ = x.shape
    H, Hkv, D = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    q = (x @ wq.t()).view(B, T, H, D).transpose(1, 2)
    k = (x @ wk.t()).view(B, T, Hkv, D).transpose(1, 2)
    v = (x @ wv.t()).view(B, T, Hkv, D).transpose(1, 2)
    cos, sin = adapter.rotary(x, torch.arange(T).unsqueeze(0), layer)
    q, k = adapter.apply_rotary(q, k, cos, sin)
    return q, k, v, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = compactlm.models.load("smollm2-135m")
    adapter = get_adapter(model)
    attn = adapter.attention(args.layer)
    f = adapter.family
    W = {n: getattr(attn, getattr(f, n)).weight.detach().float() for n in ("q", "k", "v")}
    xc = layer_inputs(model, adapter, calibration_set(tok, "essays", args.calib_samples, 512), args.layer)
    xe = layer_inputs(model, adapter, eval_windows(tok, "wiki", 512, args.eval_windows), args.layer)
    start = time.perf_counter()
    # Hessians: plain 2XXᵀ, and APTQ's per-head attention-aware ones from the same calibration batches.
    plain = HessianAccumulator(xc.shape[-1])
    heads = {"q": adapter.num_heads, "k": adapter.num_kv_heads, "v": adapter.num_kv_heads}
    aware = {n: [HessianAccumulator(xc.shape[-1]) for _ in range(h)] for n, h in heads.items()}
    gen = torch.Generator().manual_seed(0)
    for xb in xc.split(4):
        plain.add(xb)
        q, k, v, _ = attention(adapter, args.layer, xb, W["q"], W["k"], W["v"])
        wq, wk, xv = attention_stats(xb, q, k, v, None, adapter.head_dim**-0.5, 8, gen)
        x2 = xb.reshape(-1, xb.shape[-1])
        for h, acc in enumerate(aware["q"]):
            acc.add(x2 * wq[h].sqrt().unsqueeze(-1))
        for g in range(adapter.num_kv_heads):
            aware["k"][g].add(x2 * wk[g].clamp(min=0).sqrt().unsqueeze(-1))
            aware["v"][g].add(torch.cat(xv[g]) * len(xv[g]) ** 0.5)
    stats_seconds = time.perf_counter() - start
    *_, ref = attention(adapter, args.layer, xe, W["q"], W["k"], W["v"])
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        spec = QuantSpec(bits=bits, group_size=64)
        cfg = GPTQ(bits=bits, group_size=64)
        for method in ("RTN", "GPTQ", "GPTQ + APTQ attention-aware Hessians"):
            t = time.perf_counter()
            Wq = {}
            for n in ("q", "k", "v"):
                if method == "RTN":
                    Wq[n] = dequantize(*rtn(W[n], spec))
                else:
                    H = plain.H if method == "GPTQ" else [a.H for a in aware[n]]
                    Wq[n] = solve_rows(W[n], H, spec, cfg, None, f"layer{args.layer}.{n}").weight
            *_, out = attention(adapter, args.layer, xe, Wq["q"], Wq["k"], Wq["v"])
            rel = float((out - ref).pow(2).sum() / ref.pow(2).sum())
            lin = {n: float((xe @ (W[n] - Wq[n]).t()).pow(2).sum() / (xe @ W[n].t()).pow(2).sum()) for n in W}
            rows.append({"bits": bits, "method": method, "attn_output_rel_error": rel,
                         "linear_output_rel_error": lin, "solve_seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
    write_json_atomic(args.json, {
        "benchmark": "quant_attention_error", "model": "smollm2-135m", "layer": args.layer, "group_size": 64,
        "calibration": f"CALIB-pg-512 sequences, first {args.calib_samples}",
        "evaluation": f"first {args.eval_windows} PPL-wiki-512 windows, attention output before o_proj",
        "attention_stats_seconds": stats_seconds, "rows": rows,
        "command": " ".join(["python", *sys.argv]),
        "machine": {**machine_info(torch.float32), "note": "shared 2-core machine under heavy load"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
