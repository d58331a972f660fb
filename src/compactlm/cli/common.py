"""Arguments and output helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError
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


def add_attention_reuse_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-attention-reuse`` for the commands that run the layer-wise calibration driver."""
    parser.add_argument("--no-attention-reuse", action="store_true",
                        help="recompute attention outputs in every calibration pass instead of reusing them "
                             "(identical result, slower; holds one set of layer activations less)")


def add_bench_args(parser: argparse.ArgumentParser, *, lengths: str, lengths_help: str, threads: int | None,
                   threads_help: str, min_repeats: int = 1) -> None:
    """The arguments every ``compactlm bench`` timing command takes (random inputs, no model).

    ``--lengths`` (read with :func:`parse_lengths`), ``--dtype`` (bf16 by default, as PROTOCOL.md asks where
    the CPU has it), ``--repeats`` (timed runs whose median is reported; each command checks its protocol's
    minimum ``min_repeats``, shown in the help), ``--threads`` (its default and meaning are the command's),
    ``--json`` and ``-q/--quiet``.
    """
    parser.add_argument("--lengths", default=lengths, help=f"{lengths_help}, k = 1024 tokens (default {lengths})")
    parser.add_argument("--dtype", default="bf16", help="bf16 (default, as PROTOCOL asks where the CPU has it) or fp32")
    parser.add_argument("--repeats", type=int, default=10,
                        help=f"timed runs per figure (median; default 10, at least {min_repeats})")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    add_common(parser, model=False)


def parse_lengths(text: str, minimum: int) -> list[int]:
    """``--lengths``: comma-separated token counts, ``k`` = 1024 (``4k,16k`` or ``4096``), each ≥ ``minimum``."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise ConfigError(f"--lengths takes sizes like 4k,16k or 4096; could not read {part!r}") from None
    if not out or min(out) < minimum:
        raise ConfigError(f"--lengths must list lengths ≥ {minimum} tokens, got {text!r}")
    return out


def interleaved_ms(entries: dict[str, Any], repeats: int, warmup: int = 1, log=None
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall ms and median CPU ms of each entry's callable, timed round-robin.

    ``warmup`` untimed calls each first (they also compile FlexAttention, build oneDNN primitives), then
    ``repeats`` rounds that call every entry once, so a load change on a shared machine hits every entry alike
    instead of whichever happened to run during it. The CPU time (``time.process_time``: this process, all its
    threads) is the figure to read under load: other jobs stretch the wall time, not the work done.
    """
    import statistics
    import time

    for name, fn in entries.items():
        for _ in range(warmup):
            fn()
        if log is not None:
            log(f"  warmed up {name}")
    wall: dict[str, list[float]] = {name: [] for name in entries}
    cpu: dict[str, list[float]] = {name: [] for name in entries}
    for _ in range(repeats):
        for name, fn in entries.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(1e3 * (time.process_time() - start_cpu))
            wall[name].append(1e3 * (time.perf_counter() - start))
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


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
