"""Set-up shared by the inspector benchmarks (``inspector_cost.py``, ``inspector_planted.py``).

Imported as a sibling module: both scripts run as ``python benchmarks/<script>.py``, which puts this folder
first on ``sys.path``. Everything here is plain set-up; what each benchmark measures stays in its script.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Any

import torch

from compactlm.data import eval_windows
from compactlm.inspector.faults import fake_rtn_
from compactlm.models import get_adapter, load
from compactlm.utils import machine_info, set_quiet

MACHINE_NOTE = "shared 2-core machine, other engineers' jobs running; times are upper bounds"


def add_args(ap: argparse.ArgumentParser, *, samples: int, impact_samples: int,
             impact_top_help: str | None = None) -> None:
    """The options both benchmarks take: model, wiki windows, impact budget, threads, JSON output."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=samples, help=f"wiki windows inspected (default {samples})")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--impact-samples", type=int, default=impact_samples,
                    help=f"windows the consumer-aware impact runs on (default {impact_samples})")
    ap.add_argument("--impact-top", type=int, default=0, help=impact_top_help)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")


@dataclasses.dataclass
class Setup:
    ref: torch.nn.Module  # the fp32 reference model
    cand: torch.nn.Module  # a deep copy of it: the candidate each benchmark damages
    names: list[str]  # every decoder linear, layer by layer, in the adapter's order
    ids: torch.Tensor  # (samples, seqlen) wiki windows (PPL-wiki-512 text and windowing)


def setup(args: argparse.Namespace, quantize_bits: int | None = None) -> Setup:
    """Threads and quiet progress, the reference model, a candidate copy and the wiki windows.

    ``quantize_bits`` fake-quantizes every decoder linear of the candidate (RTN, groups of 64, asymmetric):
    the whole-model W4 candidate of the cost benchmark and the ``--background w4`` of the planted one.
    """
    torch.set_num_threads(args.threads)
    set_quiet(True)
    ref, tok = load(args.model)
    adapter = get_adapter(ref)
    names = [f"{adapter.layer_prefix(i)}.{n}" for i in range(adapter.num_layers) for n in adapter.linears(i)]
    cand = copy.deepcopy(ref)
    if quantize_bits is not None:
        with torch.no_grad():
            for n in names:
                fake_rtn_(cand.get_submodule(n).weight, quantize_bits)
    ids = eval_windows(tok, "wiki", seqlen=args.seqlen, windows=args.samples)
    return Setup(ref, cand, names, ids)


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """Machine notes for the result JSON: fp32, the thread count, and that the machine was shared."""
    return {**machine_info("float32"), "threads": args.threads, "note": MACHINE_NOTE}
