"""Candidates built in-process for the inspector tests and benchmarks: fake-quantized or scaled weights."""

from __future__ import annotations

import copy

import torch


def rtn_(weight: torch.Tensor, bits: int, group: int = 16) -> None:
    """Fake-quantize ``weight`` in place: asymmetric round-to-nearest per group of ``group`` input columns."""
    out, inp = weight.shape
    w = weight.data.reshape(out, inp // group, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    q = ((w - lo) / scale).round().clamp(0, 2**bits - 1)
    weight.data.copy_((q * scale + lo).reshape(out, inp))


def plant(model, name: str, fault: str) -> None:
    """Plant ``fault`` ("rtn2" or "scale100") in the linear ``name`` of ``model``."""
    lin = model.get_submodule(name)
    with torch.no_grad():
        if fault == "rtn2":
            rtn_(lin.weight, 2)
        elif fault == "scale100":
            lin.weight[:, 5] *= 100.0
        else:
            raise ValueError(fault)


def candidate(ref, name: str, fault: str):
    cand = copy.deepcopy(ref)
    plant(cand, name, fault)
    return cand
