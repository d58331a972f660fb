"""compactlm Wanda / SparseGPT vs llm-compressor's WandaPruningModifier / SparseGPTModifier, side by side.

Issue 4's target: our Wanda and SparseGPT match or beat llm-compressor's (PPL-wiki-512), measured in one run on
identical calibration ids and evaluation windows.

    .venv/bin/python benchmarks/llmc_prune_side_by_side.py --methods wanda,sparsegpt --sparsity 0.5 --threads 1 \
        --json benchmarks/results/prune/llmc_prune_side_by_side.json

How it stays fair (the same scheme as ``benchmarks/llmc_side_by_side.py`` for GPTQ):
- The same token ids: this driver draws CALIB-pg-512-q (32 x 512) and PPL-wiki-512-q (40 windows) once, saves
  them to a temp ``.pt``, and both sides read it.
- Each side runs in its own fresh subprocess: llm-compressor in its own venv (``/work/venvs/llmc``, llmcompressor
  0.14; this file's ``--llmc-worker`` mode imports no compactlm), ours through ``--ours-worker``. Both load the
  same fp32 safetensors folder, use the same torch thread count, and time only the pruning call; peak RSS
  (VmHWM) is read right after it, before evaluation. Both evaluate with the one loop in ``_llmc_worker.py``.
- Settings: unstructured ``--sparsity`` per output row (both tools' Wanda compare per row); SparseGPT block 128,
  dampening 0.01 (llm-compressor's defaults; ours the same); every decoder-layer Linear pruned, ``lm_head``
  (the tied embedding) left dense on both sides. What still differs: llm-compressor's pipeline collects every
  linear of a layer in one pass with one sequence per forward; our SparseGPT is true-sequential (q/k/v, o,
  gate/up, down) with 8 sequences per forward and allocates the pruned count exactly per row.
- Each side's achieved sparsity over the decoder linears is recorded, so a PPL gap cannot hide a sparsity gap.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

LLMC_PYTHON = "/work/venvs/llmc/bin/python"
HERE = Path(__file__).resolve().parent
RATIO_KEYS = ("ppl", "prune_seconds", "prune_cpu_seconds", "peak_rss_mib")


def decoder_sparsity(model) -> float:
    """Fraction of exact zeros over every Linear inside the decoder layers."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)


def worker(args: argparse.Namespace) -> int:
    """One side (``--llmc-worker`` or ``--ours-worker``): load, prune on the given ids, read peak RSS, evaluate."""
    sys.path.insert(0, str(HERE))
    from _llmc_worker import peak_rss_mib, perplexity, rss_mib, write_json_atomic

    torch.set_num_threads(args.threads)
    data = torch.load(args.data)
    calib, windows = data["calib"].long(), data["eval"].long()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    out: dict = {"tool": "llm-compressor" if args.llmc_worker else "compactlm", "method": args.method,
                 "threads": torch.get_num_threads(), "python": sys.executable, "rss_method": "VmHWM"}
    if args.method != "base":
        out["rss_before_mib"] = rss_mib()
        start, cpu = time.perf_counter(), time.process_time()
        out["config"] = _prune_llmc(model, calib, args) if args.llmc_worker else _prune_ours(model, calib, args)
        out["prune_seconds"] = time.perf_counter() - start
        out["prune_cpu_seconds"] = time.process_time() - cpu  # moves far less than wall time on a shared CPU
        out["peak_rss_mib"] = peak_rss_mib()
        out["sparsity"] = decoder_sparsity(model)
    start = time.perf_counter()
    ppl, tokens = perplexity(model, windows)
    out.update(ppl=ppl, tokens=tokens, eval_seconds=time.perf_counter() - start)
    write_json_atomic(args.out, out)
    print(json.dumps({k: out.get(k) for k in ("method", "ppl", "prune_seconds", "sparsity")}), flush=True)
    return 0


def _prune_llmc(model, calib, args) -> dict:
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    common = {"sparsity": args.sparsity, "mask_structure": "0:0", "targets": ["Linear"], "ignore": ["lm_head"]}
    if args.method == "wanda":
        recipe = WandaPruningModifier(**common)
    else:
        recipe = SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)
    oneshot(model=model, tokenizer=args.model_dir, dataset=dataset, recipe=recipe,
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    return {"modifier": type(recipe).__name__, "llmcompressor": llmcompressor.__version__, **common,
            **({"block_size": 128, "dampening_frac": 0.01} if args.method == "sparsegpt" else {})}


def _prune_ours(model, calib, args) -> dict:
    import compactlm
    from compactlm.prune import SparseGPT, Wanda

    compactlm.utils.set_quiet(True)
    config = Wanda(sparsity=args.sparsity) if args.method == "wanda" else SparseGPT(sparsity=args.sparsity)
    compactlm.prune(model, config, calib=calib)
    return config.to_dict()


def _run(cmd: list[str], out: Path, log: Path, label: str) -> dict:
    """One side in a fresh subprocess: the GPTQ side-by-side's runner, printing the pruning keys."""
    from llmc_side_by_side import _run as run_side  # benchmarks/ is on sys.path when this runs as a script

    return run_side(cmd, out, log, label, keys=(*RATIO_KEYS, "sparsity"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (32 = CALIB-pg-512-q)")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (40 = PPL-wiki-512-q)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--llmc-python", default=LLMC_PYTHON)
    p.add_argument("--json", help="result JSON (required)")
    p.add_argument("--note", default="2 cores shared with other engineers' jobs; see load_average")
    p.add_argument("--llmc-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ours-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.llmc_worker or args.ours_worker:
        return worker(args)
    if not args.json:
        p.error("--json PATH is required")

    import os

    import compactlm
    from compactlm.data import calibration_set, eval_windows
    from compactlm.errors import ConfigError
    from compactlm.models.loading import default_model_dir
    from compactlm.utils import machine_info, write_json_atomic

    methods = args.methods.split(",")
    if not set(methods) <= {"wanda", "sparsegpt"}:
        raise ConfigError(f"--methods takes wanda and/or sparsegpt (comma-separated), got {args.methods!r}")
    if not Path(args.llmc_python).is_file():
        raise ConfigError(f"--llmc-python {args.llmc_python} does not exist: build llm-compressor's venv first "
                          "(docs/quantization.md, 'Side by side with llm-compressor')")
    torch.set_num_threads(args.threads)
    _, tok = compactlm.models.load("smollm2-135m")
    model_dir = default_model_dir()
    result = {"benchmark": "llmc_prune_side_by_side", "model": "smollm2-135m", "model_dir": str(model_dir),
              "protocol": {"ppl": f"PPL-wiki-512{'-q' if args.windows == 40 else ''} ({args.windows} windows)",
                           "calibration": f"CALIB-pg-512{'-q' if args.nsamples == 32 else ''} ({args.nsamples} x 512)",
                           "sparsity": args.sparsity, "structure": "unstructured, per output row"},
              "command": shlex.join([".venv/bin/python", *sys.argv]),
              "machine": {**machine_info(torch.float32), "note": args.note,
                          "load_average_start": os.getloadavg()}, "rows": []}
    path = Path(args.json)
    with tempfile.TemporaryDirectory(prefix="llmc-prune-") as tmp:
        tmpdir = Path(tmp)
        data = tmpdir / "ids.pt"
        torch.save({"calib": calibration_set(tok, "essays", nsamples=args.nsamples, seqlen=512),
                    "eval": eval_windows(tok, "wiki", 512, args.windows)}, data)
        common = ["--data", str(data), "--model-dir", str(model_dir), "--threads", str(args.threads)]
        me = str(Path(__file__).resolve())
        llmc = [args.llmc_python, me, "--llmc-worker", *common]
        ours = [sys.executable, me, "--ours-worker", *common]
        theirs_b = _run([*llmc, "--method", "base", "--out", str(tmpdir / "lb.json")], tmpdir / "lb.json",
                        tmpdir / "lb.log", "llm-compressor venv, base model")
        ours_b = _run([*ours, "--method", "base", "--out", str(tmpdir / "ob.json")], tmpdir / "ob.json",
                      tmpdir / "ob.log", "compactlm venv, base model")
        rel = abs(theirs_b["ppl"] - ours_b["ppl"]) / ours_b["ppl"]
        result["base_check"] = {"ppl_llmc_venv": theirs_b["ppl"], "ppl_ours": ours_b["ppl"],
                                "relative_difference": rel, "tokens": ours_b["tokens"]}
        if rel > 1e-4:  # same weights, same loop: anything beyond float noise is a harness bug
            write_json_atomic(path, result)
            raise SystemExit(f"harness mismatch: base PPL {theirs_b['ppl']:.4f} vs {ours_b['ppl']:.4f}")
        for m in methods:
            t = _run([*llmc, "--method", m, "--sparsity", str(args.sparsity), "--out", str(tmpdir / f"l{m}.json")],
                     tmpdir / f"l{m}.json", tmpdir / f"l{m}.log", f"llm-compressor {m} {args.sparsity:g}")
            o = _run([*ours, "--method", m, "--sparsity", str(args.sparsity), "--out", str(tmpdir / f"o{m}.json")],
                     tmpdir / f"o{m}.json", tmpdir / f"o{m}.log", f"compactlm {m} {args.sparsity:g}")
            result["rows"].append({"method": m, "sparsity": args.sparsity, "llmc": t, "ours": o,
                                   "ratio_ours_over_llmc": {k: o[k] / t[k] for k in RATIO_KEYS},
                                   "ppl_at_least_as_good": o["ppl"] <= t["ppl"]})
            result["machine"]["load_average_end"] = os.getloadavg()
            write_json_atomic(path, result)
            print(f"{m}: PPL ours {o['ppl']:.3f} vs llm-compressor {t['ppl']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
