"""Screen of the int2-mixed cache's metadata formats by teacher-forced answer NLL on RULER-syn prompts.

Per prompt: prefill exactly (full-precision cache), then replace the cached keys and values of positions
[sinks, T − residual) by their reconstruction through the cache's own quantizers (``MixedKeyStore`` with the
per-channel key bits of ``--kv int2-mixed``, ``QuantizedKV`` for values) under each variant, and teacher-force the
expected answer. Reports per variant the mean answer NLL and the fraction of answer tokens that are the argmax.
Variants: the key / value metadata format (``m4`` 1-byte, ``m8`` 2-byte, ``fp16``), a 1-byte base per block of
tokens (``-b1024``), other 1-byte value grids (:class:`compactlm.kv.fit.Meta4Grid`), clipping search, value
groups of 64. A screen: it measures what the store's reconstruction costs; the sink and recent tokens are exact.

    python benchmarks/kv_meta_screen.py --length 4096 --samples 3 --variants fp,m4,k4v8 --json PATH
"""
import argparse
import copy
import shlex
import sys
import time

import torch
from transformers import DynamicCache

from compactlm.evaluation.ruler import RulerGenerator
from compactlm.kv import fit
from compactlm.kv.key_bits import MixedKeyStore, channel_bits
from compactlm.kv.quantizer import META4, META8, QuantizedKV
from compactlm.models import get_adapter, load
from compactlm.utils import machine_info, write_json_atomic

DEFAULT_GRID = fit.VALUE_GRID

SINKS, RESID, G = 16, 128, 32
CLIP = [False]
VG = [32]

def store_fake(k, v, qw, key_meta, val_meta, block, vblock):
    """k, v: (1,H,m,D) store part -> dequantized k, v."""
    bits = channel_bits(qw, k, G, 2)
    m = k.shape[-2]
    outs = []
    step = block or m
    for s in range(0, m, step):
        st = MixedKeyStore.quantize(k[..., s:s+step, :], bits, G, key_meta, None, CLIP[0], None)
        outs.append(st.dequantize(torch.float32))
    kq = torch.cat(outs, -2)
    vouts = []
    step = vblock or m
    for s in range(0, m, step):
        qv = QuantizedKV.quantize(v[..., s:s+step, :], 2, VG[0], -1, val_meta, None, CLIP[0], None)
        vouts.append(qv.dequantize(torch.float32))
    return kq, torch.cat(vouts, -2)

VARIANTS = {
    "fp": None,
    "m4": (META4, META4, 0, 0),
    "m8": (META8, META8, 0, 0),
    "fp16": (torch.float16, torch.float16, 0, 0),
    "m4k-b2048": (META4, META4, 2048, 0),
    "m4k-b1024": (META4, META4, 1024, 0),
    "m4k-b1024-v1024": (META4, META4, 1024, 1024),
    "v-cover": (META4, META4, 0, 0, fit.Meta4Grid(4, 4, 11, 0.2, True)),
    "m8-clip": (META8, META8, 0, 0, None, None, True),
    "vg-4-9": (META4, META4, 0, 0, fit.Meta4Grid(4, 4, 9, 0.2, False)),
    "vg-3-8": (META4, META4, 0, 0, fit.Meta4Grid(4, 3, 8, 0.2, False)),
    "vg-3-7": (META4, META4, 0, 0, fit.Meta4Grid(4, 3, 7, 0.2, False)),
    "vg-2-5": (META4, META4, 0, 0, fit.Meta4Grid(4, 2, 5, 0.2, False)),
    "k8v4": (META8, META4, 0, 0),
    "k4v8": (META4, META8, 0, 0),
    "v5c": (META4, META4, 0, 0, fit.Meta4Grid(5, 8, 20, 0.4, True)),
    "v5f": (META4, META4, 0, 0, fit.Meta4Grid(5, 8, 20, 0.4, False)),
    "v5c6": (META4, META4, 0, 0, fit.Meta4Grid(5, 6, 16, 0.4, True)),
    "k4v8g64": (META4, META8, 0, 0, None, None, False, 64),
    "v-unweighted": (META4, META4, 0, 0, fit.Meta4Grid(4, 4, 11, 0.2, False, False)),


}

ap = argparse.ArgumentParser()
ap.add_argument("--length", type=int, default=4096)
ap.add_argument("--samples", type=int, default=2)
ap.add_argument("--tasks",
                default="niah_single,niah_essay,niah_multikey,niah_multivalue,niah_multiquery,vt,fwe,passkey")
ap.add_argument("--variants", default=",".join(VARIANTS))
ap.add_argument("--json")
args = ap.parse_args()
torch.set_num_threads(1)
model, tok = load("smollm2-135m", dtype=torch.bfloat16)
a = get_adapter(model)
L = a.num_layers
qws = [a.query_channel_weights(i) for i in range(L)]
gen = RulerGenerator(tok)
names = args.variants.split(",")
res = {n: [] for n in names}
t0 = time.process_time()
for task in args.tasks.split(","):
    for idx in range(args.samples):
        smp = gen.sample(task, args.length, idx, args.samples)
        ids = torch.tensor(smp.input_ids)[None]
        ans = tok(" " + ", ".join(smp.answers) + ".", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(ids[:, :-1], past_key_values=cache, use_cache=True)
            t = ids.shape[1] - 1
            m = ((t - SINKS - RESID) // G) * G
            for name in names:
                c2 = copy.deepcopy(cache)
                if VARIANTS[name] is not None:
                    km, vm, blk, vblk, *grid = VARIANTS[name]
                    fit.VALUE_GRID = grid[0] if grid and grid[0] is not None else DEFAULT_GRID
                    CLIP[0] = grid[2] if len(grid) > 2 else False
                    VG[0] = grid[3] if len(grid) > 3 else 32
                    for i in range(L):
                        layer = c2.layers[i]
                        k, v = layer.keys, layer.values
                        kq, vq = store_fake(k[..., SINKS:SINKS + m, :].float(), v[..., SINKS:SINKS + m, :].float(),
                                            qws[i], km, vm, blk, vblk)
                        k, v = k.clone(), v.clone()
                        k[..., SINKS:SINKS + m, :] = kq.to(k.dtype)
                        v[..., SINKS:SINKS + m, :] = vq.to(v.dtype)
                        layer.keys, layer.values = k, v
                inp = torch.tensor([[smp.input_ids[-1]] + ans[:-1]])
                logits = model(inp, past_key_values=c2, use_cache=True).logits[0].float()
                target = torch.tensor(ans)
                nll = -torch.log_softmax(logits, -1)[torch.arange(len(ans)), target].mean().item()
                res[name].append({"task": task, "index": idx, "nll": nll,
                                  "top1": (logits.argmax(-1) == target).float().mean().item()})
        print(task, idx, {n: round(res[n][-1]["nll"], 3) for n in names}, round(time.process_time() - t0), flush=True)
summary = {n: {"nll": sum(r["nll"] for r in v) / len(v), "top1": sum(r["top1"] for r in v) / len(v)}
           for n, v in res.items()}
for n, v in summary.items():
    print(f"{n:18s} nll {v['nll']:.4f} top1 {v['top1']:.3f}")
if args.json:
    write_json_atomic(args.json, {"benchmark": "int2-mixed metadata variants, teacher-forced answer NLL",
                                  "length": args.length, "samples": args.samples, "summary": summary, "records": res,
                                  "cpu_seconds": time.process_time() - t0,
                                  "command": "python " + shlex.join(sys.argv), "machine": machine_info("bf16")})
