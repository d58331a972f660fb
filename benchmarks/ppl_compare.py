"""Paired comparison of two perplexity results on the same windows: Δ PPL with a 95 % bootstrap interval.

    python benchmarks/ppl_compare.py benchmarks/results/prune/full/50pct_wanda.json \\
        benchmarks/results/prune/full/50pct_barber-wanda-lm.json
    python benchmarks/ppl_compare.py Q.json:gptq:3 Q.json:aptq:3.0:234     # rows of a quant_quality.py JSON
    python benchmarks/ppl_compare.py S.json#rows.0.llmc S.json#rows.0.ours  # any record by its key path

Each argument is a result JSON holding ``window_nll`` (``prune_ppl.py``, ``quant_quality.py`` and the
llm-compressor / AutoRound side-by-side workers record it since the ninth session; older JSONs have only the PPL
and are refused), optionally ``:SETTING`` to pick a row of a JSON with ``rows``, or ``#KEY.KEY...`` to follow a
key path (list positions as numbers), e.g. a side of a ``llmc_side_by_side.py`` result. The first is the base;
every other is compared with it by :func:`compactlm.evaluation.paired_ppl_interval`. The interval is the
evaluation text's sampling noise (which windows were drawn), not calibration-to-calibration variation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compactlm.evaluation import paired_ppl_interval


def load(spec: str) -> tuple[str, dict]:
    spec_path, _, key_path = spec.partition("#")
    path, _, setting = spec_path.partition(":")
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such file")
    d = json.loads(Path(path).read_text())
    for key in key_path.split(".") if key_path else []:
        try:
            d = d[int(key)] if isinstance(d, list) else d[key]
        except (KeyError, IndexError, ValueError, TypeError):
            raise SystemExit(f"{spec}: no {key!r} on the key path") from None
    if setting:
        rows = [r for r in d.get("rows", []) if r.get("setting") == setting]
        if len(rows) != 1:
            names = [r.get("setting") for r in d.get("rows", [])]
            raise SystemExit(f"{path}: {len(rows)} rows named {setting!r}; the rows are {names}")
        d = rows[0]
    if not d.get("window_nll"):
        raise SystemExit(f"{spec}: no window_nll (a result written before per-window NLLs were recorded); re-run it")
    return spec, d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="BASE.json[:SETTING] OTHER.json[:SETTING] ...")
    p.add_argument("--resamples", type=int, default=2000)
    args = p.parse_args(argv)
    if len(args.results) < 2:
        raise SystemExit("give a base result and at least one to compare with it")
    (base_name, base), *others = [load(s) for s in args.results]
    print(f"base {base_name}: PPL {base['ppl']:.3f} ({len(base['window_nll'])} windows)")
    print("| result | PPL | Δ vs base | 95 % interval (paired windows) | windows better |")
    print("|---|---|---|---|---|")
    for name, d in others:
        c = paired_ppl_interval(base["window_nll"], d["window_nll"], resamples=args.resamples)
        print(f"| {name} | {d['ppl']:.3f} | {c['delta_pct']:+.2f} % | [{c['low_pct']:+.2f} %, {c['high_pct']:+.2f} %] "
              f"| {c['better_share']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
