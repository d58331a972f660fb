"""Decode-mode inspection: decode-only sparse attention (SALS, Quest, StreamingLLM, oracle) on its decode path.

A decode-only method changes attention only when one new token attends to the cache, which a forward pass
over a prompt never does. Here each sequence is run the PPL-decode way (PROTOCOL.md): its first ``T − N``
tokens are prefilled once with full attention, then its last ``N`` tokens are fed one at a time,
teacher-forced, and every operator's output is captured at every decode step:

- **reference**: full attention, full-precision cache;
- **accumulated**: the method on all its sparse layers (a copy of the shared prefill cache, as the
  long-context runners do), every operator compared with the reference at the same step;
- **isolated + consumer-aware impact**, per sparse layer ``i``: the method on layer ``i`` alone (the budget
  config with every other layer dense). Layers before ``i`` are then exactly the reference's, so layer
  ``i``'s attention sees the reference's inputs and cache: its output is the isolated error of that
  attention block ("the attention output of the same layer on the same inputs"), and the final
  next-token distributions of that run against the reference's are its impact (mean KL, loss change).

The candidate must carry the reference's weights (a decode-only method is a runtime change): every other
operator's isolated error is then exactly zero. Cost per sequence: one prefill plus
``(2 + sparse layers) × N`` single-token steps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.runtime import sparse_attention
from ..errors import ConfigError
from ..models.adapter import get_adapter
from ..utils import progress
from .capture import DISTRIBUTION_KINDS, Operator, primary
from .impact import Impact
from .metrics import ErrorStats, kl_from_logits


@contextmanager
def _recording(model: nn.Module, ops: list[Operator], step: list[int], store: dict) -> Iterator[None]:
    """Record ``store[op][step] = output`` for every operator (probabilities excluded) while in scope."""
    by_module: dict[str, list[Operator]] = {}
    for op in ops:
        if op.kind != "attention_probs":
            by_module.setdefault(op.module, []).append(op)
    handles = []
    for path, group in by_module.items():
        def post(m, args, output, group=group):
            t = primary(output)
            if t is not None:
                for op in group:
                    store.setdefault(op.name, {})[step[0]] = t.detach()
        handles.append(model.get_submodule(path).register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _decode(model: nn.Module, cache: Any, tokens: torch.Tensor, ops: list[Operator], budget: Any | None,
            ) -> tuple[dict, torch.Tensor]:
    """Feed ``tokens`` (B, N) one at a time into ``cache`` (under ``budget`` if given); outputs per step, logits."""
    store: dict = {}
    step = [0]
    logits = []
    scope = sparse_attention(model, budget) if budget is not None else contextlib.nullcontext()
    with scope, _recording(model, ops, step, store):
        for j in range(tokens.size(1)):
            step[0] = j
            out = model(input_ids=tokens[:, j:j + 1], cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[:, -1].float())
    return store, torch.stack(logits, 1)  # (B, N, V)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean NLL of ``targets`` (B, N−1) under ``logits`` (B, N, V) of the steps that predict them."""
    lg = logits[:, :-1]
    return float(F.cross_entropy(lg.reshape(-1, lg.size(-1)), targets.reshape(-1)))


class DecodeCapture:
    """Per-operator accumulated and isolated :class:`ErrorStats` and per-layer impacts over decode steps.

    Same attributes as :class:`.capture.Capture` (``accumulated``, ``isolated_stats``, ``skipped``,
    ``probs_available``), plus ``impacts`` (attention operator name -> :class:`Impact`, summed over batches).
    """

    def __init__(self, ref: nn.Module, cand: nn.Module, ops: list[Operator], budget: Any, decode_tokens: int,
                 per_layer: bool = True):
        self.ref, self.cand, self.ops, self.budget, self.n = ref, cand, ops, budget, decode_tokens
        self.per_layer = per_layer
        adapter = get_adapter(ref)
        self.layers = adapter.num_layers
        self.sparse = budget.sparse_layers(self.layers)
        names = {id(m): n for n, m in ref.named_modules()}
        self.sparse_ops = {i: names[id(adapter.attention(i))] for i in self.sparse}
        self.accumulated = {op.name: ErrorStats() for op in ops}
        self.isolated_stats = {op.name: ErrorStats() for op in ops}
        self.skipped = {op.name: 0 for op in ops}
        self.probs_available = {"reference": False, "candidate": False}  # not captured on the decode path
        self._impact: dict[str, list[float]] = {}  # name -> [kl_sum, kl_max, loss_delta_sum, rows, batches, s]

    def _compare(self, stats: dict, ref: dict, cand: dict, names: set[str] | None = None) -> None:
        for op in self.ops:
            if op.kind == "attention_probs" or (names is not None and op.name not in names):
                continue
            r, c = ref.get(op.name, {}), cand.get(op.name, {})
            for step, rt in r.items():
                ct = c.get(step)
                if ct is None or ct.shape != rt.shape:
                    self.skipped[op.name] += 1
                    continue
                batch = ErrorStats()
                batch.update(rt, ct)
                if op.kind in DISTRIBUTION_KINDS:
                    batch.update_kl(kl_from_logits(rt, ct))
                stats[op.name].merge(batch)

    @torch.no_grad()
    def run_batch(self, input_ids: torch.Tensor) -> None:
        ids = input_ids.to(next(self.ref.parameters()).device)
        if ids.size(1) - self.n < 1:
            raise ConfigError(f"decode_tokens={self.n} leaves no prefix to prefill in {ids.size(1)}-token sequences; "
                              f"use fewer decode tokens or longer sequences")
        prefix, tokens = ids[:, :-self.n], ids[:, -self.n:]
        from transformers import DynamicCache

        shared = DynamicCache(config=self.ref.config)
        self.ref(input_ids=prefix, cache=shared, use_cache=True, logits_to_keep=1)  # one prefill, shared
        ref_out, ref_logits = _decode(self.ref, copy.deepcopy(shared), tokens, self.ops, None)
        targets = tokens[:, 1:]
        ref_loss = _loss(ref_logits, targets)
        cand_out, _ = _decode(self.cand, copy.deepcopy(shared), tokens, self.ops, self.budget)
        self._compare(self.accumulated, ref_out, cand_out)
        # Every operator other than a sparse layer's attention has the reference's weights and (in the
        # per-layer runs) the reference's inputs: its isolated error is exactly zero.
        sparse_names = set(self.sparse_ops.values())
        for op in self.ops:
            if op.kind != "attention_probs" and op.name not in sparse_names:
                for rt in ref_out.get(op.name, {}).values():
                    rows = rt.numel() // rt.shape[-1] if op.kind in DISTRIBUTION_KINDS else 0
                    self.isolated_stats[op.name].add_exact(rt, rows)
        if not self.per_layer:
            return
        for i, name in progress(list(self.sparse_ops.items()), desc="decode: one sparse layer at a time"):
            start = time.perf_counter()
            alone = dataclasses.replace(self.budget, dense_layers=tuple(j for j in range(self.layers) if j != i))
            out, logits = _decode(self.cand, copy.deepcopy(shared), tokens, [o for o in self.ops if o.name == name],
                                  alone)
            self._compare(self.isolated_stats, ref_out, out, {name})
            kl = kl_from_logits(ref_logits, logits)  # (B, N)
            acc = self._impact.setdefault(name, [0.0, 0.0, 0.0, 0, 0, 0.0])
            acc[0] += float(kl.double().sum())
            acc[1] = max(acc[1], float(kl.max()))
            acc[2] += _loss(logits, targets) - ref_loss
            acc[3] += kl.numel()
            acc[4] += 1
            acc[5] += time.perf_counter() - start

    @property
    def impacts(self) -> dict[str, Impact]:
        return {n: Impact(kl=a[0] / a[3], kl_max=a[1], loss_delta=a[2] / a[4], seconds=a[5])
                for n, a in self._impact.items()}


def check_same_weights(ref: nn.Module, cand: nn.Module) -> None:
    """Decode mode inspects a runtime method on the reference's weights: refuse a candidate whose weights differ."""
    if ref is cand:
        return
    a, b = ref.state_dict(), cand.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a):
        raise ConfigError("decode mode (decode_tokens > 0) inspects a decode-only attention method on the reference's "
                          "weights; this candidate's weights differ. Inspect the weights without the method (forward "
                          "mode), or pass the reference itself as the candidate")
