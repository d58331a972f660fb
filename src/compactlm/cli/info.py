"""``compactlm info MODEL``: family, size and attention geometry of a model."""

from __future__ import annotations

from .common import add_common, emit_json


def register(groups) -> None:
    p = groups[""].add_parser("info", help="show a model's family, parameters, bytes, layers and heads",
                              description="Show a model's family, parameter count, bytes, layers, heads, KV heads, "
                                          "head dim and context length.")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import get_adapter, load

    model, _ = load(args.model, dtype=args.dtype)
    info = {"model": args.model, **get_adapter(model).info()}
    width = max(len(k) for k in info)
    for key, value in info.items():
        shown = f"{value:,}" if isinstance(value, int) else value
        print(f"{key.ljust(width)}  {shown}")
    emit_json(args.json, info)
    return 0
