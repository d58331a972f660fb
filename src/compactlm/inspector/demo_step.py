"""The ``inspect`` step of ``compactlm demo``: find a planted fault inside a uniformly quantized model.

The candidate is built here, independently of the quantization package: every decoder linear is
fake-quantized to 4-bit RTN (asymmetric, groups of 64), and one randomly chosen linear to 2 bits. The
inspector must rank that linear first among all differing operators.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import torch

from .faults import fake_rtn_


def step_inspect(ctx) -> list[dict[str, Any]]:
    from ..data import eval_windows
    from ..models import get_adapter
    from .inspector import InspectConfig, inspect

    ref, tok = ctx.load()
    names = list(get_adapter(ref).named_linears())
    planted = random.Random(0).choice(names)
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        for n in names:
            fake_rtn_(cand.get_submodule(n).weight, 2 if n == planted else 4)
    ids = eval_windows(tok, "wiki", seqlen=256, windows=1)  # 256 tokens keep the step within ~2 min on 2 cores
    start = time.perf_counter()
    # Impact on the 12 operators with the largest isolated error keeps the step near a minute on 2 cores.
    report = inspect(ref, cand, ids, InspectConfig(impact_samples=1, impact_top=12))
    seconds = time.perf_counter() - start
    print(f"candidate: every decoder linear RTN W4 g64, and {planted} at 2 bits (the planted fault)")
    print(report.table(8))
    top = report.top(1)[0]
    t = report.data["timing"]
    return [{"step": "inspect", "method": "inspector on RTN W4 g64 + one W2 linear",
             "top_offender": top["name"], "planted_found": top["name"] == planted,
             "logit_kl": report.data["final_logits"]["kl"], "capture_s": t["capture_s"], "impact_s": t["impact_s"],
             "seconds": seconds}]
