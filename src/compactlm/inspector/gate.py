"""AutoEval: an end-to-end quality gate for CI: configurable checks that pass or fail a compressed candidate.

Checks (each optional; at least one must be set):

- ``max_ppl_delta``: candidate perplexity − reference perplexity on PPL-wiki-512-q (40 windows of 512);
- ``max_ppl_ratio``: candidate perplexity / reference perplexity on the same windows;
- ``max_kl``: mean per-token KL(P_ref ‖ P_cand) of next-token distributions on the same windows (nats);
- ``max_ruler_drop``: reference − candidate RULER-syn-q score (points of 100) via
  :mod:`compactlm.evaluation.ruler`; reported as *skipped*, with the reason, where that module is
  unavailable. It is slow (two full RULER-syn-q runs), so it is off unless asked for.

PPL and KL come from one pass: each window goes through both models once.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..data.calib import eval_windows
from ..errors import ConfigError, DataError
from ..evaluation.ppl import protocol_name
from ..utils import progress
from .metrics import kl_from_logits


@dataclass(frozen=True)
class GateConfig(BaseConfig):
    """Thresholds (``None`` = check off) and the evaluation data of the gate (defaults: PPL-wiki-512-q)."""

    max_ppl_delta: float | None = None
    max_ppl_ratio: float | None = None
    max_kl: float | None = None
    max_ruler_drop: float | None = None
    data: str = "wiki"
    windows: int = 40
    seqlen: int = 512
    batch_size: int = 4

    def __post_init__(self) -> None:
        checks = (self.max_ppl_delta, self.max_ppl_ratio, self.max_kl, self.max_ruler_drop)
        if all(c is None for c in checks):
            raise ConfigError("the gate has no check: set at least one of max_ppl_delta, max_ppl_ratio, max_kl, "
                              "max_ruler_drop (CLI: --max-ppl-delta, --max-ppl-ratio, --max-kl, --max-ruler-drop)")
        for name in ("max_ppl_delta", "max_ppl_ratio", "max_kl", "max_ruler_drop"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or math.isnan(v)):
                raise ConfigError(f"{name} must be a number, got {v!r}")
        if self.max_kl is not None and self.max_kl < 0:
            raise ConfigError(f"max_kl is a KL in nats and must be ≥ 0, got {self.max_kl}")
        if self.max_ppl_ratio is not None and self.max_ppl_ratio <= 0:
            raise ConfigError(f"max_ppl_ratio must be > 0 (e.g. 1.05 for +5 %), got {self.max_ppl_ratio}")
        if self.windows < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ConfigError(f"need windows ≥ 1, seqlen ≥ 2, batch_size ≥ 1; got {self.windows}, {self.seqlen}, "
                              f"{self.batch_size}")


@dataclass
class Check:
    name: str
    value: float | None
    threshold: float
    passed: bool
    skipped: bool = False
    message: str = ""


@dataclass
class GateResult:
    passed: bool
    checks: list[Check]
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks], "figures": self.figures,
                "seconds": self.seconds}


@torch.no_grad()
def _ppl_and_kl(ref: nn.Module, cand: nn.Module, ids: torch.Tensor, batch_size: int) -> dict[str, float]:
    nll_ref = nll_cand = kl_sum = 0.0
    tokens = rows = 0
    for batch in progress(list(torch.split(ids, batch_size)), desc="gate: PPL + logit KL"):
        lr = ref(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        lc = cand(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:].reshape(-1)
        nll_ref += float(F.cross_entropy(lr.reshape(-1, lr.size(-1)), target, reduction="sum"))
        nll_cand += float(F.cross_entropy(lc.reshape(-1, lc.size(-1)), target, reduction="sum"))
        kl = kl_from_logits(lr, lc)
        kl_sum += float(kl.sum())
        tokens += target.numel()
        rows += kl.numel()
    return {"ppl_reference": math.exp(nll_ref / tokens), "ppl_candidate": math.exp(nll_cand / tokens),
            "logit_kl": kl_sum / rows, "tokens": tokens}


def _ruler_drop(ref: nn.Module, cand: nn.Module, tokenizer) -> tuple[float | None, str]:
    try:
        ruler = importlib.import_module("compactlm.evaluation.ruler")
    except ModuleNotFoundError:
        return None, "skipped: compactlm.evaluation.ruler is not available in this installation"
    run = getattr(ruler, "run_ruler", None)
    if run is None or tokenizer is None:
        why = "it has no run_ruler()" if run is None else "the model has no tokenizer"
        return None, f"skipped: RULER-syn-q cannot run ({why})"
    scores = [run(m, tokenizer).methods["full"]["score"] for m in (ref, cand)]  # RULER-syn-q defaults
    return scores[0] - scores[1], f"RULER-syn-q reference {scores[0]:.1f}, candidate {scores[1]:.1f}"


def auto_eval(ref: nn.Module, cand: nn.Module, tokenizer=None, config: GateConfig | None = None,
              input_ids: torch.Tensor | None = None) -> GateResult:
    """Run the gate's checks on ``cand`` against ``ref``; ``input_ids`` (N, T) replaces the text windows."""
    if config is None:
        raise ConfigError("auto_eval needs a GateConfig with at least one threshold, e.g. GateConfig(max_kl=0.05)")
    vocab = [getattr(m.config, "vocab_size", None) for m in (ref, cand)]
    if vocab[0] != vocab[1]:
        raise ConfigError(f"reference and candidate have different vocabularies ({vocab[0]} vs {vocab[1]} tokens); "
                          "the gate compares next-token distributions, which needs one tokenizer")
    start = time.perf_counter()
    if input_ids is None:
        if tokenizer is None:
            raise DataError("the gate needs a tokenizer to cut text windows, or pre-tokenized input_ids")
        input_ids = eval_windows(tokenizer, config.data, seqlen=config.seqlen, windows=config.windows)
        protocol = protocol_name(config.data, config.seqlen, config.windows)
    else:
        if input_ids.dim() != 2 or input_ids.size(1) < 2:
            raise DataError(f"input_ids must be (windows, tokens ≥ 2), got shape {tuple(input_ids.shape)}")
        protocol = f"PPL-ids-{input_ids.size(1)} ({input_ids.size(0)} windows)"
    for m in (ref, cand):
        m.eval()
    checks: list[Check] = []
    figures: dict[str, Any] = {"protocol": protocol}
    if any(v is not None for v in (config.max_ppl_delta, config.max_ppl_ratio, config.max_kl)):
        figures.update(_ppl_and_kl(ref, cand, input_ids, config.batch_size))
        pr, pc = figures["ppl_reference"], figures["ppl_candidate"]
        for name, value, limit in (("ppl_delta", pc - pr, config.max_ppl_delta),
                                   ("ppl_ratio", pc / pr, config.max_ppl_ratio),
                                   ("logit_kl", figures["logit_kl"], config.max_kl)):
            if limit is not None:
                ok = math.isfinite(value) and value <= limit
                checks.append(Check(name, value, limit, ok, message=f"{protocol}: reference PPL {pr:.4g}, "
                                                                     f"candidate {pc:.4g}"))
    if config.max_ruler_drop is not None:
        drop, msg = _ruler_drop(ref, cand, tokenizer)
        checks.append(Check("ruler_drop", drop, config.max_ruler_drop,
                            passed=drop is None or drop <= config.max_ruler_drop, skipped=drop is None, message=msg))
    ran = [c for c in checks if not c.skipped]
    passed = bool(ran) and all(c.passed for c in ran)  # a gate where every check was skipped certifies nothing
    return GateResult(passed, checks, figures, time.perf_counter() - start)
