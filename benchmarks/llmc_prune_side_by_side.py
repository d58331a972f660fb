"""compactlm Wanda / SparseGPT vs llm-compressor's WandaPruningModifier / SparseGPTModifier, side by side.

Issue 4's target: our Wanda and SparseGPT match or beat llm-compressor's (PPL-wiki-512), measured in one run on
identical calibration ids and evaluation windows.

    .venv/bin/python benchmarks/llmc_prune_side_by_side.py --methods wanda,sparsegpt --sparsity 0.5 --threads 1 \
        --json benchmarks/results/prune/llmc_prune_side_by_side.json
    .venv/bin/python benchmarks/llmc_prune_side_by_side.py --methods wanda,sparsegpt --pattern 2:4 --threads 1 \
        --json benchmarks/results/prune/llmc_prune_side_by_side_2of4.json

How it stays fair (the same scheme as ``benchmarks/llmc_side_by_side.py`` for GPTQ):
- The same token ids: this driver draws CALIB-pg-512-q (32 x 512) and PPL-wiki-512-q (40 windows) once, saves
  them to a temp ``.pt``, and both sides read it.
- Each side runs in its own fresh subprocess: llm-compressor in its own venv (``/work/venvs/llmc``, llmcompressor
  0.14; this file's ``--llmc-worker`` mode imports no compactlm), ours through ``--ours-worker``. Both load the
  same fp32 safetensors folder, use the same torch thread count, and time only the pruning call; peak RSS
  (VmHWM) is read right after it, before evaluation. Both evaluate with the one loop in ``_llmc_worker.py``.
- Settings: unstructured ``--sparsity`` per output row (both tools' Wanda compare per row), or ``--pattern N:M``
  (ours: keep N of every M consecutive inputs; llm-compressor spells the same mask ``mask_structure="<M-N>:M"``,
  the count it *prunes* per group of M -- "2:4" and "4:8" read the same either way); SparseGPT block 128,
  dampening 0.01 (llm-compressor's defaults; ours the same); every decoder-layer Linear pruned, ``lm_head``
  (the tied embedding) left dense on both sides. llm-compressor 0.14 is told ``ignore=["re:.*lm_head"]``: with
  ``targets=["Linear"]`` it names each target ``"<module name>."`` (trailing dot), so the plain ``"lm_head"``
  this benchmark passed before 5 Dec 2026 matched nothing and its Wanda/SparseGPT pruned the tied head and
  embedding as well (every row measured before then). Each worker now checks the output and input embeddings
  are bit-identical after pruning, records it (``head_unchanged``), and the driver stops on a side that changed them.
  What still differs: llm-compressor's pipeline collects every
  linear of a layer in one pass with one sequence per forward; our SparseGPT is true-sequential (q/k/v, o,
  gate/up, down) with 8 sequences per forward and allocates the pruned count exactly per row.
- Each side's achieved sparsity over the decoder linears is recorded, so a PPL gap cannot hide a sparsity gap;
  with ``--pattern`` also each side's N:M validity (groups of M holding at most N non-zeros), measured on the
  pruned weights by the same code in both venvs.
- ``--concurrent`` runs the two sides of each method at the same time (each in its own process, one thread each)
  so both see the same load; the default runs them one after the other (one heavy process on a shared machine).
"""

from __future__ import annotations

import argparse
import hashlib
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


def nm_validity(model, n: int, m: int) -> dict:
    """How many groups of ``m`` consecutive inputs, over every decoder-layer Linear's rows, hold at most ``n``
    non-zeros (valid N:M) and exactly ``n`` (no group pruned beyond the pattern). Plain torch: runs in both venvs."""
    groups = valid = exact = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "layers." in name:
            w = module.weight
            if w.shape[1] % m:
                raise ValueError(f"{name}: {w.shape[1]} inputs are not a multiple of M={m}")
            nonzero = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)  # (out, in/m)
            groups += nonzero.numel()
            valid += int((nonzero <= n).sum())
            exact += int((nonzero == n).sum())
    return {"pattern": f"{n}:{m}", "groups": groups, "valid_groups": valid, "exact_groups": exact,
            "valid_fraction": valid / max(groups, 1), "all_valid": valid == groups}


def _heads(model) -> dict[str, torch.Tensor]:
    return {"output": model.get_output_embeddings().weight.detach(),
            "input": model.get_input_embeddings().weight.detach()}


def _digest(t: torch.Tensor) -> str:
    # Hashes the tensor's own buffer (no copy): a snapshot clone of the tied head would sit in the peak RSS that
    # the worker measures (216 MiB on the default model, both embeddings in fp32).
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


def head_snapshot(model) -> dict[str, str]:
    """SHA-256 of the output and input embedding weights (one tensor twice when tied), taken before pruning."""
    return {k: _digest(w) for k, w in _heads(model).items()}


def head_check(model, before: dict[str, str]) -> dict:
    """Whether pruning left the lm_head and the embedding bit-identical, and their zero fractions now."""
    now = _heads(model)
    return {"head_unchanged": {k: _digest(now[k]) == h for k, h in before.items()},
            "head_zero_fraction": {k: float((w == 0).float().mean()) for k, w in now.items()}}


def parse_setting(sparsity: float | None, pattern: str | None) -> dict:
    """``--sparsity`` / ``--pattern`` -> the one setting both sides run: a file label, our config fields and
    llm-compressor's modifier fields. Raises ``ConfigError`` naming the flag to change."""
    from compactlm.errors import ConfigError
    from compactlm.prune.common import parse_pattern

    if pattern is not None:
        if sparsity is not None:
            raise ConfigError(f"give --sparsity or --pattern, not both (got {sparsity} and {pattern!r}): "
                              "N:M fixes the sparsity at 1 - N/M")
        n, m = parse_pattern(pattern)
        # llm-compressor's "a:b" prunes a of every b (its Wanda/SparseGPT topk the a lowest scores per group);
        # its required `sparsity` is unused for N:M but set to the same fraction so the record reads true.
        return {"label": f"{n}of{m}", "structure": f"{n}:{m} (keep {n} of every {m} consecutive inputs)",
                "nm": [n, m], "sparsity": (m - n) / m, "ours": {"pattern": f"{n}:{m}"},
                "llmc": {"sparsity": (m - n) / m, "mask_structure": f"{m - n}:{m}"}}
    s = 0.5 if sparsity is None else sparsity
    if not 0 < s < 1:
        raise ConfigError(f"--sparsity must be in (0, 1), got {s}")
    return {"label": f"{100 * s:g}pct", "structure": "unstructured, per output row", "nm": None, "sparsity": s,
            "ours": {"sparsity": s}, "llmc": {"sparsity": s, "mask_structure": "0:0"}}


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
        # The tied lm_head / embedding must come out untouched on both sides (module docstring).
        heads_before = head_snapshot(model)
        out["rss_before_mib"] = rss_mib()
        start, cpu = time.perf_counter(), time.process_time()
        out["config"] = _prune_llmc(model, calib, args) if args.llmc_worker else _prune_ours(model, calib, args)
        out["prune_seconds"] = time.perf_counter() - start
        out["prune_cpu_seconds"] = time.process_time() - cpu  # moves far less than wall time on a shared CPU
        out["peak_rss_mib"] = peak_rss_mib()
        out["sparsity"] = decoder_sparsity(model)
        out.update(head_check(model, heads_before))
        del heads_before
        if args.nm:
            out["nm_validity"] = nm_validity(model, *(int(x) for x in args.nm.split(":")))
    start = time.perf_counter()
    ppl, tokens, window_nll = perplexity(model, windows)
    out.update(ppl=ppl, tokens=tokens, window_nll=window_nll, eval_seconds=time.perf_counter() - start)
    write_json_atomic(args.out, out)
    print(json.dumps({k: out.get(k) for k in ("method", "ppl", "prune_seconds", "sparsity")}), flush=True)
    return 0


def _prune_llmc(model, calib, args) -> dict:
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    # "re:" form: llm-compressor 0.14 matches the ignore list against "lm_head." (module docstring)
    common = {**json.loads(args.spec), "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
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
    spec = json.loads(args.spec)
    config = Wanda(**spec) if args.method == "wanda" else SparseGPT(**spec)
    compactlm.prune(model, config, calib=calib)
    return config.to_dict()


def _earlier_ours(path: str, setting: dict, methods: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """compactlm's rows of an earlier run of this benchmark at the same setting and protocol, by method.
    Raises ``ConfigError`` when the file's setting, protocol or methods differ from this run's."""
    from compactlm.errors import ConfigError

    earlier = json.loads(Path(path).read_text())
    proto = earlier.get("protocol", {})
    want = {"sparsity": setting["sparsity"], "structure": setting["structure"],
            "ppl": f"PPL-wiki-512{'-q' if args.windows == 40 else ''} ({args.windows} windows)",
            "calibration": f"CALIB-pg-512{'-q' if args.nsamples == 32 else ''} ({args.nsamples} x 512)"}
    wrong = {k: (proto.get(k), v) for k, v in want.items() if proto.get(k) != v}
    if wrong:
        raise ConfigError(f"--ours-from {path}: its protocol differs from this run's (file vs now: {wrong})")
    rows = {r["method"]: r["ours"] for r in earlier.get("rows", [])}
    missing = [m for m in methods if m not in rows]
    if missing:
        raise ConfigError(f"--ours-from {path} has no compactlm row for {missing}; drop them from --methods")
    return {m: {**rows[m], "reused_from": {"json": path, "command": earlier.get("command"),
                                           "date": earlier.get("machine", {}).get("date")}} for m in methods}


def _run(cmd: list[str], out: Path, log: Path, label: str) -> dict:
    """One side in a fresh subprocess: the GPTQ side-by-side's runner, printing the pruning keys."""
    return _run_together([(cmd, out, log, label)])[0]


def _run_together(jobs: list[tuple[list[str], Path, Path, str]]) -> list[dict]:
    """Both sides at once (``--concurrent``), each in its own fresh subprocess: the GPTQ side-by-side's runner."""
    from llmc_side_by_side import _run_together as run_sides  # benchmarks/ is on sys.path when run as a script

    return run_sides(jobs, keys=(*RATIO_KEYS, "sparsity"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--sparsity", type=float, default=None, help="unstructured, per output row (default 0.5)")
    p.add_argument("--pattern", default=None, help="N:M instead of --sparsity, e.g. 2:4 (keep N of every M)")
    p.add_argument("--concurrent", action="store_true",
                   help="run the two sides of each method at the same time (two processes: an idle machine only)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (32 = CALIB-pg-512-q)")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (40 = PPL-wiki-512-q)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--llmc-python", default=LLMC_PYTHON)
    p.add_argument("--skip-base-check", action="store_true",
                   help="skip the dense-model harness check (two evaluations) that an earlier run of the same "
                        "session made; the JSON says so")
    p.add_argument("--ours-from", default="", metavar="JSON",
                   help="take compactlm's rows from an earlier JSON of the same setting and protocol instead of "
                        "re-running them (our pruning is deterministic on the same ids); the rows say where from")
    p.add_argument("--json", help="result JSON (required)")
    p.add_argument("--note", default="", help="how the machine was shared during the run (each side records its load)")
    p.add_argument("--llmc-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ours-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--nm", help=argparse.SUPPRESS)
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

    setting = parse_setting(args.sparsity, args.pattern)
    methods = args.methods.split(",")
    if not set(methods) <= {"wanda", "sparsegpt"}:
        raise ConfigError(f"--methods takes wanda and/or sparsegpt (comma-separated), got {args.methods!r}")
    if not Path(args.llmc_python).is_file():
        raise ConfigError(f"--llmc-python {args.llmc_python} does not exist: build llm-compressor's venv first "
                          "(docs/quantization.md, 'Side by side with llm-compressor')")
    ours_rows = _earlier_ours(args.ours_from, setting, methods, args) if args.ours_from else {}
    torch.set_num_threads(args.threads)
    _, tok = compactlm.models.load("smollm2-135m")
    model_dir = default_model_dir()
    result = {"benchmark": "llmc_prune_side_by_side", "model": "smollm2-135m", "model_dir": str(model_dir),
              "protocol": {"ppl": f"PPL-wiki-512{'-q' if args.windows == 40 else ''} ({args.windows} windows)",
                           "calibration": f"CALIB-pg-512{'-q' if args.nsamples == 32 else ''} ({args.nsamples} x 512)",
                           "sparsity": setting["sparsity"], "structure": setting["structure"],
                           "ours_config": setting["ours"], "llmc_modifier": setting["llmc"],
                           "sides": "at the same time" if args.concurrent else "one after the other"},
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
        if args.skip_base_check:
            result["base_check"] = "skipped (--skip-base-check): made by an earlier run of this session"
        else:
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
        nm = ["--nm", ":".join(map(str, setting["nm"]))] if setting["nm"] else []
        for m in methods:
            jobs = [([*cmd, "--method", m, "--spec", json.dumps(spec), *nm, "--out", str(tmpdir / f"{side}{m}.json")],
                     tmpdir / f"{side}{m}.json", tmpdir / f"{side}{m}.log", f"{tool} {m} {setting['label']}")
                    for cmd, spec, side, tool in ((llmc, setting["llmc"], "l", "llm-compressor"),
                                                  (ours, setting["ours"], "o", "compactlm"))]
            if m in ours_rows:  # our side was measured before on the same ids: run llm-compressor's only
                t, o = _run(*jobs[0]), ours_rows[m]
            else:
                t, o = _run_together(jobs) if args.concurrent else [_run(*job) for job in jobs]
            result["rows"].append({"method": m, "setting": setting["label"], "sparsity": setting["sparsity"],
                                   "llmc": t, "ours": o,
                                   "ratio_ours_over_llmc": {k: o[k] / t[k] for k in RATIO_KEYS},
                                   "ppl_at_least_as_good": o["ppl"] <= t["ppl"]})
            result["machine"]["load_average_end"] = os.getloadavg()
            write_json_atomic(path, result)
            changed = [side["tool"] for side in (t, o) if not all(side.get("head_unchanged", {"?": True}).values())]
            if changed:
                raise SystemExit(f"{', '.join(changed)} changed the lm_head / tied embedding while pruning {m}: the "
                                 f"rows in {path} are not like for like (head_unchanged)")
            valid = "".join(f", N:M valid {side['nm_validity']['valid_fraction']:.4f}" for side in (o, t)
                            if "nm_validity" in side)
            print(f"{m}: PPL ours {o['ppl']:.3f} vs llm-compressor {t['ppl']:.3f}{valid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
