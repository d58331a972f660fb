"""The ``kv`` step of ``make demo``: int4 and int2 KV caches beside the full-precision one.

Reports KV bytes per token at 8K (a cache of the default model's shape filled with 8,192 tokens;
bytes do not depend on the values) and a small RULER-syn run named ``RULER-syn-demo``: the 8 tasks,
1 sample each, 2K tokens (RULER-syn-q, 5 samples at 2K and 4K, takes too long for the demo budget;
``compactlm eval ruler`` runs it). Everything in one process, full precision beside.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..evaluation.methods import build_method
from ..evaluation.ruler import TASKS, run_ruler
from .cache import QuantizedKVCache, full_cache_bytes
from .config import KVQuant


def bytes_per_token(model, config: KVQuant | None, context: int = 8192) -> float:
    """KV bytes per token of a ``context``-token cache (``None``: the full-precision cache)."""
    from transformers import DynamicCache

    from ..models import get_adapter

    a = get_adapter(model)
    dtype = next(model.parameters()).dtype
    full = DynamicCache(config=model.config)
    g = torch.Generator().manual_seed(0)
    for i in range(a.num_layers):
        k = torch.randn(1, a.num_kv_heads, context, a.head_dim, generator=g).to(dtype)
        full.update(k, k.clone(), i)
    if config is None:
        return full_cache_bytes(full) / context
    return QuantizedKVCache.from_cache(model, config, full).kv_bytes() / context


def step_kv(ctx) -> list[dict[str, Any]]:
    model, tok = ctx.load("bf16")
    start = time.perf_counter()
    methods = [build_method(model, "kv", f"int{b}", {}) for b in (4, 2)]
    res = run_ruler(model, tok, methods, lengths=[2048], samples=1, tasks=TASKS)
    full_bpt = bytes_per_token(model, None)
    rows = []
    for name, r in res.methods.items():
        cfg = None if name == "full" else KVQuant(bits=4 if "int4" in name else 2)
        bpt = full_bpt if cfg is None else bytes_per_token(model, cfg)
        rows.append({"step": "kv", "method": "full-precision cache (bf16)" if cfg is None else name,
                     "ruler_syn_demo": r["score"], "kv_bytes_per_token_8k": bpt, "kv_vs_bf16": bpt / full_bpt,
                     "seconds": time.perf_counter() - start})
    print("RULER-syn-demo (8 tasks × 1 sample at 2K; a reduced RULER-syn-q) with the default model in bf16")
    return rows
