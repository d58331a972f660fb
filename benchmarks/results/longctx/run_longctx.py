"""Side-by-side long-context quality runs (PPL-decode, RULER-syn) of KV-cache and attention methods.

Why this script and not ``compactlm eval ...``: the CLI runs every ``--kv`` × ``--attn`` *combination*
when both flags are given, while these runs want the *union* (each kv method and each attention method
on its own, all beside full attention, all sharing one prefill per window/prompt). It calls the same
public runners (:func:`compactlm.evaluation.ppl_decode.run_ppl_decode`,
:func:`compactlm.evaluation.ruler.run_ruler`) one chunk at a time (one window; one task × length) and
rewrites the JSON after every chunk, so a run that dies or is cut leaves its finished part on disk,
marked ``"complete": false``. Chunking changes nothing measured: the runners prefill per window/prompt
anyway, and RULER-syn prompts are seeded per (task, length, index).

    python benchmarks/results/longctx/run_longctx.py ppl-decode smollm2-135m --dtype bf16 --threads 1 \
        --kv int4,int2 --attn sals-25,quest --windows 5 --json benchmarks/results/longctx/ppl_decode_q.json
    python benchmarks/results/longctx/run_longctx.py ruler smollm2-135m --dtype bf16 --threads 1 \
        --kv int4,int2 --attn sals-25,quest,streaming --lengths 2k,4k --samples 5 --json ruler.json
    # one PPL-decode-q run split over two processes, then added up:
    python benchmarks/results/longctx/run_longctx.py ppl-decode ... --windows 3 --json a.json
    python benchmarks/results/longctx/run_longctx.py ppl-decode ... --first-window 3 --windows 2 --json b.json
    python benchmarks/results/longctx/run_longctx.py merge a.json,b.json --json merged.json
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time


def _methods(model, kv: str | None, attn: str | None):
    from compactlm.config import parse_spec
    from compactlm.evaluation.methods import build_method

    out = []
    for kind, names in (("kv", kv), ("attn", attn)):
        for spec in (x.strip() for x in (names or "").split(",") if x.strip()):
            # "name@field=value@field=value" builds a variant with options, labelled by the whole spec
            # (each config types the strings; e.g. "sals-25@keep=1.0" is SALS without selection).
            n, opts = parse_spec(spec)
            if n in ("full", "none"):
                continue
            m = build_method(model, kind, n, opts)
            if opts:
                m.name = spec
            out.append(m)
    return out


def _header(args, protocol: str, started: float) -> dict:
    from compactlm.utils import machine_info

    info = machine_info(args.dtype)  # names COMPACTLM_SNAPSHOT's commit when run from a `git archive` snapshot
    info["load_note"] = ("2-core CPU shared with other engineers' benchmarks during the run; "
                         f"torch threads {args.threads}")
    return {"model": args.model, "dtype": args.dtype, "protocol": protocol,
            "command": shlex.join(["python", *sys.argv]), "machine": info,
            "seconds": time.perf_counter() - started}


def run_ppl(args, model, tok, methods) -> None:
    from compactlm.data.calib import eval_windows
    from compactlm.evaluation.ppl_decode import protocol_name, run_ppl_decode
    from compactlm.utils import write_json_atomic

    # --first-window N: windows N..N+windows-1 of the protocol text, so one protocol run can be split over
    # processes (window numbers in per_window stay the protocol's); `merge` adds the parts back up exactly.
    ids = eval_windows(tok, "wiki", seqlen=args.window_len, windows=args.first_window + args.windows)
    ids = ids[args.first_window:]
    totals: dict[str, list] = {}
    descriptions: dict[str, str] = {}
    per_window: list[dict] = []
    started = time.perf_counter()
    for w in range(ids.size(0)):
        t0 = time.perf_counter()
        r = run_ppl_decode(model, tok, methods, decoded=args.decoded, input_ids=ids[w: w + 1])
        row = {"window": args.first_window + w, "seconds": time.perf_counter() - t0, "ppl": {}}
        for name, m in r.methods.items():
            acc = totals.setdefault(name, [0.0, 0, 0.0, 0])
            acc[0] += m["nll"] * m["tokens"]
            acc[1] += m["tokens"]
            acc[2] += (args.decoded - 1) / m["decode_tok_per_s"]
            acc[3] += args.decoded - 1
            descriptions[name] = m["description"]
            row["ppl"][name] = m["ppl"]
        per_window.append(row)
        done = w + 1
        full_ppl = math.exp(totals["full"][0] / totals["full"][1])
        out = _header(args, protocol_name(done, args.window_len, args.decoded), started)
        if args.first_window:
            out["protocol"] = (f"part of a split run: windows {args.first_window}..{args.first_window + done - 1} "
                               f"of the protocol text ({out['protocol']})")
        out.update({"complete": done == args.windows, "windows": done, "windows_planned": args.windows,
                    "first_window": args.first_window,
                    "window_len": args.window_len, "decoded": args.decoded, "methods": {}, "per_window": per_window})
        for name, (nll, n, secs, steps) in totals.items():
            ppl = math.exp(nll / n)
            out["methods"][name] = {"ppl": ppl, "nll": nll / n, "tokens": n, "vs_full": ppl / full_ppl,
                                    "delta_pct": 100 * (ppl / full_ppl - 1), "decode_tok_per_s": steps / secs,
                                    "description": descriptions[name]}
        write_json_atomic(args.json, out)
        print(f"window {done}/{args.windows} ({row['seconds']:.0f} s): "
              + ", ".join(f"{k} {v['ppl']:.3f}" for k, v in out["methods"].items()), flush=True)


def merge_ppl(parts: list[str], out_path: str) -> None:
    """Add split PPL-decode runs (same methods, disjoint windows) into one result: NLL summed over tokens."""
    import json

    from compactlm.evaluation.ppl_decode import protocol_name
    from compactlm.utils import write_json_atomic

    runs = [json.load(open(p)) for p in parts]
    windows = sorted(w["window"] for r in runs for w in r["per_window"])
    if len(set(windows)) != len(windows) or windows != list(range(len(windows))):
        raise SystemExit(f"merge: the parts must cover windows 0..N-1 once each, got {windows}")
    names = [set(r["methods"]) for r in runs]
    if any(n != names[0] for n in names):
        raise SystemExit(f"merge: the parts ran different methods: {names}")
    first = runs[0]
    methods = {}
    for name in first["methods"]:
        nll = sum(r["methods"][name]["nll"] * r["methods"][name]["tokens"] for r in runs)
        tokens = sum(r["methods"][name]["tokens"] for r in runs)
        secs = sum((r["decoded"] - 1) * r["windows"] / r["methods"][name]["decode_tok_per_s"] for r in runs)
        methods[name] = {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens,
                         "decode_tok_per_s": (first["decoded"] - 1) * len(windows) / secs,
                         "description": first["methods"][name]["description"]}
    full = methods["full"]["ppl"]
    for m in methods.values():
        m.update({"vs_full": m["ppl"] / full, "delta_pct": 100 * (m["ppl"] / full - 1)})
    out = {k: first[k] for k in ("model", "dtype", "machine", "window_len", "decoded")}
    out.update({"protocol": protocol_name(len(windows), first["window_len"], first["decoded"]),
                "complete": all(r["complete"] for r in runs), "windows": len(windows),
                "merged_from": [{"path": p, "command": r["command"], "seconds": r["seconds"],
                                 "machine": r["machine"]} for p, r in zip(parts, runs, strict=True)],
                "command": shlex.join(["python", *sys.argv]), "methods": methods,
                "per_window": sorted((w for r in runs for w in r["per_window"]), key=lambda w: w["window"])})
    write_json_atomic(out_path, out)
    print(", ".join(f"{k} {v['ppl']:.3f}" for k, v in methods.items()))


def run_ruler_chunks(args, model, tok, methods) -> None:
    from compactlm.evaluation.ruler import (
        TASKS,
        check_tasks,
        parse_lengths,
        parse_sample_indices,
        protocol_name,
        run_ruler,
    )
    from compactlm.utils import write_json_atomic

    lengths = parse_lengths(args.lengths)
    tasks = check_tasks(args.tasks.split(",")) if args.tasks else TASKS
    indices = parse_sample_indices(args.sample_indices, args.samples) if args.sample_indices else None
    records: list[dict] = []
    descriptions: dict[str, str] = {}
    chunks = [(n, t) for n in lengths for t in tasks]
    started = time.perf_counter()
    for c, (n, t) in enumerate(chunks):
        t0 = time.perf_counter()
        r = run_ruler(model, tok, methods, lengths=[n], samples=args.samples, tasks=[t], seed=args.seed,
                      max_new_tokens=args.max_new_tokens, sample_indices=indices)
        records += r.records
        descriptions.update({k: v["description"] for k, v in r.methods.items()})
        done = chunks[: c + 1]
        out = _header(args, protocol_name(lengths, args.samples, tasks), started)
        if indices is not None:
            out["protocol"] += f" — PART: samples {args.sample_indices} ({len(indices)} of {args.samples})"
        complete = c + 1 == len(chunks)
        if not complete:
            out["protocol"] += f" — INCOMPLETE: {c + 1}/{len(chunks)} (length, task) chunks done"
        out.update({"complete": complete, "lengths": lengths, "tasks": list(tasks), "samples": args.samples,
                    "sample_indices": indices, "chunks_done": [list(x) for x in done],
                    "methods": _aggregate(records, descriptions, done),
                    "records": records})
        write_json_atomic(args.json, out)
        full = out["methods"]["full"]["score"]
        print(f"chunk {c + 1}/{len(chunks)} {n} {t} ({time.perf_counter() - t0:.0f} s): full so far {full:.1f}; "
              + ", ".join(f"{k} {v['score']:.1f}" for k, v in out["methods"].items()), flush=True)


def _aggregate(records: list[dict], descriptions: dict[str, str], done: list[tuple[int, str]]) -> dict:
    """The runner's aggregation (mean over samples, then tasks per length, then lengths) on the chunks done."""
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    lengths = sorted({n for n, _ in done})
    out = {}
    for name, desc in descriptions.items():
        rows = [r for r in records if r["method"] == name]
        by_length = {}
        for n in lengths:
            tasks = [t for m, t in done if m == n]
            per_task = {t: mean([r["score"] for r in rows if r["length"] == n and r["task"] == t]) for t in tasks}
            by_length[str(n)] = {"tasks": per_task, "score": mean(list(per_task.values()))}
        all_tasks = list(dict.fromkeys(t for _, t in done))
        per_task = {t: mean([by_length[str(n)]["tasks"][t] for n in lengths if t in by_length[str(n)]["tasks"]])
                    for t in all_tasks}
        out[name] = {"score": mean(list(per_task.values())), "tasks": per_task, "by_length": by_length,
                     "description": desc}
    full = out.get("full", {}).get("score")
    if full is not None:
        for v in out.values():
            v["delta_vs_full"] = v["score"] - full
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("protocol", choices=["ppl-decode", "ruler", "merge"])
    p.add_argument("model", help="model spec; for `merge`: comma-separated JSON parts of one split PPL-decode run")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv", default=None)
    p.add_argument("--attn", default=None)
    p.add_argument("--json", required=True)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--first-window", type=int, default=0)
    p.add_argument("--window-len", type=int, default=4096)
    p.add_argument("--decoded", type=int, default=256)
    p.add_argument("--lengths", default="2k,4k")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--sample-indices", default="", metavar="SPEC",
                   help="run only these of the --samples prompts per task, a slice (0::4) or a list (0,4,8): parts "
                        "of one run, merged with ruler_table.py --merge")
    p.add_argument("--tasks", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    if args.protocol == "merge":
        merge_ppl(args.model.split(","), args.json)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from compactlm.models import load
    from compactlm.utils import set_quiet

    set_quiet(True)
    model, tok = load(args.model, dtype=args.dtype)
    methods = _methods(model, args.kv, args.attn)
    print("methods: full, " + ", ".join(m.name for m in methods), flush=True)
    (run_ppl if args.protocol == "ppl-decode" else run_ruler_chunks)(args, model, tok, methods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
