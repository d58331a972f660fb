"""Screen of 2-bit key schemes by teacher-forced answer NLL on RULER-syn prompts (the screen behind int2-mixed).

Per prompt: prefill exactly (full-precision cache), then replace the cached keys of positions
[sinks, T − residual) by their pre-RoPE fake-quantized reconstruction under each scheme (values and the
recent window stay exact, as keys are what uniform int2 loses), and teacher-force the expected answer.
Reported per scheme: mean NLL of the answer tokens and the fraction that are the argmax. A screen, not
the cache: fake quantization in fp32 with fp32 min-max metadata, groups of 32 tokens per channel.

Schemes: ``fp``; uniform ``int2``/``int4``; per-channel bits from the menu {0..4} (or {0,2,4} with ``-024``)
averaging 2 (or ``@1.5``) by importance ``E[q_c²]·range_c²`` with the query term ``measured`` on calibration
essays, from the ``weights`` (``Adapter.query_channel_weights``), or ``ranges`` only; ``pca``: the same
allocation in a query-weighted PCA basis of the calibration keys.

    python benchmarks/kv_key_bits_screen.py --json benchmarks/results/longctx/kv_key_bits_screen.json
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time

import torch
from transformers import DynamicCache

from compactlm.data.calib import tokenize_source
from compactlm.evaluation.ruler import RulerGenerator
from compactlm.kv.key_bits import pair_mean
from compactlm.models import get_adapter, load
from compactlm.utils import machine_info, write_json_atomic

SINKS, RESID, G = 16, 128, 32


def greedy_bits(importance: torch.Tensor, avg: float, menu: tuple[int, ...]) -> torch.Tensor:
    """Reverse water-filling over ``menu`` (steps between consecutive widths), exact total ``avg · n``."""
    bits = torch.full(importance.shape, menu[0], dtype=torch.long)
    err = importance.clone().float()
    for _ in range(int(round((avg - menu[0]) * importance.numel()))):
        step = {b: n - b for b, n in zip(menu, menu[1:], strict=False)}
        gain = torch.tensor([err[c] * (1 - 4.0 ** -step[int(bits[c])]) if int(bits[c]) in step else -1.0
                             for c in range(err.numel())])
        c = int(gain.argmax())
        if gain[c] < 0:
            break
        s = step[int(bits[c])]
        bits[c] += s
        err[c] /= 4.0 ** s
        if int(bits.sum()) >= avg * importance.numel():
            break
    return bits


def fake_quant(x: torch.Tensor, bits) -> torch.Tensor:
    """Min-max fake quantization of (T, D) in groups of G tokens per channel; ``bits`` per channel; 0 = mean."""
    t = x.shape[0]
    xg = x.view(t // G, G, -1)
    mn, mx = xg.amin(1, keepdim=True), xg.amax(1, keepdim=True)
    b = torch.as_tensor(bits).expand(x.shape[-1]).float()
    qmax = (2 ** b - 1).clamp(min=1)
    scale = ((mx - mn) / qmax).clamp(min=1e-8)
    out = ((xg - mn) / scale).round().clamp(torch.zeros_like(qmax), qmax) * scale + mn
    zero = b == 0
    out[..., zero] = xg.mean(1, keepdim=True).expand_as(xg)[..., zero]
    return out.view_as(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="niah_essay,niah_multikey,niah_multivalue,vt")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model, dtype=torch.float32)
    a = get_adapter(model)
    L, H, D, NQ = a.num_layers, a.num_kv_heads, a.head_dim, a.num_heads

    # calibration statistics: pre-RoPE queries and keys on 2,048 essay tokens (CALIB-pg text)
    qs, ks, hooks = {}, {}, []
    for i in range(L):
        attn = a.attention(i)
        hooks.append(attn.q_proj.register_forward_hook(lambda m, i_, o, i=i: qs.__setitem__(i, o.detach()[0])))
        hooks.append(attn.k_proj.register_forward_hook(lambda m, i_, o, i=i: ks.__setitem__(i, o.detach()[0])))
    with torch.no_grad():
        model(tokenize_source(tok, "essays")[:2048][None])
    for h in hooks:
        h.remove()
    stats = {}
    for i in range(L):
        q, k = qs[i].view(-1, NQ, D), ks[i].view(-1, H, D)
        wq = a.query_channel_weights(i)
        for h in range(H):
            measured = pair_mean((q[:, h * (NQ // H):(h + 1) * (NQ // H)].reshape(-1, D) ** 2).mean(0))
            kg = k[: (k.shape[0] // G) * G, h].reshape(-1, G, D)
            rng = (kg.amax(1) - kg.amin(1)).pow(2).mean(0)
            kc = (kg - kg.mean(1, keepdim=True)).reshape(-1, D) * measured.sqrt()
            evecs = torch.linalg.eigh(kc.T @ kc / kc.shape[0])[1].flip(-1)
            zg = ((kg * measured.sqrt()) @ evecs)
            stats[i, h] = dict(measured=measured, weights=pair_mean(wq[h]), rng=rng, evecs=evecs,
                               pca_rng=(zg.amax(1) - zg.amin(1)).pow(2).mean(0))
    allocations: dict[tuple[str, int, int], torch.Tensor] = {}  # widths depend on calibration only: once each

    def keys_for(name: str, k: torch.Tensor, i: int, h: int) -> torch.Tensor:
        s = stats[i, h]
        base, _, avg = name.partition("@")
        avg = float(avg) if avg else 2.0
        if base in ("int2", "int4"):
            return fake_quant(k, int(base[3]))
        if (name, i, h) not in allocations:
            source, _, menu = base.partition("-")
            imp = s["pca_rng"] if source == "pca" else s["rng"] if source == "ranges" else s[source] * s["rng"]
            allocations[name, i, h] = greedy_bits(imp, avg, (0, 2, 4) if menu == "024" else (0, 1, 2, 3, 4))
        bits = allocations[name, i, h]
        if base == "pca":
            sw, v = s["measured"].sqrt(), s["evecs"]
            return (fake_quant((k * sw) @ v, bits) @ v.T) / sw
        return fake_quant(k, bits)

    schemes = ["fp", "int2", "int4", "measured", "weights", "ranges", "weights-024", "weights@1.5", "pca"]
    gen = RulerGenerator(tok)
    res: dict[str, list] = {s: [] for s in schemes}
    t0 = time.process_time()
    for task in args.tasks.split(","):
        for idx in range(args.samples):
            smp = gen.sample(task, args.length, idx, 5)
            ids = torch.tensor(smp.input_ids)[None]
            ans = tok(" " + ", ".join(smp.answers) + ".", add_special_tokens=False)["input_ids"]
            t = ids.shape[1]
            end = SINKS + ((t - SINKS - RESID) // G) * G
            cos, sin = a.rotary(torch.zeros(1, 1, D), torch.arange(SINKS, end)[None])
            with torch.no_grad():
                cache = DynamicCache(config=model.config)
                model(ids, cache=cache, use_cache=True)
                for name in schemes:
                    c2 = copy.deepcopy(cache)
                    if name != "fp":
                        for i in range(L):
                            layer = c2.layers[i]
                            post = layer.keys[:, :, SINKS:end].float()  # (1, H, n, D)
                            pre = a.apply_rotary(post, post, cos, -sin)[1][0]  # un-rotate
                            rec = torch.stack([keys_for(name, pre[h], i, h) for h in range(H)])
                            k = layer.keys.clone()
                            k[:, :, SINKS:end] = a.apply_rotary(rec[None], rec[None], cos, sin)[1].to(k.dtype)
                            layer.keys = k
                    c2.crop(-1)  # re-feed the last prompt token so the first answer token sees the quantized keys
                    logits = model(torch.tensor([[smp.input_ids[-1]] + ans[:-1]]), cache=c2).logits[0].float()
                    target = torch.tensor(ans)
                    nll = -torch.log_softmax(logits, -1)[torch.arange(len(ans)), target].mean().item()
                    res[name].append({"task": task, "index": idx, "nll": nll,
                                      "top1": (logits.argmax(-1) == target).float().mean().item()})
            print(task, idx, {n: round(res[n][-1]["nll"], 3) for n in schemes}, flush=True)
    summary = {n: {"nll": sum(r["nll"] for r in v) / len(v), "top1": sum(r["top1"] for r in v) / len(v)}
               for n, v in res.items()}
    for n, v in summary.items():
        print(f"{n:12s} nll {v['nll']:.4f}  top1 {v['top1']:.3f}")
    if args.json:
        write_json_atomic(args.json, {"benchmark": "2-bit key schemes, teacher-forced answer NLL", "summary": summary,
                                      "records": res, "cpu_seconds": time.process_time() - t0,
                                      "command": "python " + shlex.join(sys.argv), "machine": machine_info("fp32")})


if __name__ == "__main__":
    main()
