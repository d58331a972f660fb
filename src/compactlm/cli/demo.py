"""``compactlm demo``: the main job on the built-in default model (what ``make demo`` runs)."""

from __future__ import annotations


def register(groups) -> None:
    p = groups[""].add_parser("demo", help="run the main job on the default model and print its summary",
                              description="Compress the default model with the default recipe "
                                          "(aptq-2.5bit+kv4+sals) and write its report; --steps all adds one row "
                                          "per feature (baseline, quant, kv, sals, inspect, prefill, prune).")
    p.add_argument("--model", default="smollm2-135m", help="model spec (default: the built-in smollm2-135m)")
    p.add_argument("--steps", default=None, help="comma-separated steps, or 'all' (default: pipeline — the main job)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    steps = args.steps.split(",") if args.steps else None
    run_demo(args.model, steps=steps)
    return 0
