"""compactlm GPTQ vs llm-compressor's GPTQModifier, side by side: quality, calibration time, peak RSS.

Issue 3's targets: our GPTQ at least as good as llm-compressor's at every setting (PPL-wiki-512), and
calibration wall time and peak RSS ≤ 1.0× theirs, measured in the same run.

    .venv/bin/python benchmarks/llmc_side_by_side.py --bits 4,3 --threads 1 \
        --json benchmarks/results/quant/llmc_side_by_side.json
    # our side from a plain user install (no test extras), plus a variant row:
    .venv/bin/python benchmarks/llmc_side_by_side.py --bits 4 --threads 1 --ours-python /work/venvs/user/bin/python \
        --variant 'batch4:batch_size=4' --json ...
    # plus, at W4 only, our GPTQ with llm-compressor's calibration structure (one pass per layer, batch 1):
    .venv/bin/python benchmarks/llmc_side_by_side.py --bits 4 --threads 1 \
        --variant 'llmc_structure:true_sequential=false,batch_size=1' --variant-bits 4 --json ...

How it stays fair:
- The same token ids: this driver draws CALIB-pg-512-q (``calibration_set(tok, "essays", nsamples=32,
  seqlen=512)``) and PPL-wiki-512-q (``eval_windows(tok, "wiki", 512, 40)``) once and saves them to a temp
  ``.pt`` that both sides read.
- Each side runs in its own fresh subprocess (so each peak RSS is that tool's alone): llm-compressor in
  its own venv through ``benchmarks/_llmc_worker.py`` (which never imports compactlm), ours through this
  script's ``--ours-worker`` mode. Both use the same torch thread count, load the same fp32 safetensors
  folder, and time only the quantization call; peak RSS is read right after it, before evaluation.
- Both evaluate with the same plain loop: fp32 logits, mean NLL over every predicted token, exp. The
  harness is checked first: each side's base-model PPL on the windows must agree, else the run stops.
- Settings: g64 asymmetric W4 / W3 / W2; GPTQ block 128, damping 0.01, static act-order on both sides
  (llm-compressor's defaults, and ours), min-max ranges on both (our default clipping search is turned off
  for the main row; ``--variant clip:clip_search=true`` adds a row with it, and ``--ours-overrides
  clip_search=true`` makes our default the main row instead, saving a side when the min-max row is not
  wanted). lm_head (tied to the embedding) stays full precision on both.
- What still differs by default: ours is true-sequential (q/k/v, then o, then gate/up, then down, each
  group calibrated on the outputs of the already-quantized groups before it) with 8 sequences per forward;
  llm-compressor's sequential pipeline collects every linear's Hessian of a layer in one pass, one sequence
  per forward. ``--variant NAME:field=value,...`` runs extra compactlm rows with config overrides (e.g.
  ``true_sequential=false,batch_size=1``) so that this difference is measured, not guessed.
- Peak RSS includes what each process imports. compactlm's dev venv (``.[test]``) has ``hqq`` for the
  KV-cache baseline tests; transformers' ``cache_utils`` imports it when present, pulling in torch's
  dynamo/inductor and Triton (~150 MiB, ~3 s). A plain ``pip install compactlm`` has no hqq, nor has
  llm-compressor's venv, so ``--ours-python`` can point at such a user venv (each row records
  ``hqq_imported``). Each side's RSS just before quantizing is recorded (``rss_before_mib``), and the row
  also gives the growth during quantization (``peak_rss_mib - rss_before_mib``).

Rows are appended to the JSON as soon as each setting finishes; an existing JSON with the same protocol
keeps its other settings' rows (so W2 can be added by a later run with ``--bits 2``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLMC_PYTHON = "/work/venvs/llmc/bin/python"
RATIO_KEYS = ("ppl", "quantize_seconds", "quantize_cpu_seconds", "peak_rss_mib")
HERE = Path(__file__).resolve().parent


def ours_worker(args: argparse.Namespace) -> int:
    """compactlm side: load, GPTQ-quantize on the given ids, read peak RSS, evaluate; one fresh process."""
    import compactlm
    from compactlm.config import config_from_options
    from compactlm.quant import GPTQ
    from compactlm.utils import write_json_atomic

    # The same VmHWM reading as the llm-compressor worker (see _llmc_worker.peak_rss_mib for why not getrusage).
    sys.path.insert(0, str(HERE))
    from _llmc_worker import peak_rss_mib, rss_mib

    torch.set_num_threads(args.threads)
    data = torch.load(args.data)
    calib, windows = data["calib"].long(), data["eval"].long()
    model, _ = compactlm.models.load(args.model_dir)
    model.eval()
    out: dict = {"tool": "compactlm", "threads": torch.get_num_threads(), "python": sys.executable,
                 "rss_method": "VmHWM", "hqq_imported": "hqq" in sys.modules}
    if not args.base:
        overrides = json.loads(args.overrides) if args.overrides else {}
        # llm-compressor's min-max observer: our GPTQ's default clipping search is off unless a variant asks
        cfg = config_from_options(GPTQ, {"bits": args.bits, "group_size": args.group_size, "clip_search": "false",
                                         **overrides})
        out["config"] = cfg.to_dict()
        out["rss_before_mib"] = rss_mib()
        compactlm.utils.set_quiet(True)
        start, cpu_start = time.perf_counter(), time.process_time()
        compactlm.quantize(model, cfg, calib=calib)
        out["quantize_seconds"] = time.perf_counter() - start
        out["quantize_cpu_seconds"] = time.process_time() - cpu_start  # what the load on a shared CPU moves less
        out["peak_rss_mib"] = peak_rss_mib()  # before evaluation, whose logits would add to the peak
    start = time.perf_counter()
    out.update(_perplexity(model, windows), eval_seconds=time.perf_counter() - start)
    write_json_atomic(args.out, out)
    return 0


def _perplexity(model, windows, batch_size: int = 4) -> dict:
    """The llm-compressor worker's own loop (imported, so both sides share one harness)."""
    from _llmc_worker import perplexity  # benchmarks/ is on sys.path when this file runs as a script

    ppl, count, window_nll = perplexity(model, windows, batch_size)
    return {"ppl": ppl, "tokens": count, "window_nll": window_nll}


def _run(cmd: list[str], out: Path, log: Path, label: str, keys: tuple[str, ...] = RATIO_KEYS) -> dict:
    """Run one side in a fresh subprocess; its output goes to ``log``; its result JSON is returned (``keys``
    are printed). Shared with ``llmc_prune_side_by_side.py``."""
    return _run_together([(cmd, out, log, label)], keys)[0]


def _run_together(jobs: list[tuple[list[str], Path, Path, str]], keys: tuple[str, ...] = RATIO_KEYS) -> list[dict]:
    """Run the ``jobs`` ((cmd, out, log, label) each) at the same time, each in its own fresh subprocess, and
    return their result JSONs. With several jobs (``--concurrent``) the sides see the same machine load, so their
    CPU-time ratio is not skewed by load changes between turns (each process still has its own peak RSS)."""
    procs = []
    load_start = os.getloadavg()  # what else ran: CPU seconds move less with load than wall time, but do move
    for cmd, _out, log, label in jobs:
        print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
        f = open(log, "w")
        procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT), f, time.perf_counter()))
    results = []
    for (proc, f, start), (_, out, log, label) in zip(procs, jobs, strict=True):
        rc = proc.wait()
        f.close()
        if rc != 0 or not out.is_file():
            for other, _f, _start in procs:
                other.kill()
            raise SystemExit(f"{label} failed (exit {rc}); last output:\n{log.read_text()[-3000:]}")
        result = json.loads(out.read_text())
        result["process_seconds"] = time.perf_counter() - start
        result["loadavg_start_end"] = [list(load_start), list(os.getloadavg())]
        print(f"[{time.strftime('%H:%M:%S')}] {label}: " + ", ".join(
            f"{k} {result[k]:.3f}" for k in keys if k in result), flush=True)
        results.append(result)
    return results


def _parse_variant(text: str) -> tuple[str, dict]:
    """'name:field=value,field=value' -> (name, {field: value-string}); typed and checked against GPTQ's fields."""
    from compactlm.config import config_from_options
    from compactlm.errors import ConfigError
    from compactlm.quant import GPTQ

    name, sep, body = text.partition(":")
    if not sep or not name or not body:
        raise ConfigError(f"--variant takes NAME:FIELD=VALUE[,FIELD=VALUE...], got {text!r}")
    overrides = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--variant {text!r}: {item!r} is not FIELD=VALUE")
        overrides[key.strip()] = value.strip()
    if {"bits", "group_size"} & set(overrides):
        raise ConfigError(f"--variant {text!r}: bits and group size come from --bits/--group-size")
    config_from_options(GPTQ, overrides, what=f"--variant {name}")  # a bad field or value fails before any run
    return name, overrides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="4,3", help="comma-separated weight bit widths (2, 3, 4, 8)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (32 = CALIB-pg-512-q)")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (40 = PPL-wiki-512-q)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--llmc-python", default=LLMC_PYTHON, help="python of the venv holding llm-compressor")
    p.add_argument("--ours-python", default=sys.executable,
                   help="python that runs the compactlm side (default: this one). A plain `pip install compactlm` "
                        "venv measures what a user gets: the dev venv's test extras add hqq, whose import "
                        "through transformers.cache_utils costs ~150 MiB of RSS")
    p.add_argument("--skip-base-check", action="store_true", help="reuse the base check of an existing JSON")
    p.add_argument("--no-base-check", action="store_true",
                   help="run no base-model harness check (two extra evaluations: 20+ min at the full protocol on "
                        "this CPU); the quick-protocol JSONs hold one for the same loop and weights")
    p.add_argument("--json", help="result JSON (required)")
    p.add_argument("--note", default="", help="machine note recorded with the result (what else was running)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                   help="an extra compactlm row with GPTQ config overrides, e.g. "
                        "'llmc_structure:true_sequential=false,batch_size=1' (repeatable)")
    p.add_argument("--ours-overrides", default="", metavar="FIELD=VALUE,...",
                   help="GPTQ config overrides for our main row (default: none, i.e. min-max like llm-compressor); "
                        "'clip_search=true' makes the main row our default configuration")
    p.add_argument("--variant-bits", default="", help="bit widths at which to run the variants (default: all)")
    p.add_argument("--autoround-python", default="",
                   help="python of a venv holding auto-round 0.16.1: adds an AutoRound row per setting, same ids "
                        "and harness (benchmarks/_autoround_worker.py)")
    p.add_argument("--autoround-iters", type=int, default=0,
                   help="AutoRound's SignRound iterations per block (0: its no-tuning mode; 200, its default, "
                        "takes hours on this CPU)")
    p.add_argument("--llmc-from", default="", metavar="JSON",
                   help="do not run llm-compressor: take its side of each width from this earlier result JSON of the "
                        "same protocol (same ids: both draw them with the same deterministic calibration_set / "
                        "eval_windows); runs our side only, e.g. a min-max row beside an already measured one")
    p.add_argument("--concurrent", action="store_true",
                   help="run llm-compressor's, our main row and (with --autoround-python) AutoRound at the same "
                        "time (one process each, --threads each): they then see the same machine load, which makes "
                        "the CPU-time ratio fair on a shared machine; needs that many times --threads in cores")
    # internal: this script's own subprocess for the compactlm side
    p.add_argument("--ours-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--base", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ours_worker:
        return ours_worker(args)
    if not args.json:
        p.error("--json PATH is required")

    import compactlm
    from compactlm.data import calibration_set, eval_windows
    from compactlm.errors import ConfigError
    from compactlm.models.loading import default_model_dir
    from compactlm.utils import machine_info, write_json_atomic

    bits = [int(b) for b in args.bits.split(",")]
    variants = dict(_parse_variant(v) for v in args.variant)
    main_overrides = _parse_variant(f"main:{args.ours_overrides}")[1] if args.ours_overrides else {}
    variant_bits = [int(b) for b in args.variant_bits.split(",")] if args.variant_bits else bits
    for b in bits:
        if b not in (2, 3, 4, 8):
            raise ConfigError(f"--bits takes 2, 3, 4 or 8 (comma-separated), got {b}")
    if not Path(args.llmc_python).is_file():
        raise ConfigError(f"--llmc-python {args.llmc_python} does not exist: build llm-compressor's venv first "
                          "(docs/quantization.md, 'Side by side with llm-compressor')")
    if args.autoround_python and not Path(args.autoround_python).is_file():
        raise ConfigError(f"--autoround-python {args.autoround_python} does not exist: build AutoRound's venv first "
                          "(docs/quantization.md, 'Side by side with llm-compressor')")
    if args.model != "smollm2-135m":
        raise ConfigError("--model: only the default model's cached fp32 folder is wired up (smollm2-135m)")
    torch.set_num_threads(args.threads)
    _, tok = compactlm.models.load(args.model)
    model_dir = default_model_dir()
    protocol = {"ppl": f"PPL-wiki-512{'-q' if args.windows == 40 else ''} ({args.windows} windows)",
                "calibration": f"CALIB-pg-512{'-q' if args.nsamples == 32 else ''} ({args.nsamples} x 512)",
                "group_size": args.group_size, "symmetric": False,
                "gptq": {"block_size": 128, "damp": 0.01, "act_order": "static"}}
    llmc_rows = {}
    if args.llmc_from:
        earlier = json.loads(Path(args.llmc_from).read_text())
        if earlier.get("protocol") != protocol:
            raise ConfigError(f"--llmc-from {args.llmc_from}: its protocol {earlier.get('protocol')} is not this "
                              f"run's {protocol}")
        llmc_rows = {r["bits"]: {**r["llmc"], "reused_from": {"json": args.llmc_from, "command": earlier["command"],
                                                               "git_commit": earlier["machine"]["git_commit"],
                                                               "date": earlier["machine"]["date"]}}
                     for r in earlier["rows"]}
        if missing := [b for b in bits if b not in llmc_rows]:
            raise ConfigError(f"--llmc-from {args.llmc_from} has no llm-compressor row at W{missing}")
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("protocol") != protocol:
        result = {}  # a different protocol: start afresh rather than mixing rows
    result.update({
        "benchmark": "llmc_side_by_side", "model": args.model, "model_dir": str(model_dir), "protocol": protocol,
        "command": shlex.join([".venv/bin/python", *sys.argv]), "ours_python": args.ours_python,
        "machine": {**machine_info(torch.float32), "note": args.note},
        "rows": [r for r in result.get("rows", []) if r["bits"] not in bits],
    })
    result.setdefault("runs", []).append({"command": result["command"], "date": result["machine"]["date"],
                                          "bits": bits, "note": args.note})

    with tempfile.TemporaryDirectory(prefix="llmc-side-") as tmp:
        tmpdir = Path(tmp)
        data = tmpdir / "ids.pt"
        calib = calibration_set(tok, "essays", nsamples=args.nsamples, seqlen=512)
        windows = eval_windows(tok, "wiki", 512, args.windows)
        torch.save({"calib": calib, "eval": windows}, data)
        # A fingerprint of the ids, so that rows of different runs can be checked to share them.
        result["ids_sha256"] = {k: hashlib.sha256(t.long().numpy().tobytes()).hexdigest()
                                for k, t in (("calib", calib), ("eval", windows))}
        common = ["--data", str(data), "--model-dir", str(model_dir), "--threads", str(args.threads)]
        ours_cmd = [args.ours_python, str(Path(__file__).resolve()), "--ours-worker", *common]
        llmc_cmd = [args.llmc_python, str(HERE / "_llmc_worker.py"), *common]

        if args.no_base_check:
            result["base_check"] = "not run (--no-base-check)"
        elif not (args.skip_base_check and "base_check" in result):
            theirs = _run([*llmc_cmd, "--base", "--out", str(tmpdir / "lb.json")], tmpdir / "lb.json",
                          tmpdir / "lb.log", "llm-compressor harness, base model")
            ours = _run([*ours_cmd, "--base", "--out", str(tmpdir / "ob.json")], tmpdir / "ob.json",
                        tmpdir / "ob.log", "compactlm harness, base model")
            rel = abs(theirs["ppl"] - ours["ppl"]) / ours["ppl"]
            result["base_check"] = {"ppl_llmc_harness": theirs["ppl"], "ppl_ours": ours["ppl"],
                                    "relative_difference": rel, "tokens": ours["tokens"],
                                    "llmc_versions": theirs["versions"]}
            write_json_atomic(path, result)
            # Both load the same fp32 weights and run the same loop: anything beyond float noise is a harness bug.
            if rel > 1e-4:
                raise SystemExit(f"harness mismatch: base PPL {theirs['ppl']:.4f} (llm-compressor venv) vs "
                                 f"{ours['ppl']:.4f} (ours); not trusting the comparison")

        for b in bits:
            setting = ["--bits", str(b), "--group-size", str(args.group_size)]
            jobs = [([*llmc_cmd, *setting, "--out", str(tmpdir / f"l{b}.json")], tmpdir / f"l{b}.json",
                     tmpdir / f"l{b}.log", f"llm-compressor GPTQModifier W{b} g{args.group_size}"),
                    ([*ours_cmd, *setting, *(["--overrides", json.dumps(main_overrides)] if main_overrides else []),
                      "--out", str(tmpdir / f"o{b}.json")], tmpdir / f"o{b}.json",
                     tmpdir / f"o{b}.log", f"compactlm GPTQ W{b} g{args.group_size}")]
            if args.autoround_python:
                jobs.append(([args.autoround_python, str(HERE / "_autoround_worker.py"), *common, *setting,
                              "--iters", str(args.autoround_iters), "--out", str(tmpdir / f"a{b}.json")],
                             tmpdir / f"a{b}.json", tmpdir / f"a{b}.log",
                             f"AutoRound iters={args.autoround_iters} W{b} g{args.group_size}"))
            if args.llmc_from:  # llm-compressor's side was measured before, on the same ids
                jobs.pop(0)
            done = _run_together(jobs) if args.concurrent else [_run(*job) for job in jobs]
            theirs, ours, *autoround = [llmc_rows[b], *done] if args.llmc_from else done
            row = {"bits": b, "group_size": args.group_size, "concurrent": args.concurrent,
                   "ours_overrides": main_overrides,
                   "llmc": theirs, "ours": ours,
                   "ratio_ours_over_llmc": {k: ours[k] / theirs[k]
                                            for k in RATIO_KEYS},
                   "rss_growth_mib": {"llmc": theirs["peak_rss_mib"] - theirs["rss_before_mib"],
                                      "ours": ours["peak_rss_mib"] - ours["rss_before_mib"]},
                   "targets": {"ppl_at_least_as_good": ours["ppl"] <= theirs["ppl"],
                               "time_le_1x": ours["quantize_seconds"] <= theirs["quantize_seconds"],
                               "cpu_time_le_1x": ours["quantize_cpu_seconds"] <= theirs["quantize_cpu_seconds"],
                               "rss_le_1x": ours["peak_rss_mib"] <= theirs["peak_rss_mib"]}}
            if autoround:
                row["autoround"] = autoround[0]
                row["ratio_ours_over_autoround"] = {k: ours[k] / autoround[0][k] for k in RATIO_KEYS}
                row["targets"]["ppl_at_least_as_good_as_autoround"] = ours["ppl"] <= autoround[0]["ppl"]
            for name, overrides in variants.items() if b in variant_bits else ():
                out = tmpdir / f"o{b}-{name}.json"
                v = _run([*ours_cmd, *setting, "--overrides", json.dumps(overrides), "--out", str(out)], out,
                         tmpdir / f"o{b}-{name}.log", f"compactlm GPTQ W{b} g{args.group_size} [{name}]")
                row.setdefault("ours_variants", {})[name] = {
                    **v, "overrides": overrides,
                    "ratio_over_llmc": {k: v[k] / theirs[k] for k in RATIO_KEYS}}
            result["rows"] = sorted([*result["rows"], row], key=lambda r: -r["bits"])
            write_json_atomic(path, result)
            r = row["ratio_ours_over_llmc"]
            print(f"W{b}: PPL ours {ours['ppl']:.3f} vs llm-compressor {theirs['ppl']:.3f}; ours/theirs time "
                  f"{r['quantize_seconds']:.2f}x, peak RSS {r['peak_rss_mib']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
