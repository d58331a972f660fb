"""``compactlm eval ruler`` and ``compactlm eval ppl-decode``: long-context quality, full precision beside.

``--kv int4,int2`` and ``--attn NAME[,NAME]`` pick runtime methods (registered with
``compactlm.evaluation.methods.register_method``); every run also scores full attention with a
full-precision cache, in the same process, so the JSON always carries the reference figure.
"""

from __future__ import annotations

import shlex

from .common import add_common, emit_json, print_table


def _add_methods(p) -> None:
    p.add_argument("--kv", default=None, metavar="NAME[@FIELD=VALUE...][,NAME...]",
                   help="KV-cache method(s): int2, int4, int8 (KIVI-style quantized cache), int2-mixed (the "
                        "recommended 2-bit cache: per-channel key bits), or full; options per name, e.g. "
                        "int2@sinks=16@group_size=64")
    p.add_argument("--attn", default=None, metavar="NAME[@FIELD=VALUE...][,NAME...]",
                   help="runtime attention method(s) registered as attn:<name> (e.g. a sparse decode method); "
                        "options per name, e.g. sals@keep=1/16")


def register(groups) -> None:
    p = groups["eval"].add_parser("ruler", help="RULER-syn long-context accuracy (RULER-syn-q by default)",
                                  description="RULER-syn (PROTOCOL.md): 8 seeded synthetic tasks, chat template, "
                                              "greedy ≤32 new tokens, string_match_all. Defaults give RULER-syn-q.")
    add_common(p)
    _add_methods(p)
    p.add_argument("--lengths", default="2k,4k", help="context lengths, e.g. 2k,4k (RULER-syn: 2k,4k,8k)")
    p.add_argument("--samples", type=int, default=5, help="samples per task and length (RULER-syn: 20; -q: 5)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the 8 tasks (default: all)")
    p.add_argument("--sample-indices", default=None, metavar="SPEC",
                   help="run only these of the --samples prompts per task and length, a slice (0::4) or a list "
                        "(0,4,8): one depth-stratified part of a long run; parts merge with "
                        "benchmarks/results/longctx/ruler_table.py --merge")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per answer (protocol: 32)")
    p.set_defaults(func=run_ruler_cmd)

    q = groups["eval"].add_parser("ppl-decode", help="PPL-decode: perplexity through the decode path",
                                  description="PPL-decode (PROTOCOL.md): 4,096-token wiki windows, prefill 3,840, "
                                              "then 256 tokens teacher-forced one at a time.")
    add_common(q)
    _add_methods(q)
    q.add_argument("--windows", type=int, default=5, help="windows (PPL-decode: 20; -q: 5, the default)")
    q.add_argument("--window-len", type=int, default=4096, help="window length in tokens (protocol: 4096)")
    q.add_argument("--decoded", type=int, default=256, help="tokens fed one at a time and scored (protocol: 256)")
    q.set_defaults(func=run_ppl_decode_cmd)


def _command(args, name: str, options: list[str]) -> str:
    """The command line that reproduces this run (built from the parsed arguments, not sys.argv)."""
    parts = ["compactlm", "eval", name, args.model, "--dtype", args.dtype]
    for opt in options:
        value = getattr(args, opt.replace("-", "_"))
        if value is not None:
            parts += [f"--{opt}", str(value)]
    return shlex.join(parts)


def _load(args):
    from ..errors import DataError
    from ..models import load

    model, tok = load(args.model, dtype=args.dtype)
    if tok is None:
        raise DataError(f"{args.model} has no tokenizer; long-context evaluation needs one")
    return model, tok


def run_ruler_cmd(args) -> int:
    from ..evaluation.generate import resolve_methods
    from ..evaluation.ruler import TASKS, check_tasks, parse_lengths, parse_sample_indices, run_ruler
    from ..utils import machine_info

    lengths = parse_lengths(args.lengths)
    tasks = check_tasks(args.tasks.split(",")) if args.tasks else TASKS
    indices = parse_sample_indices(args.sample_indices, args.samples) if args.sample_indices else None
    model, tok = _load(args)
    methods = resolve_methods(model, args.kv, args.attn)
    result = run_ruler(model, tok, methods, lengths=lengths, samples=args.samples, tasks=tasks, seed=args.seed,
                       max_new_tokens=args.max_new_tokens, sample_indices=indices)
    rows = [{"method": n, "score": r["score"], **{f"{k}": v["score"] for k, v in r["by_length"].items()},
             **r["tasks"]} for n, r in result.methods.items()]
    print(f"{result.protocol}: {args.model} {args.dtype}, {result.seconds:.0f} s")
    print_table(rows)
    emit_json(args.json, {"model": args.model, "dtype": args.dtype, **result.to_dict(),
                          "command": _command(args, "ruler", ["kv", "attn", "lengths", "samples", "tasks",
                                                               "sample-indices", "seed", "max-new-tokens"]),
                          "machine": machine_info(args.dtype)})
    return 0


def run_ppl_decode_cmd(args) -> int:
    from ..evaluation.generate import resolve_methods
    from ..evaluation.ppl_decode import run_ppl_decode
    from ..utils import machine_info

    model, tok = _load(args)
    methods = resolve_methods(model, args.kv, args.attn)
    result = run_ppl_decode(model, tok, methods, windows=args.windows, window_len=args.window_len,
                            decoded=args.decoded)
    full = result.methods["full"]["ppl"]
    rows = [{"method": n, "ppl": r["ppl"], "vs_full": r["ppl"] / full, "decode_tok_per_s": r["decode_tok_per_s"]}
            for n, r in result.methods.items()]
    print(f"{result.protocol}: {args.model} {args.dtype}, {result.seconds:.0f} s")
    print_table(rows)
    emit_json(args.json, {"model": args.model, "dtype": args.dtype, **result.to_dict(),
                          "command": _command(args, "ppl-decode", ["kv", "attn", "windows", "window-len", "decoded"]),
                          "machine": machine_info(args.dtype)})
    return 0
