"""Markdown tables of a union RULER-syn JSON (``run_longctx.py ruler``): per method and length, the score, Δ vs
full, per-task scores, and how many prompts differ from full attention (in generated text, and in score).

Why count prompts: at 5 samples per task one prompt moves a task by 20 points (less for multi-answer tasks) and
the 8-task mean by 2.5, so a Δ of a point or two is one or two prompts; the counts say how many.

    python benchmarks/results/longctx/ruler_table.py benchmarks/results/longctx/ruler_syn_q_2k_union_epyc.json
"""

from __future__ import annotations

import json
import sys


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def tables(path: str) -> str:
    d = json.load(open(path))
    recs = d["records"]
    full = {(r["task"], r["length"], r["index"]): r for r in recs if r["method"] == "full"}
    methods = list(d["methods"])
    tasks = d["tasks"]
    out = [f"`{path}` — {d['protocol']}; complete: {d['complete']}; {d['seconds'] / 60:.1f} min wall "
           f"for the whole run; chunks done {len(d['chunks_done'])}"]
    for n in sorted({r["length"] for r in recs}):
        done = [t for m, t in d["chunks_done"] if m == n]
        out += ["", f"Length {n} ({len(done)} of {len(tasks)} tasks, {d['samples']} samples each):", "",
                "| method | score | Δ vs full | " + " | ".join(done)
                + " | prompts ≠ full text | prompts ≠ full score |",
                "|---" * (len(done) + 5) + "|"]
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
            counts = "— | —" if m == "full" else f"{text}/{len(rows)} | {diff}/{len(rows)} ({up} up, {diff - up} down)"
            out.append(f"| {m} | {score:.1f} | {delta} | " + " | ".join(f"{per_task[t]:.0f}" for t in done)
                       + f" | {counts} |")
    return "\n".join(out)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(tables(p))
        print()
