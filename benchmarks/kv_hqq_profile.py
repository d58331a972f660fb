"""Where transformers' HQQ ``QuantizedCache`` spends its time on one RULER-syn prompt, beside ours and full.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_hqq_profile.py --length 4k --threads 1 \\
        --json benchmarks/results/kv/kv_hqq_profile_4k.json

One seeded RULER-syn prompt (task ``--task``, sample 0) is prefilled once with full attention; then each method
(``full``, ``--kv`` names, default ``int4,hf-hqq-int4``) builds its cache from a copy of that prefill
(``make_cache``: for HF's cache, the quantization of the whole prompt) and greedily decodes ``--new-tokens``
tokens (no stop token, so every method decodes the same count). Each phase's process-CPU seconds are measured,
and each method's decode runs under ``cProfile``; the JSON keeps the top functions by cumulative and by own time,
so the slow part of a method is named, not guessed. Why this exists: in the 20-sample RULER runs a process with
``hf-hqq-int4`` did not finish one task in 27 CPU-min, where our methods finish one in about 10.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

from compactlm.evaluation.generate import eval_mode, greedy_decode, prefill, resolve_methods
from compactlm.evaluation.methods import FULL
from compactlm.evaluation.ruler import RulerGenerator, parse_lengths
from compactlm.models import load
from compactlm.utils import machine_info, write_json_atomic


def top_functions(profile: cProfile.Profile, key: str, n: int) -> list[dict]:
    stats = pstats.Stats(profile)
    rows = []
    for (file, line, func), (_, calls, own, cum, _) in stats.stats.items():
        rows.append({"function": f"{os.path.basename(file)}:{line}({func})", "calls": calls,
                     "own_s": round(own, 3), "cumulative_s": round(cum, 3)})
    rows.sort(key=lambda r: r["cumulative_s" if key == "cumulative" else "own_s"], reverse=True)
    return rows[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--length", default="4k")
    p.add_argument("--task", default="niah_single")
    p.add_argument("--kv", default="int4,hf-hqq-int4")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, dtype=args.dtype)
    (length,) = parse_lengths(args.length)
    sample = RulerGenerator(tok).sample(args.task, length, 0, 1)
    ids = torch.tensor([sample.input_ids])
    methods = [FULL] + resolve_methods(model, kv=args.kv)
    rows = []
    with eval_mode(model):
        c0 = time.process_time()
        shared, _ = prefill(model, ids[:, :-1])
        prefill_cpu = time.process_time() - c0
        print(f"prefill of {ids.shape[1] - 1} tokens: {prefill_cpu:.1f} CPU-s", flush=True)
        for m in methods:
            with m.attach(model):
                c0 = time.process_time()
                cache = m.make_cache(model, shared)
                build_cpu = time.process_time() - c0
                prof = cProfile.Profile()
                c0 = time.process_time()
                prof.enable()
                out = greedy_decode(model, cache, int(ids[0, -1]), args.new_tokens, ())
                prof.disable()
                decode_cpu = time.process_time() - c0
            row = {"method": m.name, "description": m.description, "cache_build_cpu_s": round(build_cpu, 3),
                   "decode_cpu_s": round(decode_cpu, 3), "tokens": len(out),
                   "decode_cpu_ms_per_token": round(1000 * decode_cpu / max(1, len(out)), 1),
                   "output": tok.decode(out, skip_special_tokens=True),
                   "top_cumulative": top_functions(prof, "cumulative", args.top),
                   "top_own": top_functions(prof, "own", args.top)}
            rows.append(row)
            print(f"{m.name}: cache build {build_cpu:.2f} CPU-s, decode {decode_cpu:.2f} CPU-s for {len(out)} tokens "
                  f"({row['decode_cpu_ms_per_token']} ms/token); top own time: "
                  + "; ".join(f"{r['function']} {r['own_s']} s" for r in row["top_own"][:4]), flush=True)
    if args.json:
        write_json_atomic(args.json, {
            "benchmark": "HF QuantizedCache (HQQ) vs ours on one RULER-syn prompt: CPU per phase + decode profile",
            "command": " ".join([".venv/bin/python", *sys.argv]), "model": args.model, "dtype": args.dtype,
            "task": args.task, "length": length, "prompt_tokens": ids.shape[1], "prefill_cpu_s": round(prefill_cpu, 3),
            "rows": rows, "machine": {**machine_info(args.dtype), "threads": torch.get_num_threads(),
                                      "load_average": os.getloadavg()},
            "notes": "process CPU seconds (time.process_time) on a shared 2-core machine; cProfile adds overhead to "
                     "every method's decode alike"})


if __name__ == "__main__":
    main()
