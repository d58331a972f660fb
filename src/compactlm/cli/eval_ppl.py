"""``compactlm eval ppl MODEL``: perplexity per PPL-wiki-512 (or any local text, same windowing)."""

from __future__ import annotations

import time

from .common import add_common, emit_json


def register(groups) -> None:
    p = groups["eval"].add_parser("ppl", help="perplexity (PPL-wiki-512 by default)",
                                  description="Perplexity: non-overlapping windows, fp32 logits (PPL-wiki-512).")
    add_common(p)
    p.add_argument("--data", default="wiki", help="wiki (default), essays, a .txt/.jsonl path, or hf:<name>:<split>")
    p.add_argument("--windows", type=int, default=200, help="windows to score (200: PPL-wiki-512; 40: -q)")
    p.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation import perplexity
    from ..models import load
    from ..utils import machine_info

    model, tok = load(args.model, dtype=args.dtype)
    if tok is None:
        from ..errors import DataError

        raise DataError(f"{args.model} has no tokenizer; perplexity on text needs one")
    start = time.perf_counter()
    result = perplexity(model, tok, data=args.data, seqlen=args.seqlen, windows=args.windows,
                        batch_size=args.batch_size, show_progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"{result.protocol}: perplexity {result.ppl:.4f} over {result.tokens:,} tokens ({seconds:.1f} s)")
    emit_json(args.json, {
        "ppl": result.ppl, "tokens": result.tokens, "protocol": result.protocol, "model": args.model,
        "data": args.data, "windows": result.windows, "seqlen": args.seqlen, "nll": result.nll,
        "seconds": seconds, "machine": machine_info(args.dtype),
    })
    return 0
