"""PPL-wiki-512 of the default model after pruning, one method and one setting per invocation.

    python benchmarks/prune_ppl.py --method barber --init wanda --sparsity 0.5 --calib-samples 32 --windows 40

writes ``benchmarks/results/prune/<tag>/<setting>_<method>.json`` (``--method dense`` measures the
unpruned model the same way). ``benchmarks/prune_summary.py`` gathers a tag's files into one table.
Quick variant: 32 calibration sequences (CALIB-pg-512-q) and 40 windows (PPL-wiki-512-q); full: 128 / 200.
Each method runs in its own process so that peak RSS is the method's own.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def calib_name(n: int) -> str:
    """CALIB-pg-512 draws offsets with Random(0): n sequences are the first n of the protocol's 128."""
    return {128: "CALIB-pg-512", 32: "CALIB-pg-512-q"}.get(n, f"CALIB-pg-512 (first {n} of 128 sequences)")


def build_config(args):
    from compactlm.prune import METHODS

    spec = {"pattern": args.pattern} if args.pattern else {"sparsity": args.sparsity}
    if args.method == "barber":
        extra = {"criterion": args.criterion} if args.criterion else {}
        extra["objective"] = args.objective
        if args.objective == "lm":
            extra.update(heldout=args.heldout, rounds=args.rounds, margin=args.margin)
        if args.search_ratios:
            extra["search_ratios"] = tuple(float(r) for r in args.search_ratios.split(","))
        return METHODS["barber"](init=METHODS[args.init](**spec), rebuild_ratio=args.rebuild_ratio, group=args.group,
                                 **extra)
    return METHODS[args.method](**spec)


def quantize(model, calib) -> dict:
    """W4 GPTQ g64 (act-order, asymmetric) after pruning; GPTQ keeps the pruned weights at exactly 0."""
    import compactlm
    from compactlm.modules.packed_linear import PackedLinear
    from compactlm.quant.gptq import GPTQ

    config = GPTQ(bits=4, group_size=64, respect_sparsity=True)
    start, cpu = time.perf_counter(), time.process_time()
    compactlm.compress(model, config, calib=calib)
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            w = module.dequantize_weight()
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    if total == 0:
        raise RuntimeError("GPTQ packed no linear: nothing was quantized")
    return {"config": config.to_dict(), "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu, "sparsity_after_quant": zeros / total}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", required=True, choices=["dense", "magnitude", "wanda", "sparsegpt", "barber"])
    p.add_argument("--init", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=None)
    p.add_argument("--pattern", default=None)
    p.add_argument("--rebuild-ratio", type=float, default=0.01)
    p.add_argument("--group", default="row")
    p.add_argument("--criterion", default=None, choices=["gradient", "taylor"])
    p.add_argument("--search-ratios", default=None,
                   help="Barber's search_ratios, comma-separated, e.g. 0.01,0.1 (default: the objective's, Barber's)")
    p.add_argument("--objective", default="lm", choices=["lm", "block"],
                   help="Barber's objective: the model's next-token loss (Barber's default) or block-output MSE (§3.2)")
    p.add_argument("--heldout", type=int, default=8,
                   help="objective lm: extra calibration sequences (after the --calib-samples ones, which the "
                        "initial method and the gradients use) that only choose the step")
    p.add_argument("--rounds", type=int, default=1, help="objective lm: at most this many rebuild rounds")
    p.add_argument("--margin", type=float, default=2.0, help="objective lm: standard errors against a revive's gain")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="quick")
    p.add_argument("--quantize", default=None, choices=["w4-gptq-g64"],
                   help="after pruning, quantize with GPTQ (mask respected: pruned weights stay exactly 0)")
    p.add_argument("--note", default="",
                   help="how the machine was shared during the run (load_average records the load)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import compactlm
    from compactlm.data import calibration_set
    from compactlm.evaluation import perplexity
    from compactlm.utils import machine_info, peak_rss_mib, set_quiet, write_json_atomic

    set_quiet(True)
    load_start = os.getloadavg()
    model, tok = compactlm.models.load(args.model, dtype="fp32")
    setting = args.pattern or f"{100 * (args.sparsity if args.sparsity is not None else 0.5):g}pct"
    method = args.method if args.method != "barber" else f"barber-{args.init}"
    if args.method == "barber" and args.criterion:
        method += f"-{args.criterion}"
    lm = args.method == "barber" and args.objective == "lm"
    if lm:
        method += "-lm"
    if args.quantize:
        method += f"+{args.quantize}"
    record = {"model": args.model, "method": method, "setting": setting,
              "calibration": calib_name(args.calib_samples)}
    if args.method != "dense":
        config = build_config(args)
        # objective lm: sequences calib_samples.. calib_samples+heldout-1 only choose the step; the first
        # calib_samples (the same as every other method's, offsets drawn in order) feed the init and the gradients.
        calib = calibration_set(tok, "essays", nsamples=args.calib_samples + (args.heldout if lm else 0),
                                seqlen=512, seed=0)
        if lm:
            record["heldout_calibration"] = f"CALIB-pg-512 sequences {args.calib_samples}-" \
                                            f"{args.calib_samples + args.heldout - 1} (step choice only)"
        start, cpu = time.perf_counter(), time.process_time()
        report = compactlm.prune(model, config, calib=calib)
        # CPU seconds of this (1-thread) process: on a loaded machine, close to what an idle core would take.
        record.update(config=config.to_dict(), prune_seconds=time.perf_counter() - start,
                      prune_cpu_seconds=time.process_time() - cpu,
                      overall_sparsity=report.overall_sparsity,
                      min_layer_sparsity=min(report.sparsity.values()),
                      max_layer_sparsity=max(report.sparsity.values()))
        if args.method == "barber":
            record["swaps"] = sum(sum(r["swaps"].values()) for r in report.layer_records)
            record["reverted_blocks"] = sum(len(r.get("reverted", [])) for r in report.layer_records)
            lm_rounds = [r["lm_rounds"] for r in report.layer_records if "lm_rounds" in r]
            if lm_rounds:
                record["lm_rounds"] = lm_rounds[0]
            memory = [r["memory_estimate"] for r in report.layer_records if "memory_estimate" in r]
            if memory:  # the up-front estimate, to compare with the measured peak RSS
                record["memory_estimate"] = memory[0]
            ratios = [v for r in report.layer_records for v in r.get("ratio", {}).values()]
            if ratios:  # search_ratios: which ratio each rebuilt block kept
                record["chosen_ratios"] = {str(x): ratios.count(x) for x in sorted(set(ratios))}
        if args.quantize:
            record.update(quantize=quantize(model, calib[:args.calib_samples]))
    record["peak_rss_mib_after_prune"] = peak_rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    result = perplexity(model, tok, windows=args.windows, show_progress=False)
    record.update(ppl=result.ppl, protocol=result.protocol, tokens=result.tokens, window_nll=list(result.window_nll),
                  eval_seconds=time.perf_counter() - start, eval_cpu_seconds=time.process_time() - cpu,
                  peak_rss_mib=peak_rss_mib(),
                  command="python " + " ".join(shlex.quote(a) for a in sys.argv),
                  machine={**machine_info("fp32"), "note": args.note},
                  load_average={"start": load_start, "end": os.getloadavg()})
    out = ROOT / "results" / "prune" / args.tag / f"{setting.replace(':', 'of')}_{method}.json"
    write_json_atomic(out, record)
    print(f"{setting} {method}: {result.protocol} {result.ppl:.3f}  prune {record.get('prune_seconds', 0):.0f} s  "
          f"peak RSS {record['peak_rss_mib']:.0f} MiB -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
