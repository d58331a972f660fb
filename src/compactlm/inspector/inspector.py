"""``inspect(ref, cand, batches)``: per-operator error, isolated and accumulated, ranked by consumer-aware impact.

The precision inspector in the manner of operator-level precision monitoring (KL / SQNR / cosine plus an
end-to-end gate): every operator of the two models is compared on the same inputs (:mod:`.capture`), the
operators that differ are each swapped alone into the reference to measure their effect on the output
(:mod:`.impact`), and the result is one ranked table (:class:`InspectionReport`), with risk flags from
thresholds, written as JSON, CSV, HTML or a terminal table (:mod:`.report`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import ConfigError, DataError
from ..models.adapter import get_adapter
from ..utils import machine_info, peak_rss_mib, progress
from .capture import Capture, check_compatible, discover_operators
from .decode import DecodeCapture, check_same_weights
from .impact import consumer_impact, select_units
from .metrics import hist_edges
from .runtime import DECODE_ONLY, runtime_scope


@dataclass(frozen=True)
class InspectConfig(BaseConfig):
    """What the inspector computes and which thresholds flag a risk.

    Fields: ``isolated`` (re-run candidate operators on reference inputs), ``attention_probs`` (capture
    softmax probabilities on the eager path), ``impact`` (consumer-aware ranking), ``impact_samples``
    (sequences, taken from the start of the data, run per swap), ``impact_top`` (swap only the N units
    with the largest isolated noise-to-signal ratio; 0 = every differing unit), ``batch_size`` (sequences
    per capture pass; bounds memory), ``decode_tokens`` (decode mode, for decode-only attention configs: the
    last N tokens of each sequence are fed one at a time after a prefill, see :mod:`.decode`; 0 = one
    forward pass), and the risk thresholds ``warn_impact_kl`` (nats/token),
    ``warn_sqnr_db`` (isolated SQNR below it), ``warn_attention_kl`` (nats per attention row).
    """

    isolated: bool = True
    attention_probs: bool = True
    impact: bool = True
    impact_samples: int = 2
    impact_top: int = 0
    batch_size: int = 1
    warn_impact_kl: float = 0.01
    warn_sqnr_db: float = 20.0
    warn_attention_kl: float = 0.05
    decode_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.decode_tokens, int) or self.decode_tokens < 0:
            raise ConfigError(f"decode_tokens must be an integer ≥ 0 (0 = forward mode), got {self.decode_tokens!r}")
        if self.impact_samples < 1:
            raise ConfigError(f"impact_samples must be ≥ 1 sequence, got {self.impact_samples}")
        if self.impact_top < 0:
            raise ConfigError(f"impact_top must be ≥ 0 (0 = every differing operator), got {self.impact_top}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}")
        for name in ("warn_impact_kl", "warn_attention_kl"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"{name} must be a non-negative KL in nats, got {value}")
        if not math.isfinite(self.warn_sqnr_db):
            raise ConfigError(f"warn_sqnr_db must be a finite dB value, got {self.warn_sqnr_db}")


def _batches(data: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            data = data.unsqueeze(0)
        items = list(torch.split(data, batch_size)) if data.dim() == 2 else [data]
    else:
        items = list(data)
    if not items:
        raise DataError("inspect needs at least one batch of token ids")
    for b in items:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in (torch.long, torch.int, torch.int32):
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise DataError(f"each batch must be a (batch, tokens) integer tensor of token ids, got {shape}")
        if b.size(1) < 2:
            raise DataError(f"each sequence needs at least 2 tokens, got {b.size(1)}")
    return items


def _risks(op: dict[str, Any], cfg: InspectConfig) -> list[str]:
    flags = []
    iso, acc, imp = op["isolated"], op["accumulated"], op["impact"]
    if any(isinstance(v, float) and math.isnan(v) for m in (iso, acc) if m for v in m.values()):
        flags.append("non_finite")
    if imp is not None and imp["kl"] > cfg.warn_impact_kl:
        flags.append("impact_kl")
    if iso and iso.get("sqnr_db", math.inf) < cfg.warn_sqnr_db and op["kind"] != "attention_probs":
        flags.append("isolated_sqnr")
    if op["kind"] == "attention_probs" and acc and acc.get("kl", 0.0) > cfg.warn_attention_kl:
        flags.append("attention_kl")
    return flags


def _sort_key(op: dict[str, Any]) -> tuple:
    imp = op["impact"]
    iso = op["isolated"] or op["accumulated"] or {}
    kl, nsr = (imp["kl"] if imp else 0.0), iso.get("nsr", 0.0)
    # NaN (a candidate producing non-finite values) sorts as the worst possible, not arbitrarily.
    return (imp is not None, math.inf if kl != kl else kl, op["unit"], math.inf if nsr != nsr else nsr)


@torch.no_grad()
def inspect(ref: nn.Module, cand: nn.Module, batches: torch.Tensor | Iterable[torch.Tensor],
            config: InspectConfig | None = None,
            candidate_context: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
            candidate_runtime: Any = None) -> InspectionReport:
    """Compare every operator of ``cand`` with ``ref`` on ``batches`` of token ids; return the ranked report.

    ``batches`` is an (N, T) id tensor (split into ``config.batch_size`` rows) or an iterable of (B, T)
    tensors. ``candidate_runtime`` runs the candidate with a runtime method (:mod:`.runtime`): a ``KVQuant``
    (or ``PerLayer`` of them: the KV cache's store simulated in the forward), a prefill attention config
    such as ``SparsePrefillConfig``, a list of those, or a prefill ``RuntimeMethod``; ``cand`` may be
    ``ref`` itself. Its attention blocks are units of the consumer-aware impact (the method on that layer
    alone), except for an opaque ``RuntimeMethod``. ``candidate_context(cand)``, the lower-level form, is
    entered around each candidate forward as is; impact is refused with it (it needs module swaps).
    """
    cfg = config or InspectConfig()
    items = _batches(batches, cfg.batch_size)
    if candidate_context is not None and candidate_runtime is not None:
        raise ConfigError("pass either candidate_runtime or candidate_context, not both")
    for m in (ref, cand):
        m.eval()
    ops = discover_operators(ref)
    check_compatible(ref, cand, ops)
    with contextlib.ExitStack() as stack:
        runtime, described = None, None
        if candidate_runtime is not None:
            runtime = stack.enter_context(runtime_scope(cand, candidate_runtime))
            described = runtime.description
            if runtime.opaque:
                candidate_context = runtime.attach
                runtime = None
            elif runtime.decode is not None:
                if not cfg.decode_tokens:
                    raise ConfigError(f"{type(runtime.decode).__name__} {DECODE_ONLY}")
                check_same_weights(ref, cand)
        if cfg.decode_tokens and (runtime is None or runtime.decode is None):
            raise ConfigError("decode_tokens > 0 (decode mode) is for a decode-only attention config passed as "
                              "candidate_runtime (SALSConfig, QuestConfig, StreamingConfig, OracleConfig); set it to 0")
        if cfg.impact and candidate_context is not None:
            raise ConfigError("consumer-aware impact swaps candidate modules into the reference and cannot follow an "
                              "opaque runtime context (candidate_context or a RuntimeMethod); pass its config as "
                              "candidate_runtime, or InspectConfig(impact=False) / --no-impact")
        report = _inspect(ref, cand, items, cfg, ops, candidate_context, runtime)
        report.data["candidate_runtime"] = described
        return report


def _inspect(ref, cand, items, cfg: InspectConfig, ops, candidate_context, runtime) -> InspectionReport:
    runtime_ops: dict[int, str] = {}
    if runtime is not None:
        names = {id(m): n for n, m in cand.named_modules()}
        adapter = get_adapter(cand)
        runtime_ops = {i: names[id(adapter.attention(i))] for i in runtime.handlers}
        candidate_context = (lambda m: runtime.context(m, eager=cfg.attention_probs))  # noqa: E731
    decode = runtime is not None and runtime.decode is not None
    if decode:
        capture = DecodeCapture(ref, cand, ops, runtime.decode, cfg.decode_tokens, cfg.isolated or cfg.impact)
        runtime_ops = {}
    else:
        capture = Capture(ref, cand, ops, isolated=cfg.isolated, attention_probs=cfg.attention_probs,
                          candidate_context=candidate_context,
                          runtime_modules=set(runtime_ops.values()) if runtime is not None else None)
    start = time.perf_counter()
    for batch in progress(items, desc="inspect (reference + candidate passes)"):
        capture.run_batch(batch)
    capture_s = time.perf_counter() - start

    impacts: dict = {}
    differs = {n: s.differs for n, s in (capture.isolated_stats if cfg.isolated else capture.accumulated).items()}
    units = select_units(ops, differs)
    # A runtime's attention block is a unit even when its projections differ too (weights + runtime):
    # its swap then carries both, and the projections are also ranked on their own.
    extra = [op for op in ops if op.kind == "attention" and op.name in runtime_ops.values() and differs[op.name]
             and op not in units]
    units = [op for op in ops if op in units or op in extra]
    impact_s, impact_units = 0.0, 0
    if decode and cfg.impact:
        impacts = capture.impacts  # measured with the isolated runs: the method on one layer at a time
        impact_s, impact_units = sum(i.seconds for i in impacts.values()), len(impacts)
        capture_s -= impact_s  # those runs happened inside the capture loop; count them once, as impact
    elif cfg.impact and units:
        swapped = units
        if cfg.impact_top:
            swapped = sorted(units, key=lambda o: -capture.isolated_stats[o.name].summary()["nsr"])[: cfg.impact_top]
        seqlen = items[0].size(1)
        rows = torch.cat([b for b in items if b.size(1) == seqlen])[: cfg.impact_samples]
        contexts = {op.name: (lambda m, i=op.layer: runtime.context(m, eager=False, layers=[i]))
                    for op in swapped if op.name in runtime_ops.values()}
        start = time.perf_counter()
        impacts = consumer_impact(ref, cand, swapped, rows, contexts)
        impact_s, impact_units = time.perf_counter() - start, len(swapped)

    unit_names = {u.name for u in units}
    operators = []
    for op in ops:
        acc = capture.accumulated[op.name]
        iso = capture.isolated_stats[op.name]
        imp = impacts.get(op.name)
        row = {
            "name": op.name, "kind": op.kind, "layer": op.layer,
            "isolated": iso.summary() if cfg.isolated and iso.elements else None,
            "accumulated": acc.summary() if acc.elements else None,
            "impact": None if imp is None else {"kl": imp.kl, "kl_max": imp.kl_max, "loss_delta": imp.loss_delta,
                                                "seconds": imp.seconds},
            "unit": op.name in unit_names,
            "skipped_batches": capture.skipped[op.name],
            "hist": {"isolated": iso.hist if cfg.isolated else None, "accumulated": acc.hist},
        }
        row["risk"] = _risks(row, cfg)
        operators.append(row)
    operators.sort(key=_sort_key, reverse=True)
    for rank, row in enumerate(operators, 1):
        row["rank"] = rank
    tokens = sum(b.numel() for b in items)
    logits = next(o for o in operators if o["kind"] == "logits")["accumulated"] or {}
    data = {
        "reference": get_adapter(ref).info(), "candidate": get_adapter(cand).info(), "config": cfg.to_dict(),
        "sequences": sum(b.size(0) for b in items), "tokens": tokens,
        "final_logits": {k: logits.get(k) for k in ("kl", "kl_max", "sqnr_db", "cosine")},
        "attention_probs_available": dict(capture.probs_available),
        "candidate_runtime": None,
        "timing": {"capture_s": capture_s, "impact_s": impact_s, "impact_units": impact_units,
                   "impact_tokens": (sum(b.size(0) for b in items) * cfg.decode_tokens if decode else
                                     min(cfg.impact_samples, items[0].size(0) * len(items)) * items[0].size(1))
                   if impact_units else 0, "peak_rss_mib": peak_rss_mib()},
        "mode": f"decode (last {cfg.decode_tokens} tokens of each sequence)" if decode else "forward",
        "hist_edges_log10": hist_edges(),
        "operators": operators,
        "machine": machine_info(next(ref.parameters()).dtype),
    }
    return InspectionReport(data)


class InspectionReport:
    """The inspector's result: ``data`` is the JSON document; writers live in :mod:`.report`."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    @property
    def operators(self) -> list[dict[str, Any]]:
        return self.data["operators"]

    def top(self, n: int = 10, units_only: bool = True) -> list[dict[str, Any]]:
        rows = [o for o in self.operators if o["unit"]] if units_only else self.operators
        return rows[:n]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def write_json(self, path) -> None:
        from .report import write_json
        write_json(self, path)

    def write_csv(self, path) -> None:
        from .report import write_csv
        write_csv(self, path)

    def write_html(self, path) -> None:
        from .report import write_html
        write_html(self, path)

    def table(self, top: int = 15) -> str:
        from .report import terminal_table
        return terminal_table(self, top)
