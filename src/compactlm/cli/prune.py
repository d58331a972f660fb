"""``compactlm prune MODEL --method wanda --sparsity 0.5 --out DIR``: prune, report, and save atomically."""

from __future__ import annotations

import time

from .common import add_attention_reuse_flag, add_common, emit_json, print_table


def register(groups) -> None:
    p = groups[""].add_parser(
        "prune", help="prune weights (magnitude, Wanda, SparseGPT, LLM-Barber; unstructured or N:M)",
        description="One-shot pruning with the shared layer-wise driver. Saves dense weights with exact zeros plus "
                    "the compressed-tensors sparsity config (2:4 as sparse-24-bitmask).")
    add_common(p)
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt", "barber"])
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=float, help="fraction of weights to zero, e.g. 0.5 (default 0.5)")
    amount.add_argument("--pattern", help="N:M semi-structured sparsity, e.g. 2:4 or 4:8")
    p.add_argument("--scope", default="row", choices=["row", "layer"],
                   help="comparison group of unstructured sparsity (default row, as Wanda)")
    p.add_argument("--init", default="wanda", choices=["magnitude", "wanda", "sparsegpt"],
                   help="barber only: the initial mask (default wanda)")
    p.add_argument("--rebuild-ratio", type=float, default=0.01,
                   help="barber only: fraction of each group's profitable swaps to make (paper code: 0.01 per row "
                        "after Wanda, 0.1 per matrix/block after SparseGPT/magnitude)")
    p.add_argument("--group", default="row", choices=["row", "layer", "block"], help="barber only: swap group")
    p.add_argument("--criterion", default=None, choices=["gradient", "taylor"],
                   help="barber only: swap score: gradient = the paper's |W|*sqrt(E[g^2]); taylor = predicted "
                        "change of the block loss (gradient + diagonal Gauss-Newton term)")
    p.add_argument("--search-ratios", default=None, metavar="R1,R2,...",
                   help="barber only: try each ratio, keep the one with the lowest loss (lm: held-out next-token "
                        "loss of the whole model; block: each block's calibration error). Default: "
                        "0.00003,0.0001,0.0003,0.001,0.003,0.01 with --objective lm, none (the single --rebuild-ratio) "
                        "with block")
    p.add_argument("--objective", default="lm", choices=["lm", "block"],
                   help="barber only: lm (default) = the model's next-token loss, the whole mask rebuilt at once, the "
                        "step chosen on held-out calibration sequences (beats its initial mask at every setting "
                        "measured; ~2x Wanda's memory); block = each block's output MSE (the paper, §3.2)")
    p.add_argument("--heldout", type=int, default=8,
                   help="barber --objective lm: the last this many of the --calib-samples sequences only choose the "
                        "step (default 8)")
    p.add_argument("--rounds", type=int, default=1,
                   help="barber --objective lm: at most this many rebuild rounds (default 1)")
    p.add_argument("--margin", type=float, default=2.0,
                   help="barber --objective lm: standard errors of the mean gradient taken against each revive's "
                        "predicted gain (default 2; 0 = plain Taylor)")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="never prune linears whose full name matches (repeatable)")
    p.add_argument("--targets", action="append", default=[], metavar="REGEX",
                   help="prune only linears whose full name matches (repeatable)")
    p.add_argument("--calib", default="essays", help="calibration text source (default essays: CALIB-pg-512)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (128; 32 = quick)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    p.add_argument("--format", default="auto", choices=["auto", "dense", "sparse-24-bitmask"],
                   help="weight storage in --out (auto: sparse-24-bitmask when every pruned linear is 2:4)")
    add_attention_reuse_flag(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=run)


def build_config(args):
    from ..errors import ConfigError
    from ..prune import METHODS

    spec = {"pattern": args.pattern} if args.pattern else {"sparsity": args.sparsity}
    common = dict(spec, targets=tuple(args.targets), ignore=tuple(args.ignore))
    if args.method == "barber":
        init = METHODS[args.init](**common, **({"scope": args.scope} if not args.pattern else {}))
        extra = {"criterion": args.criterion} if args.criterion else {}
        extra["objective"] = args.objective
        if args.objective == "lm":
            extra.update(heldout=args.heldout, rounds=args.rounds, margin=args.margin)
        if args.search_ratios:
            try:
                extra["search_ratios"] = tuple(float(r) for r in args.search_ratios.split(","))
            except ValueError:
                raise ConfigError(f"--search-ratios takes comma-separated fractions, e.g. 0.01,0.1; got "
                                  f"{args.search_ratios!r}") from None
        return METHODS["barber"](init=init, rebuild_ratio=args.rebuild_ratio, group=args.group, **extra)
    return METHODS[args.method](**common, **({"scope": args.scope} if not args.pattern else {}))


def run(args) -> int:
    from pathlib import Path

    from ..data import calibration_set
    from ..errors import DataError
    from ..layerwise import attention_reuse
    from ..models import load
    from ..prune import Magnitude, prune, save_sparse
    from ..utils import machine_info, peak_rss_mib

    config = build_config(args)  # validate flags before loading anything
    out = Path(args.out)
    if out.exists() and not args.overwrite and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty; pass --overwrite")
    model, tok = load(args.model, dtype=args.dtype)
    calib = None
    if not isinstance(config, Magnitude):
        if tok is None:
            raise DataError(f"{args.model} has no tokenizer, so calibration text cannot be tokenized; "
                            "use --method magnitude or a model with a tokenizer")
        calib = calibration_set(tok, args.calib, nsamples=args.calib_samples, seqlen=args.calib_seqlen, seed=0)
    start = time.perf_counter()
    with attention_reuse(not args.no_attention_reuse):
        report = prune(model, config, calib=calib, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    save_sparse(model, out, tokenizer=tok, prune_config=config, report=report, format=args.format,
                overwrite=args.overwrite)
    rows = [{"linear": n, "sparsity": s} for n, s in report.sparsity.items()]
    if not args.quiet and len(rows) <= 40:
        print_table(rows)
    print(f"{type(config).__name__} {config.describe()}: {len(rows)} linears, sparsity "
          f"{report.overall_sparsity:.4f}, {seconds:.1f} s, peak RSS {peak_rss_mib():.0f} MiB -> {out}")
    emit_json(args.json, {
        "model": args.model, "config": config.to_dict(), "per_layer_sparsity": report.sparsity,
        "overall_sparsity": report.overall_sparsity, "records": report.records,
        "layer_records": report.layer_records, "calibration": None if calib is None else
        {"source": args.calib, "samples": args.calib_samples, "seqlen": args.calib_seqlen},
        "wall_seconds": seconds, "peak_rss_mib": peak_rss_mib(), "out": str(out), "machine": machine_info(args.dtype),
    })
    return 0
