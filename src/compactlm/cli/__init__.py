"""The ``compactlm`` command line: one parser, commands registered by one small module each.

Each module in :data:`COMMAND_MODULES` has ``register(groups)``, where ``groups[""]`` is the top-level
subparsers and ``groups["eval"]`` / ``groups["bench"]`` the nested ones. A command sets ``func`` and
raises :class:`~compactlm.errors.CompactLMError` for bad input: :func:`main` prints its message and
exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import CompactLMError

COMMAND_MODULES = [
    "compactlm.cli.info",
    "compactlm.cli.eval_ppl",
    "compactlm.cli.demo",
    "compactlm.cli.quantize",
    "compactlm.cli.inspect_cmd",
    "compactlm.cli.generate",
    "compactlm.cli.eval_long",
    "compactlm.cli.bench_decode",
    "compactlm.cli.compress",
    "compactlm.cli.report",
    "compactlm.cli.prune",
    "compactlm.cli.bench_prefill",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compactlm",
        description="Make open LLMs small and fast: quantize, prune, compress the KV cache, sparsify attention, "
        "and inspect where a compressed model went wrong.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    eval_parser = sub.add_parser("eval", help="evaluate a model (perplexity, long-context tasks)",
                                 description="Evaluate a model under one of the pinned protocols.")
    bench_parser = sub.add_parser("bench", help="benchmark kernels side by side with the best dense baseline",
                                  description="Speed benchmarks; results carry machine notes.")
    groups = {
        "": sub,
        "eval": eval_parser.add_subparsers(dest="eval_command", required=True, metavar="TASK"),
        "bench": bench_parser.add_subparsers(dest="bench_command", required=True, metavar="KERNEL"),
    }
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..utils import set_quiet

    quiet = bool(getattr(args, "quiet", False))
    set_quiet(quiet)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        return int(args.func(args) or 0)
    except CompactLMError as exc:
        print(f"compactlm: error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"compactlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compactlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
