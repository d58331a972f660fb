"""Candidates built in-process for the inspector tests and benchmarks: fake-quantized or scaled weights."""

from __future__ import annotations

import copy

import torch

from compactlm.inspector.faults import fake_rtn_


def rtn_(weight: torch.Tensor, bits: int, group: int = 16) -> None:
    """Fake-quantize ``weight`` in place with groups of 16 (the tiny models' widths)."""
    fake_rtn_(weight, bits, group)


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
