"""Small shared helpers: machine notes for results, atomic output, progress bars, peak memory, timing."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")

_QUIET = os.environ.get("COMPACTLM_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Silence every progress bar in this process (the CLI's ``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=_QUIET, dynamic_ncols=True)


def median_time(fn: Callable[[], Any], warmup: int = 1, repeat: int = 7) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` timed calls, after ``warmup`` untimed calls.

    Why warm-up matters: the first calls of a kernel pay one-off costs that a steady-state figure must not
    include: torch.compile / FlexAttention compilation, oneDNN primitive creation, allocator growth, lazily
    built tables (RoPE, a PackedLinear's crossover), cold caches and page faults. Why the median: on a shared
    machine a few calls are delayed by other processes; the median ignores them where a mean would not.
    """
    from .errors import ConfigError

    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"median_time: warmup must be an int ≥ 0 (untimed calls), got {warmup!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"median_time: repeat must be an int ≥ 1 (timed calls), got {repeat!r}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """The machine notes ``../shared/PROTOCOL.md`` asks every result to carry."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if dtype is not None:
        info["dtype"] = str(dtype).replace("torch.", "")
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        # Run from a `git archive` snapshot (no repository): the runner names the commit it was cut from.
        if os.environ.get("COMPACTLM_SNAPSHOT"):
            info["git_commit"] = os.environ["COMPACTLM_SNAPSHOT"]
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on error it is removed.

    A reader never sees a half-written output folder.
    """
    path = Path(path)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise FileExistsError(f"output folder {path} exists and is not empty; pass overwrite=True (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; a serving engine may run as another user
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


class PathOverride:
    """A process-wide kernel-path choice that a ``with`` block can force (tests and benchmarks compare paths).

    ``forced`` is the path forced by the innermost active :meth:`force` block, else None (the caller decides).
    """

    def __init__(self, paths: tuple[str, ...]):
        self.paths = tuple(paths)
        self.forced: str | None = None

    @contextlib.contextmanager
    def force(self, path: str | None) -> Iterator[None]:
        """Force ``path`` (one of :attr:`paths`; None = no override) inside the block, then restore the previous one."""
        if path is not None and path not in self.paths:
            raise ValueError(f"path must be one of {self.paths} or None, got {path!r}")
        old, self.forced = self.forced, path
        try:
            yield
        finally:
            self.forced = old


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    }
    try:
        return table[name.lower()]
    except KeyError:
        from .errors import ConfigError

        raise ConfigError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None
