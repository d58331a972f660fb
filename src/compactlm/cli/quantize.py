"""``compactlm quantize MODEL --method rtn|gptq|aptq (--bits B | --avg-bits X) --out DIR``."""

from __future__ import annotations

import argparse
import time

from .common import add_attention_reuse_flag, add_common, emit_json, print_table


def register(groups) -> None:
    p = groups[""].add_parser(
        "quantize", help="quantize weights (RTN, GPTQ, APTQ mixed precision) and save the packed model",
        description="Weight quantization into packed b-bit layers. The output folder is written atomically and "
                    "loads with `compactlm.models.load(DIR)`; --export compressed-tensors writes the format vLLM "
                    "reads instead.")
    add_common(p)
    p.add_argument("--method", choices=["rtn", "gptq", "aptq"], default="gptq")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--bits", type=int, help="uniform bit width: 2, 3, 4 or 8 (rtn, gptq; default 4)")
    bits.add_argument("--avg-bits", type=float, help="APTQ target average weight bits, met exactly (default 3.0)")
    p.add_argument("--bits-menu", default="2,4", help="APTQ widths to choose from (default 2,4)")
    p.add_argument("--pin", action="append", default=[], metavar="REGEX=BITS",
                   help="APTQ: fix the width of layers matching REGEX (repeatable)")
    p.add_argument("--sensitivity", choices=["loss", "layer"], default="loss",
                   help="APTQ sensitivity: loss-gradient weighted (default) or the local Hessian trace")
    p.add_argument("--sensitivity-cache", metavar="PATH",
                   help="APTQ: JSON file of the per-layer sensitivities; loaded if it exists (after checking it was "
                        "made for this model, calibration and sensitivity settings), else computed and written, so "
                        "another --avg-bits or a restarted run skips the sensitivity passes")
    p.add_argument("--no-share-fused", action="store_true",
                   help="APTQ: let q/k/v and gate/up take different widths (vLLM needs them equal)")
    p.add_argument("--group-size", type=int, default=64, help="columns per scale/zero; -1 = per channel (default 64)")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (no zero points)")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="search a per-group range shrink that minimises reconstruction error (default: on for "
                        "gptq and aptq, off for rtn)")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX", help="keep matching layers dense")
    p.add_argument("--calib-samples", type=int, default=128, help="CALIB-pg-512 sequences (128; quick: 32)")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-data", default="essays", help="calibration text source (never the eval text)")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ/APTQ: natural column order")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ/APTQ dampening fraction (0.01)")
    add_attention_reuse_flag(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--export", choices=["compressed-tensors"], help="write vLLM's compressed-tensors format instead")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="also measure PPL-wiki-512 on this many windows after quantizing (40 = -q; 0 = skip)")
    p.set_defaults(func=run)


def build_config(args):
    from ..errors import ConfigError
    from ..quant import APTQ, GPTQ, RTN

    common = dict(group_size=args.group_size, symmetric=args.symmetric, ignore=tuple(args.ignore))
    if args.clip_search is not None:  # otherwise each method's own default
        common["clip_search"] = args.clip_search
    if args.method == "aptq":
        if args.bits is not None:
            raise ConfigError("aptq allocates widths itself: pass --avg-bits X (and --bits-menu), not --bits")
        try:
            menu = tuple(int(b) for b in args.bits_menu.split(","))
            pin = {k: int(v) for k, v in (item.rsplit("=", 1) for item in args.pin)}
        except ValueError:
            raise ConfigError(f"--bits-menu takes comma-separated integers (got {args.bits_menu!r}) and --pin takes "
                              f"REGEX=BITS (got {args.pin})") from None
        return APTQ(avg_bits=3.0 if args.avg_bits is None else args.avg_bits, bits_menu=menu, pin=pin,
                    share_fused=not args.no_share_fused, act_order=not args.no_act_order, damp=args.damp,
                    sensitivity=args.sensitivity, **common)
    if args.avg_bits is not None:
        raise ConfigError(f"--avg-bits is for --method aptq; {args.method} takes a uniform --bits")
    if args.sensitivity_cache is not None:
        raise ConfigError(f"--sensitivity-cache is for --method aptq; {args.method} computes no sensitivities")
    bits = 4 if args.bits is None else args.bits
    if args.method == "rtn":
        return RTN(bits=bits, **common)
    return GPTQ(bits=bits, act_order=not args.no_act_order, damp=args.damp, **common)


def run(args) -> int:
    from ..data import calibration_set
    from ..errors import DataError
    from ..models import load
    from ..quant import RTN, quant_summary
    from ..quant.serialize import save
    from ..utils import machine_info, peak_rss_mib

    cfg = build_config(args)
    model, tok = load(args.model, dtype=args.dtype)
    calib = None
    if not isinstance(cfg, RTN):
        if tok is None:
            raise DataError(f"{args.model} has no tokenizer, so no calibration text can be tokenized for "
                            f"{args.method}; use --method rtn or a model with a tokenizer")
        calib = calibration_set(tok, args.calib_data, nsamples=args.calib_samples, seqlen=args.calib_seqlen)
    from .. import quantize
    from ..layerwise import attention_reuse

    report: dict = {}
    start = time.perf_counter()
    options = {"sensitivity_cache": args.sensitivity_cache} if args.method == "aptq" else {}
    with attention_reuse(not args.no_attention_reuse):
        quantize(model, cfg, calib=calib, report=report, **options)
    seconds = time.perf_counter() - start
    summary = quant_summary(model)
    if args.export == "compressed-tensors":
        from ..export.compressed_tensors import export_compressed_tensors

        export_compressed_tensors(model, args.out, tokenizer=tok, overwrite=args.overwrite)
    else:
        save(model, args.out, tokenizer=tok, overwrite=args.overwrite, extra={"config": cfg.to_dict()})
    result = {"model": args.model, "method": args.method, "config": cfg.to_dict(), "out": args.out,
              "export": args.export or "compactlm", "calibration": None if calib is None else {
                  "data": args.calib_data, "samples": args.calib_samples, "seqlen": args.calib_seqlen,
                  "protocol": "CALIB-pg-512" if (args.calib_data, args.calib_seqlen) == ("essays", 512) else None},
              "avg_bits": summary["avg_bits"], "avg_bits_with_metadata": summary["avg_bits_with_metadata"],
              "bits_per_layer": summary["bits_per_layer"], "quantize_seconds": seconds,
              "peak_rss_mib": peak_rss_mib(), "model_bytes": summary.get("model_bytes"),
              "layer_records": report.get("layers", []), "machine": machine_info(args.dtype)}
    if "sensitivity_source" in report:  # APTQ: were the sensitivities computed or loaded (from which cache)
        result["sensitivity_source"] = report["sensitivity_source"]
    if args.eval_windows:
        from ..evaluation import perplexity

        r = perplexity(model, tok, windows=args.eval_windows, show_progress=not args.quiet)
        result["ppl"] = {"protocol": r.protocol, "ppl": r.ppl, "tokens": r.tokens}
    print_table([{"method": args.method, "avg_bits": summary["avg_bits"],
                  "avg_bits_with_metadata": summary["avg_bits_with_metadata"],
                  "MiB": (summary.get("model_bytes") or 0) / 2**20, "seconds": seconds,
                  "peak_rss_MiB": result["peak_rss_mib"], **({"ppl": result["ppl"]["ppl"]} if "ppl" in result else {}),
                  "out": args.out}])
    emit_json(args.json, result)
    return 0
