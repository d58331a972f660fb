"""``compactlm compress MODEL --recipe R --out DIR``: run a recipe end to end, resumably (see compactlm.pipeline)."""

from __future__ import annotations

from .common import add_common, print_table


def register(groups) -> None:
    p = groups[""].add_parser(
        "compress", help="run a compression recipe (prune, quantize, KV cache, attention, export) and report",
        description="Run a recipe on MODEL and write DIR (model/, recipe.yaml, choices.json, report.json, "
                    "report.html). A killed run, started again with the same command, resumes after the last "
                    "finished layer. Shipped recipes: see --list-recipes.")
    add_common(p, json_out=False)
    p.add_argument("--recipe", help="a shipped recipe name (e.g. aptq-2.5bit+kv4+sals) or a YAML file")
    p.add_argument("--out", help="output folder (written atomically)")
    p.add_argument("--no-eval", action="store_true", help="skip the measurements (report.json holds the run only)")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run's checkpoints (DIR.partial)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--calib-samples", type=int, metavar="N", help="override the recipe's calibration sequences")
    p.add_argument("--ppl-windows", type=int, metavar="N", help="override the PPL-wiki-512 windows (40 = -q, 0 = skip)")
    p.add_argument("--ruler-samples", type=int, metavar="N", help="override RULER-syn samples per task (0 = skip)")
    p.add_argument("--validate-only", action="store_true", help="check the recipe and stop")
    p.set_defaults(func=run)
    lst = groups[""].add_parser("recipes", help="list the shipped recipes and their steps")
    lst.set_defaults(func=list_recipes)


def list_recipes(args) -> int:
    from ..recipes import load_recipe, shipped_recipes

    for name in shipped_recipes():
        r = load_recipe(name)
        print(f"{name}: " + " -> ".join(type(s).__name__ for s in r.steps))
    return 0


def run(args) -> int:
    from ..errors import ConfigError
    from ..pipeline import compress_to_folder
    from ..recipes import load_recipe, with_overrides
    from ..report.html import summary_rows

    if not args.recipe:
        raise ConfigError("--recipe is required: a shipped name (compactlm recipes lists them) or a YAML file")
    recipe = with_overrides(load_recipe(args.recipe), args.calib_samples, args.ppl_windows,
                            args.ruler_samples)  # validated before anything is loaded
    print(f"recipe {recipe.name}: " + " -> ".join(type(s).__name__ for s in recipe.steps))
    if args.validate_only:
        return 0
    if not args.out:
        raise ConfigError("--out DIR is required (the output folder)")
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    report = compress_to_folder(args.model, recipe, args.out, dtype=args.dtype, evaluate=not args.no_eval,
                                restart=args.restart, overwrite=args.overwrite, log=log)
    rows = summary_rows(report)
    if report.get("evaluation"):
        print_table(rows)
    print(f"wrote {args.out} (model/, recipe.yaml, choices.json, report.json, report.html)")
    return 0
