"""Markdown tables of union RULER-syn JSONs (``run_longctx.py ruler``): per method and length, the score, Δ vs
full, per-task scores, and how many prompts differ from full attention (in generated text, and in score).

Why count prompts: at n samples per task one prompt moves a single-answer task by 100/n points (less for
multi-answer tasks) and the 8-task mean by 100/(8n), so a Δ of a point or two is one or two prompts; the counts
say how many.

The Δ interval is a paired bootstrap over prompts, stratified by task (:func:`paired_interval`): a method is
"within 1 point of full" with confidence only when its whole interval lies within ±1.

Several JSONs in one call are printed one after another; with ``--merge`` they are read as parts of one run and
tabled together: a length whose tasks were run in separate processes (e.g. the 4K union cut before ``passkey``,
and that chunk run later on its own). Merging needs the same methods and samples in every part and no
(method, task, length, sample) twice; each part's command and commit are listed, because the parts may come from
different commits (a prompt is seeded by task, length and index, so the parts' prompts are the protocol's).
Parts may also split the samples (``run_longctx.py ruler --sample-indices 0::4``, then ``1::4`` …): the merged run
is complete only when its chunks and its samples are all there, and each length's header says how many samples
it holds.

JSONs of ``benchmarks/prefill_ruler.py`` (dense vs sparse prefill) are read too: they run every (length, task) of
their lists in one go and have no ``chunks_done``/``complete`` keys, so all their chunks count as done.

``--pool`` puts several lengths together (the protocol's score averages the lengths): the files are grouped by
their methods and lengths, each group is merged as above and must be complete, and the methods common to all
groups are scored over every length — the mean over lengths of each length's 8-task mean — with the paired
bootstrap stratified by (length, task). At 20 samples, 2K + 4K + 8K pool 480 prompts per method, which narrows
the interval of a small Δ (issue 5's "int4 within 0.5 points") that no single length can decide.

    python benchmarks/results/longctx/ruler_table.py benchmarks/results/longctx/ruler_syn_q_2k_union_epyc.json
    python benchmarks/results/longctx/ruler_table.py --merge benchmarks/results/longctx/ruler_syn_q_4k_union_epyc.json \
        benchmarks/results/longctx/ruler_syn_q_4k_passkey_union_epyc.json
    cd benchmarks/results/longctx && python ruler_table.py --pool ruler_syn_{2k,4k}_s20_{a,b}_epyc.json \
        ruler_syn_8k_s20_i{0,1,2}s4_{a,b}_epyc.json ruler_syn_8k_s20_i3s4_p{1,2,3,4}_epyc.json
"""

from __future__ import annotations

import json
import random
import sys


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def paired_interval(diffs: dict, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the 8-task mean of (method − full) by a paired bootstrap over prompts.

    ``diffs`` maps each task (or each (length, task) stratum, :func:`pool`) to its prompts' score differences
    against full on the same prompt. Prompts are resampled with replacement inside each stratum (so every task
    keeps its weight in the mean, as in the score), and the pairing keeps the prompt-to-prompt noise both methods
    share out of the interval.
    """
    rng = random.Random(seed)
    tasks = [t for t, d in diffs.items() if d]
    means = []
    for _ in range(resamples):
        per_task = []
        for t in tasks:
            d = diffs[t]
            per_task.append(sum(d[rng.randrange(len(d))] for _ in d) / len(d))
        means.append(sum(per_task) / len(per_task))
    means.sort()
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _chunks(d: dict) -> list[list]:
    """The [length, task] chunks a JSON finished; a prefill_ruler JSON (no ``chunks_done``) finished them all."""
    return d["chunks_done"] if "chunks_done" in d else [[n, t] for n in d["lengths"] for t in d["tasks"]]


def _indices(d: dict) -> list[int]:
    """The sample indices a JSON ran (all of ``range(samples)`` unless it is a ``--sample-indices`` part)."""
    return d.get("sample_indices") or list(range(d["samples"]))


def merge(paths: list[str], parts: list[dict] | None = None) -> dict:
    """One union result from parts run separately (same methods and samples, disjoint chunks); ``parts`` are the
    files' contents when the caller has read them already."""
    parts = parts if parts is not None else [json.load(open(p)) for p in paths]
    methods = [list(d["methods"]) for d in parts]
    if any(m != methods[0] for m in methods):
        raise SystemExit(f"--merge: the parts ran different methods: {methods}")
    samples = {d["samples"] for d in parts}
    if len(samples) != 1:
        raise SystemExit(f"--merge: the parts ran different sample counts: {sorted(samples)}")
    samples_n = next(iter(samples))
    keys = [(r["method"], r["task"], r["length"], r["index"]) for d in parts for r in d["records"]]
    if len(set(keys)) != len(keys):
        raise SystemExit("--merge: the parts overlap (a method, task, length and sample appears twice)")
    tasks = list(dict.fromkeys(t for d in parts for t in d["tasks"]))
    chunks = [c for d in parts for c in _chunks(d)]
    lengths = sorted({n for d in parts for n in d["lengths"]})
    # Complete when every (length, task) of the parts' task lists is done by some part (a part cut before its
    # last chunk is completed by the part that ran that chunk).
    indices = sorted({i for d in parts for i in _indices(d)})
    complete = all([n, t] in chunks for n in lengths for t in tasks) and len(indices) == samples_n
    return {"protocol": " + ".join(d["protocol"] for d in parts), "complete": complete,
            "seconds": sum(d["seconds"] for d in parts), "samples": samples_n,
            "sample_indices": indices, "tasks": tasks,
            "chunks_done": chunks, "methods": {m: None for m in methods[0]},
            "records": [r for d in parts for r in d["records"]],
            "parts": [{"path": p, "command": d["command"], "commit": d["machine"].get("git_commit"),
                       "seconds": d["seconds"], "complete": d.get("complete", True)}
                      for p, d in zip(paths, parts, strict=True)]}


def pool(paths: list[str]) -> dict:
    """Every length of the given files together: groups (same methods and lengths) merged, then pooled.

    Two groups may hold the same prompts of one method (each separate run has its own full attention): such
    records are kept once if they agree in output and score, and are an error if not (the run is not
    reproducible, and which copy to pair against would be a choice). A method enters the pooled table only if
    it ran every prompt full attention ran, at every length.
    """
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for p in paths:
        d = json.load(open(p))
        groups.setdefault((tuple(d["methods"]), tuple(sorted(d["lengths"]))), []).append((p, d))
    records: dict[tuple, dict] = {}
    order: list[str] = []
    for (methods, lengths), loaded in groups.items():
        group = [p for p, _ in loaded]
        m = merge(group, [d for _, d in loaded])
        if not m["complete"]:
            raise SystemExit(f"--pool: the runs at length(s) {list(lengths)} are not complete ({' '.join(group)}): "
                             "pooling a partial length would weigh it by the prompts that happen to be there")
        order += [x for x in methods if x not in order]
        for r in m["records"]:
            key = (r["method"], r["task"], r["length"], r["index"])
            seen = records.setdefault(key, r)
            if (seen["score"], seen["output"].strip()) != (r["score"], r["output"].strip()):
                raise SystemExit(f"--pool: two runs disagree on {key} (score {seen['score']} vs {r['score']}); "
                                 "their prompts or outputs are not the same")
    full = {k[1:]: r for k, r in records.items() if k[0] == "full"}
    if not full:
        raise SystemExit("--pool: no full-attention records to pair against")
    lengths = sorted({k[1] for k in full})
    tasks = {n: sorted({k[0] for k in full if k[1] == n}) for n in lengths}
    if any(t != tasks[lengths[0]] for t in tasks.values()):
        raise SystemExit(f"--pool: the lengths ran different tasks ({tasks}); the pooled mean would weigh them "
                         "unevenly")
    methods = [m for m in order if all((m, *k) in records for k in full)]
    left_out = [m for m in order if m not in methods]
    return {"methods": methods, "left_out": left_out, "lengths": lengths, "tasks": tasks[lengths[0]],
            "records": [r for k, r in records.items() if k[0] in methods and k[1:] in full], "full": full,
            "samples": {n: len({k[2] for k in full if k[1] == n}) for n in lengths}}


def pooled_table(d: dict) -> str:
    """Per method: each length's 8-task mean, their mean, and Δ vs full with its paired interval."""
    lengths, tasks, full = d["lengths"], d["tasks"], d["full"]
    n_prompts = len(full)
    per_length_samples = ", ".join(f"{n}: {k} samples" for n, k in d["samples"].items())
    out = [f"All lengths pooled ({per_length_samples}; {len(tasks)} "
           f"tasks; {n_prompts} prompts per method, each length weighing 1/{len(lengths)}):", "",
           "| method | " + " | ".join(str(n) for n in lengths) + " | all lengths | Δ vs full | Δ 95 % interval | "
           "prompts ≠ full score |", "|---" * (len(lengths) + 5) + "|"]
    full_score = None
    for m in d["methods"]:
        rows = [r for r in d["records"] if r["method"] == m]
        per_length = {n: _mean([_mean([r["score"] for r in rows if r["length"] == n and r["task"] == t])
                                for t in tasks]) for n in lengths}
        score = _mean(list(per_length.values()))
        cells = " | ".join(f"{per_length[n]:.1f}" for n in lengths)
        if m == "full":
            full_score = score
            out.append(f"| full | {cells} | {score:.1f} | — | — | — |")
            continue
        pairs = [(r, full[(r["task"], r["length"], r["index"])]) for r in rows]
        diffs: dict[tuple, list[float]] = {}
        for r, f in pairs:
            diffs.setdefault((r["length"], r["task"]), []).append(r["score"] - f["score"])
        lo, hi = paired_interval(diffs)
        differ = sum(r["score"] != f["score"] for r, f in pairs)
        up = sum(r["score"] > f["score"] for r, f in pairs)
        out.append(f"| {m} | {cells} | {score:.1f} | {score - full_score:+.2f} | [{lo:+.2f}, {hi:+.2f}] | "
                   f"{differ}/{len(pairs)} ({up} up, {differ - up} down) |")
    if d["left_out"]:
        out += ["", "Not at every length (left out): " + ", ".join(d["left_out"])]
    return "\n".join(out)


def tables(d: dict, name: str) -> str:
    recs = d["records"]
    full = {(r["task"], r["length"], r["index"]): r for r in recs if r["method"] == "full"}
    methods = list(d["methods"])
    tasks = d["tasks"]
    chunks = _chunks(d)
    out = [f"`{name}` — {d['protocol']}; complete: {d.get('complete', True)}; {d['seconds'] / 60:.1f} min wall "
           f"for the whole run; chunks done {len(chunks)}"]
    out += [f"- part `{p['path']}`: commit {p['commit']}, {p['seconds'] / 60:.1f} min, complete {p['complete']}"
            for p in d.get("parts", [])]
    for n in sorted({r["length"] for r in recs}):
        done = [t for t in tasks if [n, t] in chunks]  # chunks_done holds [length, task] pairs
        n_samples = len({r["index"] for r in recs if r["length"] == n and r["method"] == "full"})
        of = "" if n_samples == d["samples"] else f" of {d['samples']}"
        out += ["", f"Length {n} ({len(done)} of {len(tasks)} tasks, {n_samples}{of} samples each; one single-answer "
                f"prompt moves a task by {100 / n_samples:.1f} points and the mean by "
                f"{100 / n_samples / max(1, len(done)):.2f}):", "",
                "| method | score | Δ vs full | Δ 95 % interval | " + " | ".join(done)
                + " | prompts ≠ full text | prompts ≠ full score |",
                "|---" * (len(done) + 6) + "|"]
        full_score = None
        for m in methods:
            rows = [r for r in recs if r["method"] == m and r["length"] == n and r["task"] in done]
            per_task = {t: _mean([r["score"] for r in rows if r["task"] == t]) for t in done}
            score = _mean(list(per_task.values()))
            if m == "full":
                full_score = score
            ref = [full[(r["task"], r["length"], r["index"])] for r in rows]
            text = sum(r["output"].strip() != f["output"].strip() for r, f in zip(rows, ref, strict=True))
            diff = sum(r["score"] != f["score"] for r, f in zip(rows, ref, strict=True))
            up = sum(r["score"] > f["score"] for r, f in zip(rows, ref, strict=True))
            delta = "—" if m == "full" else f"{score - full_score:+.1f}"
            if m == "full":
                interval = "—"
            else:  # paired bootstrap over prompts (see paired_interval)
                diffs = {t: [r["score"] - f["score"] for r, f in zip(rows, ref, strict=True) if r["task"] == t]
                         for t in done}
                lo, hi = paired_interval(diffs)
                interval = f"[{lo:+.1f}, {hi:+.1f}]"
            counts = "— | —" if m == "full" else f"{text}/{len(rows)} | {diff}/{len(rows)} ({up} up, {diff - up} down)"
            out.append(f"| {m} | {score:.1f} | {delta} | {interval} | " + " | ".join(f"{per_task[t]:.0f}" for t in done)
                       + f" | {counts} |")
    return "\n".join(out)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--merge":
        print(tables(merge(args[1:]), " + ".join(args[1:])))
    elif args and args[0] == "--pool":
        print(pooled_table(pool(args[1:])))
    else:
        for p in args:
            print(tables(json.load(open(p)), p))
            print()
