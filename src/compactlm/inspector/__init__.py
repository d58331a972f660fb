"""Precision inspector: per-operator error (isolated and accumulated), consumer-aware ranking, quality gate.

``compactlm.inspect(ref, cand, batches)`` returns an :class:`InspectionReport`; ``auto_eval`` is the gate.
(The package is ``inspector``, not ``inspect``, so the standard library's module is never shadowed.)
"""

from .gate import GateConfig, GateResult, auto_eval
from .inspector import InspectConfig, InspectionReport, inspect
from .metrics import (
                      ErrorStats,
                      cosine,
                      kl_from_logits,
                      kl_from_probs,
                      max_abs,
                      noise_to_signal,
                      relative_frobenius,
                      sqnr_db,
)

__all__ = ["inspect", "InspectConfig", "InspectionReport", "auto_eval", "GateConfig", "GateResult", "ErrorStats",
           "cosine", "sqnr_db", "noise_to_signal", "max_abs", "relative_frobenius", "kl_from_logits", "kl_from_probs"]
