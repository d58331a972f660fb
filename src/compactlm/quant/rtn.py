"""RTN: round-to-nearest weight quantization, no calibration data.

The baseline every calibrated method is measured against (GPTQ, arXiv 2210.17323, §5 "RTN"). Each
group's range is its min/max (optionally shrunk by the clipping search), codes are rounded to nearest.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..primitives.quant import rtn
from ..registry import register
from ..utils import progress
from .common import WeightQuantConfig, pack_into, quant_targets


@dataclasses.dataclass(frozen=True)
class RTN(WeightQuantConfig):
    """Round-to-nearest. Fields: see :class:`~compactlm.quant.common.WeightQuantConfig`."""


@register(RTN)
@torch.no_grad()
def apply_rtn(model: nn.Module, cfg: RTN, calib=None, filter_fn=None, report: dict | None = None,
              **_options) -> nn.Module:
    spec = cfg.spec()
    targets = quant_targets(model, cfg, filter_fn)
    for name, linear in progress(targets.items(), desc="RTN", total=len(targets)):
        codes, scale, zero = rtn(linear.weight.detach(), spec)
        pack_into(model, name, linear, codes, scale, zero, spec)
        if report is not None:
            report.setdefault("layers", []).append({"name": name, "bits": spec.bits})
    return model
