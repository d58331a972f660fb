"""``compactlm generate MODEL``: greedy text under a KV-cache and/or attention method; only the text on stdout."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import add_common


def register(groups) -> None:
    p = groups[""].add_parser("generate", help="generate text (optionally: quantized KV cache, sparse attention)",
                              description="Greedy generation with the chat template where the model has one. Only the "
                                          "generated text goes to stdout; everything else to stderr.")
    add_common(p, json_out=False)
    p.add_argument("--kv", default=None, help="KV-cache method: int2, int4, int8, int2-mixed (recommended "
                                              "2-bit: per-channel key bits) or full (default); options as "
                                              "int2@sinks=16@group_size=64")
    p.add_argument("--attn", default=None, help="runtime attention method registered as attn:<name>; options as "
                                                "sals@keep=1/16")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError, DataError
    from ..evaluation.generate import generate_text, resolve_methods
    from ..evaluation.methods import FULL
    from ..models import load

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise DataError(f"--prompt-file {path} does not exist")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"--prompt-file {path} is not UTF-8 text") from None
    else:
        prompt = args.prompt
    if not prompt.strip():
        raise DataError("the prompt is empty")
    for flag, value in (("--kv", args.kv), ("--attn", args.attn)):
        if value and "," in value:
            raise ConfigError(f"{flag} takes one method for generate, got {value!r}")
    model, tok = load(args.model, dtype=args.dtype)
    if tok is None:
        raise DataError(f"{args.model} has no tokenizer; generate needs one")
    methods = resolve_methods(model, args.kv, args.attn)
    method = methods[0] if methods else FULL
    print(f"[{method.name}] {method.description}", file=sys.stderr)
    text = generate_text(model, tok, prompt, method, max_new_tokens=args.max_new_tokens, chat=not args.no_chat)
    sys.stdout.write(text + "\n")
    return 0
