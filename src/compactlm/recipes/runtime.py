"""The inference-time half of a recipe (its KV-cache and attention steps) as one :class:`RuntimeMethod`.

The runners (RULER-syn, PPL-decode, ``generate``, the lm-eval adapter) take RuntimeMethods; this builds
the one a recipe describes:

- KV step alone: the KIVI-style quantized cache with its fused decode attention (``kv_cache``).
- attention steps alone: ``sparse_attention(model, prefill_cfg, decode_cfg)``.
- KV step + a decode method that keeps its own cache layers (SALS's latent keys): a *hybrid* cache. SALS
  leaves its dense layers (``dense_first``/``dense_last``) as ordinary caches; those layers get the
  quantized KV layers, the sparse layers SALS's latent layers, whose values SALS stores at the KV step's
  bits (``value_bits``, unless the SALS step sets its own).
- KV step + a decode method that reads ordinary keys (Quest, StreamingLLM) or a prefill config: the
  quantized cache without fused attention, so the attention method sees the keys it returns.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..evaluation.methods import FULL, RuntimeMethod


def _sals_parts(model: nn.Module, cfg: Any) -> tuple[Any, ...]:
    from ..attention.decode_common import RopeTable
    from ..attention.sals_calib import projections_for
    from ..models import get_adapter

    adapter = get_adapter(model)
    return adapter, projections_for(model, cfg.projections), RopeTable(adapter), cfg.sparse_layers(adapter.num_layers)


def sals_with_kv_values(sals: Any, kv: Any, head_dim: int) -> Any:
    """SALS with the KV step's value bits on its own layers (its keys are latent; its values follow the KV step)."""
    if kv is None or sals.value_bits is not None:
        return sals
    return dataclasses.replace(sals, value_bits=kv.v_bits, value_group=kv.value_group(head_dim))


def recipe_method(model: nn.Module, recipe: Any, name: str | None = None) -> RuntimeMethod:
    """The RuntimeMethod of ``recipe``'s KV and attention steps on ``model`` (FULL when it has none)."""
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, DynamicLayer

    from ..attention.runtime import sparse_attention
    from ..attention.sals import SALSConfig
    from ..kv.cache import QuantizedKVCache
    from ..kv.runtime import kv_cache

    kv = recipe.kv
    prefill_cfg, decode_cfg = recipe.plan["prefill"], recipe.plan["decode"]
    attn = [c for c in (prefill_cfg, decode_cfg) if c is not None]
    if kv is None and not attn:
        return FULL
    label = name or "+".join(type(c).__name__ for c in ([kv] if kv else []) + attn)
    kv_plain = dataclasses.replace(kv, fused_attention=False) if kv is not None and attn else kv
    from ..models import get_adapter

    head_dim = get_adapter(model).head_dim
    sals = sals_with_kv_values(decode_cfg, kv, head_dim) if isinstance(decode_cfg, SALSConfig) else None
    if sals is not None:
        attn = [sals if c is decode_cfg else c for c in attn]
    parts = _sals_parts(model, sals) if sals is not None else None

    def make_cache(model: nn.Module, prefill_cache: Any) -> Any:
        if kv_plain is None:
            cache = DynamicCache(config=model.config) if prefill_cache is None else copy.deepcopy(prefill_cache)
        elif prefill_cache is None:
            cache = QuantizedKVCache(model, kv_plain)
        else:
            cache = QuantizedKVCache.from_cache(model, kv_plain, prefill_cache)
        if parts is not None:
            from ..attention.sals_cache import convert_cache

            adapter, projections, rope, sparse = parts
            if kv_plain is not None:  # hybrid: SALS layers where SALS decodes, quantized layers elsewhere
                layers = list(cache.layers)
                for i in sparse:
                    src = None if prefill_cache is None else prefill_cache.layers[i]
                    layers[i] = copy.deepcopy(src) if src is not None else DynamicLayer()
                cache = Cache(layers=layers)
            convert_cache(cache, adapter, sals, projections, rope, sparse)
        return cache

    @contextlib.contextmanager
    def attach(model: nn.Module) -> Iterator[nn.Module]:
        with contextlib.ExitStack() as stack:
            if attn:
                stack.enter_context(sparse_attention(model, *attn))
            elif kv is not None:
                stack.enter_context(kv_cache(model, kv))
            yield model

    desc = "; ".join(c.to_json() for c in ([kv] if kv else []) + attn)
    return RuntimeMethod(label, attach=attach, make_cache=make_cache, shares_prefill=prefill_cfg is None,
                         description=("hybrid cache: quantized KV on SALS's dense layers; " if kv and sals else "")
                         + desc)


def cache_bytes(cache: Any) -> int:
    """Bytes a cache holds for its tokens, per layer by the layer's own count where it has one."""
    total = 0
    for layer in cache.layers:
        nbytes = getattr(layer, "nbytes", None)
        if callable(nbytes):
            total += int(nbytes())
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total
