"""Quality and cost of RTN / GPTQ / APTQ on the default model: PPL-wiki-512(-q) with CALIB-pg-512(-q).

Every setting is run in this one process, side by side, on the same calibration and evaluation
windows; each row is appended to the JSON result as soon as it is measured (a long run that is cut
short still leaves its finished rows, marked ``complete: false``).

    .venv/bin/python benchmarks/quant_quality.py --quick \
        --settings base,rtn:3,gptq:3,aptq:3.0,rtn:4,gptq:4,aptq:2.5,rtn:2,gptq:2 \
        --json benchmarks/results/quant/quality_quick.json

``--quick`` = 32 calibration sequences (CALIB-pg-512-q) and 40 windows (PPL-wiki-512-q); the full
protocol is 128 and 200. Settings: ``base``, ``rtn:B``, ``gptq:B``, ``aptq:AVG[:MENU]`` (MENU as digits,
default ``24`` = the paper's 2/4; ``234`` = 2/3/4; any config field as ``@field=value``, e.g.
``aptq:2.5:234@sensitivity_quantizer=rtn@clip_search=true``), ``aptqlayer:AVG[:MENU]`` (the local Hessian-trace
sensitivity instead of the loss-gradient one), ``aptqplain:AVG[:MENU]`` (plain GPTQ Hessians for q/k/v);
APTQ settings also take ``@sensitivity_cache=PATH`` (a run option, not a config field: the sensitivities are
loaded from PATH if it was made for the same model, calibration and sensitivity settings, else computed and
saved there, so ``aptq:2.5:234@sensitivity_cache=s.json,aptq:3.0:234@sensitivity_cache=s.json`` computes them
once); all g64, asymmetric, fp32. Wall time and peak RSS are per setting (RSS is the process peak so far).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

import compactlm
from compactlm.config import config_from_options, parse_spec
from compactlm.data import calibration_set, eval_windows
from compactlm.evaluation import perplexity
from compactlm.quant import APTQ, GPTQ, RTN, quant_summary
from compactlm.utils import machine_info, peak_rss_mib, write_json_atomic


def make_run(setting: str, group_size: int):
    """The config of ``gptq:3``, ``aptq:2.5:234``, ... with ``@field=value`` overrides typed from the config's fields
    (``gptq:3@clip_search=true``, ``aptq:2.5:234@sensitivity_quantizer=rtn``), and the run options
    (``sensitivity_cache``) given beside its fields."""
    head, extra = parse_spec(setting)
    options = {"sensitivity_cache": extra.pop("sensitivity_cache")} if "sensitivity_cache" in extra else {}
    if options and not head.startswith("aptq"):
        raise SystemExit(f"{setting!r}: sensitivity_cache is for the aptq settings only")
    return _config(head, extra, group_size), options


def _config(head: str, extra: dict, group_size: int):
    kind, _, value = head.partition(":")
    if kind == "rtn":
        return config_from_options(RTN, {"bits": value, "group_size": group_size, **extra})
    if kind == "gptq":
        return config_from_options(GPTQ, {"bits": value, "group_size": group_size, **extra})
    if kind in ("aptq", "aptqlayer", "aptqplain"):
        avg, _, menu = value.partition(":")
        options = {"bits_menu": ",".join(menu)} if menu else {}
        if kind == "aptqlayer":  # ablation: the local Hessian-trace sensitivity
            options["sensitivity"] = "layer"
        if kind == "aptqplain":  # ablation: APTQ allocation with plain GPTQ Hessians for q/k/v
            options["attention_aware"] = False
        return config_from_options(APTQ, {"avg_bits": avg, "group_size": group_size, **options, **extra})
    raise SystemExit(f"unknown setting {head!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="base,rtn:3,gptq:3,aptq:3.0")
    p.add_argument("--quick", action="store_true", help="32 calibration sequences, 40 windows")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=0,
                   help="calibration sequences (0: the protocol's, 32 with --quick, else 128); say so in --note")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--json", required=True)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--note", default="", help="machine note recorded with the result (e.g. what else was running)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    nsamples, windows = (32, 40) if args.quick else (128, 200)
    nsamples = args.nsamples or nsamples
    model, tok = compactlm.models.load(args.model)
    calib = calibration_set(tok, "essays", nsamples=nsamples, seqlen=512)
    ids = eval_windows(tok, "wiki", 512, windows)
    result = {"benchmark": "quant_quality", "model": args.model,
              "protocol": {"ppl": "PPL-wiki-512-q" if args.quick else "PPL-wiki-512",
                           "calibration": f"CALIB-pg-512{'-q' if args.quick else ''} ({nsamples} x 512)"},
              "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
              "machine": {**machine_info(torch.float32), "note": args.note},
              "rows": [], "complete": False}
    del model
    for setting in args.settings.split(","):
        model, _ = compactlm.models.load(args.model)
        gc.collect()
        # The 1-minute load average before and after each row: on the shared machine it says how far the
        # wall times are inflated (CPU seconds are recorded beside them).
        row = {"setting": setting, "loadavg_start": os.getloadavg()[0]}
        if setting != "base":
            cfg, options = make_run(setting, args.group_size)
            start, cpu_start = time.perf_counter(), time.process_time()
            report: dict = {}
            compactlm.quantize(model, cfg, calib=None if isinstance(cfg, RTN) else calib, report=report, **options)
            row["quantize_seconds"] = time.perf_counter() - start
            # CPU seconds (all threads) beside wall time: on a shared machine wall time is an upper bound.
            row["quantize_cpu_seconds"] = time.process_time() - cpu_start
            s = quant_summary(model)
            row.update(config=cfg.to_dict(), avg_bits=s["avg_bits"], avg_bits_with_metadata=s["avg_bits_with_metadata"],
                       model_MiB=s["model_bytes"] / 2**20, damp_retries=sum(r.get("damp_retries", 0)
                                                                          for r in report.get("layers", [])))
            if "allocation" in report:
                row["bits_per_layer"] = report["allocation"]
                row["estimated_cost"] = report["estimated_cost"]
                row["sensitivity_source"] = report["sensitivity_source"]
        start, cpu_start = time.perf_counter(), time.process_time()
        r = perplexity(model, input_ids=ids, show_progress=False)
        row.update(ppl=r.ppl, tokens=r.tokens, window_nll=list(r.window_nll), eval_seconds=time.perf_counter() - start,
                   eval_cpu_seconds=time.process_time() - cpu_start, peak_rss_mib=peak_rss_mib(),
                   loadavg_end=os.getloadavg()[0])
        print(f"{setting}: ppl {r.ppl:.3f} " + " ".join(f"{k}={v:.3f}" for k, v in row.items()
                                                          if isinstance(v, float) and k != "ppl"), flush=True)
        result["rows"].append(row)
        write_json_atomic(args.json, result)
        del model
    result["complete"] = True
    write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
