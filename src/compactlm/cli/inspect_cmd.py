"""``compactlm inspect REF CANDIDATE`` (per-operator precision report) and ``compactlm gate`` (AutoEval for CI).

``gate`` exits 0 when every check that ran passed, 1 when one failed (or every check was skipped), 2 on
bad input.
"""

from __future__ import annotations

import argparse

import torch

from .common import emit_json, print_table

_MODEL_HELP = "smollm2-135m, a checkpoint folder, a .gguf file, tiny-<family>, or a Hugging Face id"


def register(groups) -> None:
    p = groups[""].add_parser(
        "inspect", help="per-operator error of a compressed model vs its reference, ranked by impact",
        description="Compare every operator (linears, attention output and probabilities, MLP, norms, experts, "
                    "logits) of CANDIDATE with REF on the same tokens: isolated and accumulated error, and the "
                    "consumer-aware impact of each differing operator on the final logits.")
    _models(p)
    p.add_argument("--data", default="wiki", help="wiki (default), essays, a .txt/.jsonl path, or 'random' (seeded "
                                                 "random ids: smoke tests of tokenizer-less models only)")
    p.add_argument("--samples", type=int, default=8, help="sequences to inspect (default 8)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per capture pass (bounds memory)")
    p.add_argument("--impact", action=argparse.BooleanOptionalAction, default=True,
                   help="consumer-aware impact: swap each differing operator alone into REF (default on)")
    p.add_argument("--impact-samples", type=int, default=2, help="sequences per impact swap (default 2)")
    p.add_argument("--impact-top", type=int, default=0,
                   help="swap only the N operators with the largest isolated error (0 = all that differ)")
    p.add_argument("--isolated", action=argparse.BooleanOptionalAction, default=True,
                   help="also run candidate operators on the reference's inputs (default on)")
    p.add_argument("--kv", metavar="intN", help="run CANDIDATE with a KIVI-style quantized KV cache (int2, int4, "
                                                "int8, int2-mixed), simulated in the forward: each token attends to "
                                                "the cache as it would be stored when that token is decoded")
    p.add_argument("--kv-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="KVQuant field for --kv (repeatable): group_size, residual, sinks, pre_rope, "
                        "value_group_size, meta_dtype")
    p.add_argument("--attn", metavar="METHOD",
                   help="run CANDIDATE with a runtime attention method: sparse-prefill (or any attn:<name> that "
                        "changes prefill; impact is off for those), or a decode-only one (sals, sals-25, sals-12.5, "
                        "sals-index, sals-v4, quest, streaming, oracle) with --decode-tokens N")
    p.add_argument("--decode-tokens", type=int, default=0, metavar="N",
                   help="decode mode for a decode-only --attn method: prefill each sequence but its last N tokens, "
                        "then feed those one at a time (the PPL-decode way) and compare every operator per step")
    p.add_argument("--attn-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the --attn method (repeatable), e.g. keep_ratio=0.25, dense_head=0")
    p.add_argument("--top", type=int, default=15, help="rows in the terminal table")
    p.add_argument("--html", metavar="PATH", help="write the HTML report (inline SVG plots)")
    p.add_argument("--csv", metavar="PATH", help="write one CSV row per operator")
    p.add_argument("--json", metavar="PATH", help="write the full JSON report (operators sorted by impact)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_inspect)

    g = groups[""].add_parser(
        "gate", help="AutoEval quality gate: exit 1 if the candidate fails a threshold",
        description="End-to-end checks of CANDIDATE against REF (PPL-wiki-512-q delta/ratio, next-token KL, "
                    "RULER-syn-q drop). Exit 0: pass; 1: fail; 2: bad input.")
    _models(g)
    g.add_argument("--max-ppl-delta", type=float, help="allowed perplexity increase (absolute)")
    g.add_argument("--max-ppl-ratio", type=float, help="allowed perplexity ratio candidate/reference, e.g. 1.05")
    g.add_argument("--max-kl", type=float, help="allowed mean next-token KL(ref ‖ cand), nats")
    g.add_argument("--max-ruler-drop", type=float, help="allowed RULER-syn-q score drop, points (slow)")
    g.add_argument("--data", default="wiki", help="wiki (default: PPL-wiki-512-q), essays, a .txt/.jsonl path, "
                                                 "or 'random' (tokenizer-less smoke tests)")
    g.add_argument("--windows", type=int, default=40, help="windows (40 = PPL-wiki-512-q)")
    g.add_argument("--seqlen", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--json", metavar="PATH", help="write the gate result as JSON")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=run_gate)


def _models(p) -> None:
    p.add_argument("ref", metavar="REF", help="reference model: " + _MODEL_HELP)
    p.add_argument("candidate", metavar="CANDIDATE", help="candidate model (same architecture): " + _MODEL_HELP)
    p.add_argument("--dtype", default="fp32", help="dtype of both models: fp32 (default), bf16, fp16")


def _load_pair(args, share: bool = False):
    from ..models import load

    ref, tok = load(args.ref, dtype=args.dtype)
    if share and args.candidate == args.ref:
        return ref, ref, tok  # a runtime-only candidate: one model, the runtime attached to the candidate pass
    cand, cand_tok = load(args.candidate, dtype=args.dtype)
    return ref, cand, tok or cand_tok


def _options(pairs: list[str], flag: str) -> dict:
    """``KEY=VALUE`` strings to a dict of strings; each config types them from its fields
    (``compactlm.config.config_from_options``)."""
    from ..errors import ConfigError

    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {pair!r}")
        out[key.replace("-", "_")] = text
    return out


def _decode_config(name: str, options: dict, cand):
    """The budget config of a decode-only ``--attn`` name (SALS presets, the baselines), or None."""
    from ..attention import decode_baselines, sals

    baselines = {"streaming": decode_baselines.StreamingConfig, "quest": decode_baselines.QuestConfig,
                 "oracle": decode_baselines.OracleConfig}
    if name in sals.PRESETS:
        from ..attention.sals_calib import ensure_projections

        cfg = sals.config_from_options(sals.SALSConfig, {**sals.PRESETS[name], **options})
        if cfg.projections is None:
            ensure_projections(cand)  # attached, cached for this folder, or calibrated on CALIB-pg-512 (quick)
        return cfg
    if name in baselines:
        return sals.config_from_options(baselines[name], options)
    return None


def _runtime(args, cand) -> list:
    """The candidate's runtime items from --kv / --attn (configs where possible, so impact can follow them)."""
    from ..errors import ConfigError

    items = []
    if args.kv:
        from ..kv.config import KVQuant
        from ..kv.runtime import PRESETS

        if args.kv not in ("int2", "int4", "int8", *PRESETS):
            raise ConfigError(f"--kv takes int2, int4, int8 or {', '.join(PRESETS)}, got {args.kv!r}")
        from ..config import config_from_options as typed_config

        items.append(typed_config(KVQuant, {**PRESETS.get(args.kv, {}), **_options(args.kv_opt, "--kv-opt"),
                                            "bits": int(args.kv[3])}, what="--kv-opt"))
    elif args.kv_opt:
        raise ConfigError("--kv-opt needs --kv int2|int4|int8")
    if args.attn:
        options = _options(args.attn_opt, "--attn-opt")
        decode = _decode_config(args.attn, options, cand)
        if decode is not None:
            items.append(decode)
        elif args.attn == "sparse-prefill":
            from ..attention.prefill_sparse import config_from_options

            items.append(config_from_options(options))
        else:
            from ..evaluation.methods import build_method

            items.append(build_method(cand, "attn", args.attn, options))
    elif args.attn_opt:
        raise ConfigError("--attn-opt needs --attn METHOD")
    return items


def _ids(tok, model, data: str, n: int, seqlen: int) -> torch.Tensor:
    from ..data import eval_windows
    from ..errors import DataError

    if n < 1 or seqlen < 2:
        raise DataError(f"need at least 1 sequence of ≥ 2 tokens, got --samples/--windows {n}, --seqlen {seqlen}")
    if data == "random":
        vocab = model.config.vocab_size
        return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))
    if tok is None:
        raise DataError("neither model has a tokenizer, so text data cannot be tokenized; use --data random for a "
                        "smoke test of tokenizer-less models")
    return eval_windows(tok, data, seqlen=seqlen, windows=n)


def run_inspect(args) -> int:
    from ..errors import ConfigError
    from ..evaluation.methods import RuntimeMethod
    from ..inspector import InspectConfig, inspect

    ref, cand, tok = _load_pair(args, share=bool(args.kv or args.attn))
    runtime = _runtime(args, cand)
    if any(isinstance(r, RuntimeMethod) and not r.shares_prefill for r in runtime) and args.impact:
        print(f"note: --attn {args.attn} is an opaque runtime method: no consumer-aware impact (--no-impact)")
        args.impact = False
    cfg = InspectConfig(isolated=args.isolated, impact=args.impact, impact_samples=args.impact_samples,
                        impact_top=args.impact_top, batch_size=args.batch_size, decode_tokens=args.decode_tokens)
    if args.top < 0:
        raise ConfigError(f"--top must be ≥ 0, got {args.top}")
    ids = _ids(tok, ref, args.data, args.samples, args.seqlen)
    report = inspect(ref, cand, ids, cfg, candidate_runtime=runtime or None)
    report.data.update(reference_spec=args.ref, candidate_spec=args.candidate, data=args.data,
                       kv=args.kv, kv_opt=args.kv_opt, attn=args.attn, attn_opt=args.attn_opt,
                       decode_tokens=args.decode_tokens, command=_inspect_command(args))
    print(report.table(args.top))
    if args.json:
        report.write_json(args.json)
    if args.csv:
        report.write_csv(args.csv)
    if args.html:
        report.write_html(args.html)
    return 0


def run_gate(args) -> int:
    from ..inspector import GateConfig, auto_eval
    from ..utils import machine_info

    cfg = GateConfig(max_ppl_delta=args.max_ppl_delta, max_ppl_ratio=args.max_ppl_ratio, max_kl=args.max_kl,
                     max_ruler_drop=args.max_ruler_drop, data=args.data, windows=args.windows, seqlen=args.seqlen,
                     batch_size=args.batch_size)
    ref, cand, tok = _load_pair(args)
    ids = _ids(tok, ref, args.data, args.windows, args.seqlen) if args.data == "random" or tok is None else None
    result = auto_eval(ref, cand, tok, cfg, input_ids=ids)
    print_table([{"check": c.name, "value": c.value if c.value is not None else "-", "threshold": c.threshold,
                  "result": "SKIPPED" if c.skipped else ("PASS" if c.passed else "FAIL"), "note": c.message}
                 for c in result.checks])
    print(f"gate: {'PASS' if result.passed else 'FAIL'} ({result.seconds:.1f} s)")
    emit_json(args.json, {**result.to_dict(), "reference": args.ref, "candidate": args.candidate,
                          "config": cfg.to_dict(), "command": _gate_command(args), "machine": machine_info(args.dtype)})
    return 0 if result.passed else 1


def _gate_command(args) -> str:
    """The command line that reproduces this gate run (from the parsed arguments, not sys.argv)."""
    import shlex

    parts = ["compactlm", "gate", args.ref, args.candidate, "--dtype", args.dtype]
    for opt in ("max-ppl-delta", "max-ppl-ratio", "max-kl", "max-ruler-drop", "data", "windows", "seqlen",
                "batch-size"):
        value = getattr(args, opt.replace("-", "_"))
        if value is not None:
            parts += [f"--{opt}", str(value)]
    return shlex.join(parts + (["--json", args.json] if args.json else []))


def _inspect_command(args) -> str:
    """The command line that reproduces this inspection (from the parsed arguments, not sys.argv)."""
    import shlex

    parts = ["compactlm", "inspect", args.ref, args.candidate, "--dtype", args.dtype, "--data", args.data,
             "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
             "--impact-samples", str(args.impact_samples), "--impact-top", str(args.impact_top)]
    parts += [] if args.impact else ["--no-impact"]
    parts += [] if args.isolated else ["--no-isolated"]
    for flag, value in (("--kv", args.kv), ("--attn", args.attn)):
        if value:
            parts += [flag, value]
    for flag, values in (("--kv-opt", args.kv_opt), ("--attn-opt", args.attn_opt)):
        for v in values:
            parts += [flag, v]
    if args.decode_tokens:
        parts += ["--decode-tokens", str(args.decode_tokens)]
    return shlex.join(parts)
