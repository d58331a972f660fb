"""Wanda: prune by |W| times the input activation norm, per output row.

Based on Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (arXiv 2306.11695),
§3: score S_ij = |W_ij| · ‖X_j‖₂ over every calibration token, compared within each output row
(the paper's "per output" comparison group, §3 and Table 6); N:M compares within each group of M inputs.
No weight update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..registry import register
from .common import PruneConfig, PruneRun, execute, mask_from_scores


@dataclasses.dataclass(frozen=True)
class Wanda(PruneConfig):
    """Wanda (sparsity or N:M pattern, ``scope='row'`` as in the paper). Needs calibration data."""

    def make_run(self, keep_dense: bool = False) -> WandaRun:
        return WandaRun(self, keep_dense)


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| (out, in) · ‖X_j‖ with ``sq_norm`` (in,) the summed squares of each input feature over tokens."""
    return weight.abs().float() * sq_norm.float().sqrt().unsqueeze(0)


@dataclasses.dataclass
class InputNorms:
    sq_sum: torch.Tensor  # (in,) fp32: sum over tokens of x_j²
    tokens: int = 0


class WandaRun(PruneRun):
    # Wanda's reference loop collects every linear's inputs in one pass per layer and re-forwards after
    # pruning the whole layer (§3 "one forward pass"); true-sequential groups are an option, not the paper's.
    true_sequential = False

    def new_stats(self, name: str, module: nn.Linear) -> InputNorms:
        return InputNorms(torch.zeros(module.in_features, dtype=torch.float32, device=module.weight.device))

    def add_batch(self, stats: InputNorms, name: str, module: nn.Linear, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()  # (tokens, in)
        stats.sq_sum += (x * x).sum(0)
        stats.tokens += x.shape[0]

    def prune(self, name: str, module: nn.Linear, stats: InputNorms) -> tuple[torch.Tensor, dict[str, Any]]:
        return mask_from_scores(wanda_scores(module.weight, stats.sq_sum), self.config), {}


@register(Wanda)
def apply_wanda(model: nn.Module, config: Wanda, calib=None, filter_fn=None, **options: Any) -> nn.Module:
    execute(model, config, config.make_run(), calib, filter_fn, **options)
    return model
