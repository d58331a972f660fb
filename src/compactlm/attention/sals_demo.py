"""The ``sals`` step of ``make demo``: PPL through the SALS decode path vs full attention, and KV bytes/token.

A small variant of PPL-decode (one 2,048-token wiki window, the last 32 tokens decoded one at a time) so that
the step stays within a few minutes on 2 CPU cores; the full protocol runs are in benchmarks/sals_quality.py.
"""

from __future__ import annotations

import copy
import time
from typing import Any


def step_sals(ctx: Any) -> list[dict[str, Any]]:
    import torch

    from ..data import eval_windows
    from ..evaluation.generate import prefill
    from ..evaluation.ppl_decode import run_ppl_decode
    from .sals import SALSConfig, sals_method
    from .sals_cache import kv_bytes_per_token
    from .sals_calib import ensure_projections

    start = time.perf_counter()
    model, tok = ctx.load("bf16")
    ensure_projections(model, tok)
    rows = []
    ids = eval_windows(tok, "wiki", seqlen=2048, windows=1)
    # The paper's SALS-25 % beside `sals-avg` (same rank, position-averaged scoring + exact sink/recent keys).
    configs = {"sals-25.0%": SALSConfig(rank=0.25),
               "sals-avg-25.0%": SALSConfig(rank=0.25, score_rope="averaged", exact_sink=16, exact_recent=64)}
    methods = [sals_method(model, cfg, name) for name, cfg in configs.items()]
    result = run_ppl_decode(model, tok, methods, input_ids=ids, decoded=32)
    full = result.methods["full"]["ppl"]
    with torch.no_grad():
        dense, _ = prefill(model, ids[:, :1024])
    full_bytes = kv_bytes_per_token(dense)
    for m in methods:
        cache = m.make_cache(model, copy.deepcopy(dense))
        rows.append({"step": "sals", "method": f"{m.name} keep 1/8+16+64 (bf16)",
                     "ppl_decode_2k_32": result.methods[m.name]["ppl"], "ppl_decode_full": full,
                     "kv_bytes_per_token": kv_bytes_per_token(cache), "kv_bytes_full": full_bytes,
                     "seconds": time.perf_counter() - start})
    return rows
