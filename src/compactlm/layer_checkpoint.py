"""Per-layer checkpoints for :func:`compactlm.layerwise.run`: a killed calibration restarts at the last finished layer.

After each finished layer ``i`` the driver hands :class:`LayerCheckpoint` the layer's ``state_dict``, the
method's per-layer run state, the records it returned, the global RNG state, and the calibration inputs of
layer ``i + 1``. On restart the same :func:`compactlm.layerwise.run` call loads layers ``0..k-1`` back,
restores the method's state and the RNG, and continues at layer ``k`` from the saved inputs, so the result
is bit-identical to an uninterrupted run (a test checks it).

Method state. A method may implement ``checkpoint_state(prefix) -> Any`` and ``restore_checkpoint(prefix,
state)``. Without them, the convention of every calibrated method here is used: per-run state keyed by
full module name (``GPTQRun.results``, ``SensitivityRun.sens``) is saved as the entries under the layer's
prefix; ``torch.Generator`` attributes (APTQ's Hutchinson probes) by their state; plain numbers, strings and
booleans (counters such as Barber's swap total) by value.

Scoping. :func:`checkpointing` makes every ``layerwise.run`` call inside a ``with`` block checkpoint into
its own numbered subfolder (``run-000-GPTQ``, ...), so a recipe that calls the driver several times (APTQ's
sensitivity pass, then its GPTQ pass; pruning, then quantization) resumes each call in order without any
method knowing. The scope lives in a context variable: nothing is global, and it ends with the block.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError

FORMAT_VERSION = 1


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader (a restart) sees the old file or the new one, never half of one


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def fingerprint(calib: torch.Tensor, method: Any, num_layers: int, desc: str) -> str:
    """What must match for a checkpoint to be resumed: the calibration ids, the method's class and config."""
    h = hashlib.sha256()
    h.update(calib.detach().cpu().contiguous().numpy().tobytes())
    cfg = getattr(method, "cfg", None) or getattr(method, "config", None)
    to_json = getattr(cfg, "to_json", None)
    h.update(f"{type(method).__qualname__}|{to_json() if to_json else ''}|{num_layers}|{desc}|{tuple(calib.shape)}"
             .encode())
    return h.hexdigest()[:16]


def method_state(method: Any, prefix: str) -> dict[str, Any]:
    """The per-layer run state of ``method`` for the layer named ``prefix`` (see the module docstring)."""
    explicit = getattr(method, "checkpoint_state", None)
    if callable(explicit):
        return {"explicit": explicit(prefix)}
    state: dict[str, Any] = {}
    for key, value in vars(method).items():
        if isinstance(value, dict):
            sub = {n: v for n, v in value.items() if isinstance(n, str) and n.startswith(prefix + ".")}
            if sub:
                state[key] = ("entries", sub)
        elif isinstance(value, torch.Generator):
            state[key] = ("generator", value.get_state(), str(value.device))
        elif isinstance(value, bool | int | float | str):
            state[key] = ("value", value)
    return state


def restore_method_state(method: Any, prefix: str, state: dict[str, Any]) -> None:
    if "explicit" in state:
        method.restore_checkpoint(prefix, state["explicit"])
        return
    for key, entry in state.items():
        kind = entry[0]
        if kind == "entries":
            getattr(method, key).update(entry[1])
        elif kind == "generator":
            gen = getattr(method, key, None)
            if not isinstance(gen, torch.Generator):
                gen = torch.Generator(device=entry[2])
                setattr(method, key, gen)
            gen.set_state(entry[1])
        else:
            setattr(method, key, entry[1])


class LayerCheckpoint:
    """Checkpoints of one :func:`compactlm.layerwise.run` call in ``directory``.

    ``after_layer(i)`` is called after layer ``i``'s checkpoint is on disk (tests use it to interrupt a run).
    """

    def __init__(self, directory: str | os.PathLike[str], after_layer: Callable[[int], None] | None = None):
        self.directory = Path(directory)
        self.after_layer = after_layer
        self.fingerprint: str | None = None

    def _layer_file(self, i: int) -> Path:
        return self.directory / f"layer-{i:04d}.pt"

    def begin(self, calib: torch.Tensor, method: Any, num_layers: int, desc: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint(calib, method, num_layers, desc)
        meta = self.directory / "meta.pt"
        if meta.exists():
            saved = _load(meta)
            if saved.get("fingerprint") != self.fingerprint or saved.get("version") != FORMAT_VERSION:
                raise CalibrationError(
                    f"the layer checkpoints in {self.directory} were made by a different run (other calibration "
                    f"data, method or config: fingerprint {saved.get('fingerprint')} != {self.fingerprint}); delete "
                    "that folder (or pass --restart) to start over")
        else:
            _save_atomic({"fingerprint": self.fingerprint, "version": FORMAT_VERSION, "desc": desc}, meta)

    def resume(self, model_layers: list[nn.Module], prefixes: list[str], method: Any, report: Any
               ) -> tuple[int, list[torch.Tensor] | None]:
        """Load every finished layer back; return the first unfinished index and its inputs (None: start at 0)."""
        progress_file = self.directory / "progress.pt"
        if not progress_file.exists():
            return 0, None
        progress = _load(progress_file)
        done = int(progress["next_layer"])
        rng = None
        for i in range(done):
            saved = _load(self._layer_file(i))
            model_layers[i].load_state_dict(saved["layer_state"])
            restore_method_state(method, prefixes[i], saved["method_state"])
            report.records.extend(saved["records"])
            report.layer_records.extend(saved["layer_records"])
            rng = saved["rng"]
        if rng is not None:
            torch.set_rng_state(rng)
        return done, progress.get("inputs")

    def save(self, i: int, layer: nn.Module, prefix: str, method: Any, records: list[dict[str, Any]],
             layer_records: list[dict[str, Any]], next_inputs: list[torch.Tensor] | None, last: bool) -> None:
        state = {k: v.detach().to("cpu").clone() for k, v in layer.state_dict().items()}
        _save_atomic({"layer_state": state, "method_state": method_state(method, prefix), "records": records,
                      "layer_records": layer_records, "rng": torch.get_rng_state()}, self._layer_file(i))
        # The inputs of the next layer are only needed to continue a run that stopped half-way.
        _save_atomic({"next_layer": i + 1, "inputs": None if last else next_inputs}, self.directory / "progress.pt")
        if self.after_layer is not None:
            self.after_layer(i)


class CheckpointScope:
    """Gives each ``layerwise.run`` call inside :func:`checkpointing` its own numbered folder."""

    def __init__(self, directory: Path, after_layer: Callable[[int], None] | None):
        self.directory = directory
        self.after_layer = after_layer
        self.calls = 0

    def next_checkpoint(self, desc: str) -> LayerCheckpoint:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", desc).strip("-")[:40] or "run"
        ckpt = LayerCheckpoint(self.directory / f"run-{self.calls:03d}-{slug}", self.after_layer)
        self.calls += 1
        return ckpt


_SCOPE: contextvars.ContextVar[CheckpointScope | None] = contextvars.ContextVar("compactlm_layer_ckpt", default=None)


@contextlib.contextmanager
def checkpointing(directory: str | os.PathLike[str],
                  after_layer: Callable[[int], None] | None = None) -> Iterator[CheckpointScope]:
    """Checkpoint every ``layerwise.run`` call inside the block under ``directory`` (resuming what is there)."""
    scope = CheckpointScope(Path(directory), after_layer)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def scoped_checkpoint(desc: str) -> LayerCheckpoint | None:
    """The checkpoint for the next ``layerwise.run`` call in the current :func:`checkpointing` block, if any."""
    scope = _SCOPE.get()
    return scope.next_checkpoint(desc) if scope is not None else None
