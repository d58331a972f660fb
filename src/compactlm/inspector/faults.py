"""Planting known faults, for the inspector's demo, tests and planted-fault benchmarks."""

from __future__ import annotations

import torch


def fake_rtn_(weight: torch.Tensor, bits: int, group: int = 64) -> None:
    """Fake-quantize ``weight`` in place: asymmetric round-to-nearest per group of ``group`` input columns.

    Deliberately independent of :mod:`compactlm.quant` (min/max range without forcing 0 into it), so the
    inspector's checks do not rely on the code they may be asked to diagnose.
    """
    out, inp = weight.shape
    w = weight.data.reshape(out, inp // group, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    q = ((w - lo) / scale).round().clamp(0, 2**bits - 1)
    weight.data.copy_((q * scale + lo).reshape(out, inp))
