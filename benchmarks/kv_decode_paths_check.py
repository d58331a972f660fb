"""The decode paths of the quantized cache on the real model: next-token log-probs of ``folded`` vs ``chunked``.

Converts the first ``--context`` tokens of a saved real-text prefill cache (``--cache-file``, as the profile and
``kv_bytes_speed.py --cache-file`` write it) to ``--kv int2-mixed`` (``--chunk`` tokens per chunk, so the store
spans several), decodes ``--steps`` random tokens with each path in fp32 and in bf16, and reports the largest
log-prob difference and KL against the fp32 ``chunked`` run, and how often the argmax agrees with it.

    python benchmarks/kv_decode_paths_check.py --cache-file /tmp/kv8k_wiki.pt \\
        --json benchmarks/results/kv/kv_decode_paths_check.json
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from transformers import DynamicCache

from compactlm.kv import KVQuant, QuantizedKVCache, kv_cache
from compactlm.kv.attention import force_path
from compactlm.kv.runtime import PRESETS
from compactlm.models import load
from compactlm.utils import machine_info, write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-file", required=True)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    saved = torch.load(args.cache_file)
    cfg = KVQuant(bits=2, **PRESETS["int2-mixed"], chunk_tokens=args.chunk)
    ids = torch.randint(100, 20000, (1, args.steps), generator=torch.Generator().manual_seed(0))
    logp = {}
    for dt in ("fp32", "bf16"):
        model, _ = load("smollm2-135m", dtype=dt)
        pdt = next(model.parameters()).dtype
        full = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(saved):
            full.update(k[..., : args.context, :].to(pdt), v[..., : args.context, :].to(pdt), i)
        for path in ("folded", "chunked"):
            cache = QuantizedKVCache.from_cache(model, cfg, full)
            steps = []
            with torch.no_grad(), kv_cache(model, cfg), force_path(path):
                for t in range(args.steps):
                    steps.append(model(input_ids=ids[:, t: t + 1], cache=cache, use_cache=True).logits[0, -1].float())
            logp[f"{dt} {path}"] = torch.stack(steps).log_softmax(-1)
    ref = logp["fp32 chunked"]
    rows = []
    for name, lp in logp.items():
        row = {"run": name, "max_abs_dlogp_vs_fp32_chunked": (lp - ref).abs().max().item(),
               "max_kl_vs_fp32_chunked": (ref.exp() * (ref - lp)).sum(-1).max().item(),
               "argmax_agreement_vs_fp32_chunked": (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()}
        rows.append(row)
        print(row, flush=True)
    out = {"benchmark": "kv decode paths on the real model", "kv_quant": cfg.to_dict(), "context": args.context,
           "steps": args.steps, "rows": rows, "command": "python " + shlex.join(sys.argv),
           "machine": machine_info("bf16")}
    if args.json:
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
