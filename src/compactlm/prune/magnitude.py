"""Magnitude pruning: zero the smallest |W| (the data-free baseline every pruning paper compares against).

Based on Han et al., "Learning both Weights and Connections" (arXiv 1506.02626), as the baseline of
Wanda (arXiv 2306.11695) §4 and SparseGPT (arXiv 2301.00774) §4. No calibration data is needed.
"""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..registry import register
from .common import PruneConfig, PruneReport, PruneRun, layer_sizes, layer_sparsity, linear_filter, mask_from_scores


@dataclasses.dataclass(frozen=True)
class Magnitude(PruneConfig):
    """Keep the largest-magnitude weights (per row by default; ``scope='layer'`` ranks the whole matrix)."""

    def make_run(self, keep_dense: bool = False) -> MagnitudeRun:
        return MagnitudeRun(self, keep_dense)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Importance = |W| (out, in)."""
    return weight.abs().float()


class MagnitudeRun(PruneRun):
    true_sequential = False  # scores need no activations: one group is enough

    def prune(self, name: str, module: nn.Linear, stats: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return mask_from_scores(magnitude_scores(module.weight), self.config), {}


def prune_magnitude(model: nn.Module, config: Magnitude, filter_fn=None) -> PruneReport:
    """Data-free: walk the decoder layers' linears directly, no forward passes."""
    from ..models import get_adapter

    start = time.perf_counter()
    adapter = get_adapter(model)
    run, keep = config.make_run(), linear_filter(config, filter_fn)
    records = []
    for i in range(adapter.num_layers):
        ctx = SimpleNamespace(prefix=adapter.layer_prefix(i))
        for name, module in adapter.linears(i).items():
            if keep(f"{ctx.prefix}.{name}", module):
                records.append({"name": f"{ctx.prefix}.{name}", **run.solve(name, module, None, ctx)})
    touched = {r["name"] for r in records}
    sparsity = {n: s for n, s in layer_sparsity(model).items() if n in touched}
    return PruneReport(config.to_dict(), records, [], sparsity, layer_sizes(model), time.perf_counter() - start)


@register(Magnitude)
def apply_magnitude(model: nn.Module, config: Magnitude, calib=None, filter_fn=None, **options: Any) -> nn.Module:
    prune_magnitude(model, config, filter_fn)
    return model
