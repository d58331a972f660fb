"""Arguments and output helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..utils import write_json_atomic


def add_common(parser: argparse.ArgumentParser, model: bool = True, json_out: bool = True) -> None:
    if model:
        parser.add_argument("model", metavar="MODEL",
                            help="smollm2-135m (built-in default), a checkpoint folder, a .gguf file, tiny-<family>, "
                                 "or a Hugging Face id")
        parser.add_argument("--dtype", default="fp32", help="weights/compute dtype: fp32 (default), bf16, fp16")
    if json_out:
        parser.add_argument("--json", metavar="PATH", help="also write the result as JSON (atomically)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def emit_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        write_json_atomic(path, data)


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """A plain aligned text table (the terminal summary of every command)."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)
