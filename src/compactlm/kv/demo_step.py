"""The ``kv`` step of ``make demo``: int4 and int2 KV caches beside the full-precision one.

Reports KV bytes per token at 8K (the cache of a real prefill of 8,192 wiki tokens: the per-channel key
bits of ``int2-mixed`` follow the keys, and so do its bytes) and a small RULER-syn run named ``RULER-syn-demo``:
the 8 tasks,
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
from .runtime import PRESETS


def bytes_per_token(model, config: KVQuant | None, cache, tokens: int) -> float:
    """KV bytes per token of the filled full-precision ``cache`` (``None``) or of it converted to ``config``."""
    if config is None:
        return full_cache_bytes(cache) / tokens
    return QuantizedKVCache.from_cache(model, config, cache).kv_bytes() / tokens


def prefill_cache(model, tokenizer, context: int = 8192):
    """The full-precision cache of a real prefill: the first ``context`` tokens of the PPL-wiki text.

    Also ``benchmarks/kv_bytes_speed.py --real-text``. Raises DataError before any work when the text is shorter.
    """
    from transformers import DynamicCache

    from ..data.calib import tokenize_source
    from ..errors import DataError

    ids = tokenize_source(tokenizer, "wiki")[:context][None]
    if ids.shape[-1] < context:
        raise DataError(f"the wiki text has {ids.shape[-1]} tokens, fewer than the {context} asked for")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    return cache, ids.shape[-1]


def prefill_cache_saved(model, tokenizer, context: int, path: str | None):
    """:func:`prefill_cache`'s cache, saved to / loaded from ``path`` (``.pt``: keys and values per layer) when
    given: the speed benchmarks reuse one 8K prefill (about a CPU-minute) across runs."""
    import os

    from transformers import DynamicCache

    if path and os.path.exists(path):
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(torch.load(path)):
            cache.update(k, v, i)
        return cache
    cache = prefill_cache(model, tokenizer, context)[0]
    if path:
        torch.save([(layer.keys, layer.values) for layer in cache.layers], path)
    return cache


def step_kv(ctx) -> list[dict[str, Any]]:
    model, tok = ctx.load("bf16")
    start = time.perf_counter()
    configs = {"int4": KVQuant(bits=4), "int2": KVQuant(bits=2), "int2-mixed": KVQuant(bits=2, **PRESETS["int2-mixed"])}
    methods = {name: build_method(model, "kv", name, {}) for name in configs}
    res = run_ruler(model, tok, list(methods.values()), lengths=[2048], samples=1, tasks=TASKS)
    full, tokens = prefill_cache(model, tok)
    full_bpt = bytes_per_token(model, None, full, tokens)
    by_method = {m.name: configs[name] for name, m in methods.items()}
    rows = []
    for name, r in res.methods.items():
        cfg = by_method.get(name)
        bpt = bytes_per_token(model, cfg, full, tokens)
        rows.append({"step": "kv", "method": "full-precision cache (bf16)" if cfg is None else name,
                     "ruler_syn_demo": r["score"], "kv_bytes_per_token_8k": bpt, "kv_vs_bf16": bpt / full_bpt,
                     "seconds": time.perf_counter() - start})
    print("RULER-syn-demo (8 tasks × 1 sample at 2K; a reduced RULER-syn-q) with the default model in bf16")
    return rows
