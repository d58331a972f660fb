"""Consumer-aware impact: the end-to-end damage of one operator, measured with only that operator compressed.

For each operator, the candidate's module is swapped into the reference model (everything else stays
reference) and the final next-token distributions are compared with the reference's: impact =
mean KL(P_ref ‖ P_swapped) per token, and the change in mean next-token loss. This is the error as the
operator's consumers (every later layer, the head) see it, which per-operator SQNR cannot tell: a 20 dB
error in a ``v_proj`` whose heads the model ignores is harmless, the same error in a ``down_proj`` that
writes an outlier channel is not.

Cost control, so it fits a laptop-class CPU:

- only *units* are swapped: operators whose isolated output differs from the reference and that contain
  no differing operator (a quantized ``q_proj`` rather than its attention block; a sparse attention block
  whose projections are untouched);
- a swap in layer ``i`` re-runs only layers ``i..L-1``: layers before ``i`` return the reference's cached
  outputs (the forward of the model is otherwise unchanged, so masks and rotary stay the family's own);
- all impact sequences run as one batch per swap.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.adapter import get_adapter
from ..utils import progress
from .capture import Operator
from .metrics import kl_from_logits


@dataclass(frozen=True)
class Impact:
    kl: float  # mean per-token KL(P_ref ‖ P_swapped), nats
    kl_max: float  # worst token
    loss_delta: float  # mean next-token NLL (swapped) − (reference), nats
    seconds: float


def select_units(ops: list[Operator], differs: dict[str, bool]) -> list[Operator]:
    """Differing operators with no differing operator below them (pseudo-operators such as probs excluded)."""
    real = [op for op in ops if op.kind != "attention_probs" and op.name == op.module]
    diff = [op for op in real if differs.get(op.name, False)]
    return [op for op in diff if not any(o.name.startswith(op.name + ".") for o in diff)]


@contextlib.contextmanager
def _swapped(model: nn.Module, path: str, module: nn.Module) -> Iterator[None]:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, child)
    setattr(parent, child, module)
    try:
        yield
    finally:
        setattr(parent, child, original)


@contextlib.contextmanager
def _skip_layers(layers: nn.ModuleList, cached: list[torch.Tensor], start: int) -> Iterator[None]:
    """Layers ``< start`` return their cached reference outputs instead of computing (same call signature)."""
    for j in range(start):
        layers[j].forward = (lambda *a, _out=cached[j], **k: _out)  # instance attribute shadows the method
    try:
        yield
    finally:
        for j in range(start):
            layers[j].__dict__.pop("forward", None)


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lg = logits[:, :-1].float()
    return float(F.cross_entropy(lg.reshape(-1, lg.size(-1)), ids[:, 1:].reshape(-1)))


@torch.no_grad()
def consumer_impact(ref: nn.Module, cand: nn.Module, units: list[Operator], input_ids: torch.Tensor,
                    contexts: dict[str, Callable[[nn.Module], contextlib.AbstractContextManager]] | None = None,
                    ) -> dict[str, Impact]:
    """Impact of each unit on ``input_ids`` (B, T), swapping the candidate's module into ``ref`` one at a time.

    ``contexts[name](ref)``, where given, is entered with that unit's swap: a runtime candidate's attention
    handler installed on that unit's layer alone (a KV-cache store or sparse attention in one layer).
    """
    adapter = get_adapter(ref)
    layers = adapter.layers
    ids = input_ids.to(next(ref.parameters()).device)
    cached: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, out: cached.append(out[0] if isinstance(out, tuple)
                                                                            else out)) for layer in layers]
    try:
        ref_logits = ref(input_ids=ids, use_cache=False).logits  # (B, T, V)
    finally:
        for h in handles:
            h.remove()
    if len(cached) != adapter.num_layers:
        raise RuntimeError(f"expected {adapter.num_layers} decoder-layer outputs, captured {len(cached)}")
    ref_loss = _loss(ref_logits, ids)
    results: dict[str, Impact] = {}
    for op in progress(units, desc="impact (one operator swapped at a time)"):
        start_time = time.perf_counter()
        start = 0 if op.kind == "embedding" else (adapter.num_layers if op.layer is None else op.layer)
        extra = contexts.get(op.name) if contexts else None
        with _swapped(ref, op.module, cand.get_submodule(op.module)), _skip_layers(layers, cached, start), \
                (extra(ref) if extra else contextlib.nullcontext()):
            logits = ref(input_ids=ids, use_cache=False).logits
        kl = kl_from_logits(ref_logits, logits)
        results[op.name] = Impact(kl=float(kl.mean()), kl_max=float(kl.max()),
                                  loss_delta=_loss(logits, ids) - ref_loss,
                                  seconds=time.perf_counter() - start_time)
    return results
