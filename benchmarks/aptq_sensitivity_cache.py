"""What an APTQ sensitivity cache saves: CPU seconds per budget with and without it, and what its fingerprint costs.

In one process, on a small random-init Llama built in-process (no download), for each average-bit budget:
APTQ from scratch, then APTQ through one shared ``sensitivity_cache`` (the first budget writes it, the others
load it); the quantized state dicts and allocations of the two are compared bit for bit. With
``--fingerprint-model`` it also loads that model (no APTQ run) and times only the fingerprint a cache costs on
it: SHA-256 of every parameter and buffer and of the CALIB-pg-512 ids.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/aptq_sensitivity_cache.py --threads 1 \\
        --fingerprint-model smollm2-135m --json benchmarks/results/quant/aptq_sensitivity_cache.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import compactlm
from compactlm.models import tiny_model
from compactlm.quant import APTQ
from compactlm.quant.aptq_cache import fingerprint
from compactlm.quant.common import quant_targets
from compactlm.utils import machine_info, peak_rss_mib, write_json_atomic

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32)


def state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def one_run(cfg: APTQ, calib: torch.Tensor, **options) -> dict:
    model = tiny_model("llama", **SHAPE)
    report: dict = {}
    cpu = time.process_time()
    compactlm.quantize(model, cfg, calib=calib, report=report, **options)
    cpu = time.process_time() - cpu
    return {"cpu_seconds": cpu, "sensitivity_source": report["sensitivity_source"],
            "allocation": report["allocation"], "state_sha256": state_digest(model)}


def fingerprint_cost(spec: str) -> dict:
    from compactlm.data import calibration_set
    from compactlm.models import load

    model, tok = load(spec)
    calib = calibration_set(tok, "essays", nsamples=128, seqlen=512)  # CALIB-pg-512, the full protocol
    cfg = APTQ(avg_bits=2.5, bits_menu=(2, 3, 4))
    targets = quant_targets(model, cfg)
    rss0 = peak_rss_mib()
    cpu = time.process_time()
    fp = fingerprint(model, calib, targets, cfg)
    cpu = time.process_time() - cpu
    hashed = sum(p.numel() * p.element_size() for p in model.parameters())
    hashed += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"model": spec, "dtype": str(next(model.parameters()).dtype), "tensors": len(fp["tensors"]),
            "bytes_hashed": hashed, "calibration_shape": fp["calibration"]["shape"], "cpu_seconds": cpu,
            "peak_rss_growth_mib": peak_rss_mib() - rss0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="3.0,2.5,3.5", help="average bits; the first writes the cache")
    p.add_argument("--calib", default="16x128", help="random calibration ids, NxT")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fingerprint-model", default="", help="also time the fingerprint alone on this model")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, t = (int(x) for x in args.calib.split("x"))
    calib = torch.randint(3, SHAPE["vocab_size"], (n, t), generator=torch.Generator().manual_seed(0))
    budgets = [float(b) for b in args.budgets.split(",")]
    result: dict = {"benchmark": "aptq_sensitivity_cache", "command": " ".join(["python", *sys.argv]),
                    "model": {"tiny_llama": SHAPE, "parameters": sum(q.numel() for q in tiny_model("llama", **SHAPE)
                                                                       .parameters())},
                    "calibration": [n, t], "config": "APTQ(group_size=64, bits_menu=(2, 3, 4)) defaults otherwise",
                    "machine": {**machine_info(torch.float32), "loadavg_start": os.getloadavg()}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "sens.json"
        for avg in budgets:
            cfg = APTQ(avg_bits=avg, group_size=64, bits_menu=(2, 3, 4))
            scratch = one_run(cfg, calib)
            cached = one_run(cfg, calib, sensitivity_cache=cache)
            row = {"avg_bits": avg, "scratch_cpu_seconds": scratch["cpu_seconds"],
                   "cached_cpu_seconds": cached["cpu_seconds"], "cached_source": cached["sensitivity_source"],
                   "scratch_sensitivity_cpu_seconds": scratch["sensitivity_source"]["sensitivity_cpu_seconds"],
                   "same_allocation": scratch["allocation"] == cached["allocation"],
                   "bit_identical_state": scratch["state_sha256"] == cached["state_sha256"]}
            print({k: v for k, v in row.items() if k != "cached_source"}, row["cached_source"]["source"], flush=True)
            result["rows"].append(row)
        result["cache_file_bytes"] = cache.stat().st_size
    rows = result["rows"]
    result["summary"] = {
        "budgets": len(rows),
        "scratch_total_cpu_seconds": sum(r["scratch_cpu_seconds"] for r in rows),
        "cached_total_cpu_seconds": sum(r["cached_cpu_seconds"] for r in rows),
        "loaded_run_over_scratch_run": [r["cached_cpu_seconds"] / r["scratch_cpu_seconds"] for r in rows[1:]],
        "sensitivity_share_of_scratch_run": [r["scratch_sensitivity_cpu_seconds"] / r["scratch_cpu_seconds"]
                                             for r in rows],
        "all_bit_identical": all(r["bit_identical_state"] and r["same_allocation"] for r in rows)}
    if args.fingerprint_model:
        result["fingerprint_only"] = fingerprint_cost(args.fingerprint_model)
        print(result["fingerprint_only"], flush=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["peak_rss_mib"] = peak_rss_mib()
    print(result["summary"], flush=True)
    write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
