"""Quick proxy screen of KV-cache settings: key/value reconstruction error and decode KL vs the full cache.

Prefills the first ``--prefix`` tokens of PPL-decode-q window ``--window`` once (full attention, bf16 cache),
converts a copy into each ``--kv`` setting, then

- reconstruction: relative squared error of the keys (post-RoPE, as attended) and values of the quantized
  part, summed over layers (‖K̂ − K‖² / ‖K‖² over the tokens the store holds);
- decode: ``--decoded`` teacher-forced tokens through each setting's decode path, mean KL(full ‖ setting) of
  the next-token distributions and the NLL of the true tokens (a much smaller sample than PPL-decode-q:
  a screen to choose what to run there, not a result);
- bytes per token held after the prefill (every tensor, as ``kv_bytes``).

    OMP_NUM_THREADS=1 python benchmarks/kv_fit_screen.py --kv 'int2@sinks=16@pre_rope=true@meta_dtype=int8,...' \
        --json benchmarks/results/kv_fit_screen_w0.json
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from compactlm.config import parse_spec
from compactlm.data.calib import eval_windows
from compactlm.evaluation.generate import decode_step, prefill
from compactlm.evaluation.methods import build_method
from compactlm.kv import QuantizedKVCache, full_cache_bytes
from compactlm.models import load
from compactlm.utils import machine_info, write_json_atomic


def recon_error(model, cfg, full) -> tuple[float, float]:
    """Relative squared error of the quantized store's keys and values against the prefill's."""
    q = QuantizedKVCache.from_cache(model, cfg, full)
    num_k = num_v = den_k = den_v = 0.0
    for ql, fl in zip(q.layers, full.layers, strict=True):
        if ql.qk is None:
            continue
        s, n = ql.sink_k.shape[-2], ql.quantized_length
        k = fl.keys[..., s: s + n, :].float()
        v = fl.values[..., s: s + n, :].float()
        num_k += (ql.dequantized_keys(0, n, torch.float32) - k).square().sum().item()
        num_v += (ql.dequantized_values(0, n, torch.float32) - v).square().sum().item()
        den_k += k.square().sum().item()
        den_v += v.square().sum().item()
    return num_k / den_k, num_v / den_v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--kv", required=True, help="comma-separated kv specs, e.g. int2@sinks=16@meta_dtype=int8")
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--prefix", type=int, default=3840)
    ap.add_argument("--decoded", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", default="", help="experiments: NAME=VALUE,... module constants of compactlm.kv.fit")
    args = ap.parse_args()
    from compactlm.kv import fit

    for item in (x for x in args.set.split(",") if x):
        key, value = item.split("=")
        setattr(fit, key, type(getattr(fit, key))(value))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tok = load(args.model, dtype=args.dtype)
    ids = eval_windows(tok, "wiki", seqlen=4096, windows=args.window + 1)[args.window][None]
    pre, rest = ids[:, : args.prefix], ids[:, args.prefix: args.prefix + args.decoded + 1]
    with torch.no_grad():
        full, last = prefill(model, pre)
        ref_logits = [last]
        cache = copy.deepcopy(full)
        for t in range(rest.size(1) - 1):
            cache, lg = decode_step(model, rest[:, t: t + 1], cache)
            ref_logits.append(lg)
    ref = torch.cat(ref_logits)  # (decoded + 1, V): predictions of rest[0..]
    ref_logp = F.log_softmax(ref, -1)
    full_bytes = full_cache_bytes(full)
    rows = []
    for spec in (s.strip() for s in args.kv.split(",") if s.strip()):
        name, opts = parse_spec(spec)
        method = build_method(model, "kv", name, opts)
        cfg = method.make_cache(model, None).config
        t0 = time.process_time()
        ek, ev = recon_error(model, cfg, full)
        with torch.no_grad(), method.attach(model):
            cache = method.make_cache(model, copy.deepcopy(full))
            nbytes = cache.kv_bytes()
            logits = [last]
            for t in range(rest.size(1) - 1):
                cache, lg = decode_step(model, rest[:, t: t + 1], cache)
                logits.append(lg)
        logp = F.log_softmax(torch.cat(logits), -1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)[1:].mean().item()  # decode-path predictions only
        nll = F.nll_loss(logp[1:], rest[0, 1:], reduction="mean").item()
        nll_full = F.nll_loss(ref_logp[1:], rest[0, 1:], reduction="mean").item()
        row = {"spec": spec, "label": cfg.label, "key_rel_sq_err": ek, "value_rel_sq_err": ev, "decode_kl": kl,
               "decode_nll": nll, "decode_nll_full": nll_full,
               "bytes_per_token_after_prefill": nbytes / pre.size(1),
               "ratio_vs_bf16": nbytes / full_bytes * (2 / torch.tensor([], dtype=model.dtype).element_size()),
               "cpu_seconds": time.process_time() - t0}
        rows.append(row)
        print(f"{spec:60s} K {ek:.4f} V {ev:.4f} KL {kl:.4f} nll {nll:.3f} (full {nll_full:.3f}) "
              f"{row['ratio_vs_bf16']:.4f}x  {row['cpu_seconds']:.0f} cpu-s", flush=True)
        out = {"benchmark": "kv fit screen (proxy: reconstruction error and decode KL)",
               "model": args.model, "dtype": args.dtype, "window": args.window, "prefix": args.prefix,
               "decoded": args.decoded, "threads": args.threads, "fit_constants": args.set, "rows": rows,
               "command": "python " + shlex.join(sys.argv),
               "machine": machine_info(args.dtype), "loadavg_end": os.getloadavg(),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "seconds": time.perf_counter() - started}
        if args.json:
            write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
