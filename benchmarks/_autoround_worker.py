"""AutoRound side of ``benchmarks/llmc_side_by_side.py --autoround-python``; runs in AutoRound's own venv.

Never imports compactlm: auto-round 0.16.1 wants transformers 5.24 and turns on torch.compile and mixed
precision on CPU by default, so it lives in its own venv (``/work/venvs/autoround``; install commands in
docs/quantization.md). It reads the same ``.pt`` of calibration ids and evaluation windows as the other
workers and evaluates with the same loop (imported from ``_llmc_worker``, which imports no tool either).

    /work/venvs/autoround/bin/python benchmarks/_autoround_worker.py --data ids.pt --model-dir DIR \
        --bits 4 --group-size 64 --iters 0 --threads 1 --out result.json

SignRound (arXiv 2309.05516) through ``auto_round.AutoRound`` with g``group_size`` asymmetric integer weights on
the decoder linears (``lm_head`` stays full precision: it is the tied embedding). ``--iters 0`` is AutoRound's
no-tuning mode (its optimised RTN, which still reads the calibration data); its default 200 iterations of
sign-gradient descent per block project to hours on this CPU. Compilation and mixed precision are turned off
(fp32, like the other sides). After ``quantize()`` the model holds fake-quantized fp32 weights, checked to sit on
a g``group_size`` grid before the evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _llmc_worker import add_common_args, grid_check, load_inputs, peak_rss_mib, perplexity, rss_mib, write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--iters", type=int, default=0, help="SignRound iterations per block (0: no tuning)")
    args = p.parse_args(argv)
    import auto_round
    import transformers
    from transformers import AutoTokenizer

    calib, windows, model = load_inputs(args)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    out = {"tool": "auto-round", "versions": {"auto_round": auto_round.__version__,
                                              "transformers": transformers.__version__, "torch": torch.__version__},
           "threads": torch.get_num_threads(), "python": sys.executable, "rss_method": "VmHWM",
           "recipe": {"bits": args.bits, "group_size": args.group_size, "sym": False, "iters": args.iters,
                      "nsamples": calib.shape[0], "seqlen": calib.shape[1], "enable_torch_compile": False,
                      "amp": False}}
    out["rss_before_mib"] = rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    # A list of (1, T) id tensors is used as given (no re-tokenisation): the same ids as the other sides.
    ar = auto_round.AutoRound(model, tok, bits=args.bits, group_size=args.group_size, sym=False, iters=args.iters,
                              nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=1,
                              dataset=[row.unsqueeze(0) for row in calib], device_map="cpu",
                              enable_torch_compile=False, amp=False)
    model, _ = ar.quantize()
    out["quantize_seconds"] = time.perf_counter() - start
    out["quantize_cpu_seconds"] = time.process_time() - cpu_start
    out["peak_rss_mib"] = peak_rss_mib()
    out["grid_check"] = grid_check(model, args.bits, args.group_size)
    if not out["grid_check"]["on_grid"]:
        raise SystemExit(f"AutoRound's weights are not on a g{args.group_size} {args.bits}-bit grid: "
                         f"{out['grid_check']}; not evaluating a model that is not the quantized one")
    start = time.perf_counter()
    ppl, tokens, window_nll = perplexity(model, windows)
    out.update(ppl=ppl, tokens=tokens, window_nll=window_nll, eval_seconds=time.perf_counter() - start)
    write_json_atomic(args.out, out)
    print(json.dumps({k: out[k] for k in ("ppl", "quantize_seconds", "peak_rss_mib")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
