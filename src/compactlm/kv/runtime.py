"""``compactlm.kv_cache(model, KVQuant(...))``: a scoped quantized KV cache, and the ``kv:intN`` methods.

Inside the scope, every forward call of ``model`` that would start a new full-precision cache (as
``model.generate`` does) gets a :class:`QuantizedKVCache` instead, and a full-precision cache passed
in is quantized first. With ``fused_attention`` the decode steps attend over the quantized store
chunk by chunk (:func:`quantized_decode_attention`) through the named ``compactlm`` attention
function; everything is removed on exit. The session object the scope yields holds the last cache
used (``session.cache``), for inspecting its bytes.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator

from torch import nn
from transformers.cache_utils import Cache

from ..attention.runtime import attention_override
from ..config import config_from_options
from ..errors import ConfigError
from ..evaluation.methods import RuntimeMethod, register_method
from ..models.adapter import get_adapter
from .attention import quantized_decode_attention
from .cache import QuantizedKVCache
from .config import KVQuant

_CACHE_KEYS = ("cache", "past_key_values")


class KVSession:
    """Per-scope state of :func:`kv_cache` (the config stays immutable; this holds the run's cache)."""

    def __init__(self, model: nn.Module, config: KVQuant):
        self.model = model
        self.config = config
        self.cache: QuantizedKVCache | None = None
        self._seen: weakref.WeakSet = weakref.WeakSet()
        # transformers ≥ 5.2x names the forward's cache argument `cache` (`past_key_values` before)
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def pre_hook(self, module, args, kwargs):
        if kwargs.get("use_cache") is False:
            return args, kwargs
        key = next((k for k in _CACHE_KEYS if k in kwargs), self.cache_kwarg)
        cache = kwargs.pop(key, None)
        if not isinstance(cache, QuantizedKVCache):
            if cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0):
                cache = QuantizedKVCache(self.model, self.config)
            elif isinstance(cache, Cache):
                cache = QuantizedKVCache.from_cache(self.model, self.config, cache)
            else:
                raise ConfigError(f"kv_cache got a {type(cache).__name__} as the cache; pass a transformers Cache")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            cache.valid_mask = mask.bool()  # (B, T_total): keeps padding out of the key groups' statistics
        if self.config.fused_attention:
            for layer in cache.layers:
                layer.fuse_decode = True
        self._seen.add(cache)
        self.cache = cache
        kwargs[key] = cache
        return args, kwargs

    def handler(self, module, query, key, value, attention_mask, scaling, fallback, **kwargs):
        cache = self.cache
        layer = cache.layers[module.layer_idx] if cache is not None else None
        if layer is not None and query.shape[-2] == 1 and layer.fused_pending:
            return quantized_decode_attention(query, layer, scaling, attention_mask), None
        return fallback(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    def close(self) -> None:
        for cache in list(self._seen):  # a cache used after the scope must return real keys again
            for layer in cache.layers:
                layer.fuse_decode = False
                layer.fused_pending = False


@contextlib.contextmanager
def kv_cache(model: nn.Module, config: KVQuant | None = None) -> Iterator[KVSession]:
    """Run ``model`` with a quantized KV cache inside the ``with`` block (``model.generate`` included)."""
    config = config or KVQuant()
    if not isinstance(config, KVQuant):
        raise ConfigError(f"kv_cache takes a KVQuant config, got {type(config).__name__}")
    adapter = get_adapter(model)
    config.check_model(adapter.head_dim)
    session = KVSession(model, config)
    hook = model.register_forward_pre_hook(session.pre_hook, with_kwargs=True)
    try:
        if config.fused_attention:
            with attention_override(model, {i: session.handler for i in range(adapter.num_layers)}):
                yield session
        else:
            yield session
    finally:
        hook.remove()
        session.close()


# ``--kv int2-mixed``: the recommended 2-bit cache — per-channel key bits (0/2/4 averaging 2, by query-weighted
# range), 16 full-precision sinks, 1-byte metadata (values fitted by the x²-weighted error): 0.159x bf16 bytes at
# 8K; RULER-syn-q -1.4 vs full at 4K and +0.4 at 2K (+0.2 at 2K with the protocol's 20 samples) where uniform int2
# loses 27 and 24 points (docs/kv-cache.md, "Per-channel key bits" and "Where int2-mixed loses at 4K").
PRESETS: dict[str, dict] = {"int2-mixed": {"sinks": 16, "meta_dtype": "int4", "key_allocation": "importance"}}


def _builder(bits: int, name: str | None = None):
    name = name or f"int{bits}"

    def build(model: nn.Module, options: dict) -> RuntimeMethod:
        if "bits" in options:
            raise ConfigError(f"kv:{name} fixes bits={bits}; pick the kv:intN method of the width you want")
        preset = PRESETS.get(name, {})
        config = config_from_options(KVQuant, {"bits": bits, **preset, **options}, what=f"kv:{name}")
        config.check_model(get_adapter(model).head_dim)

        def make_cache(model: nn.Module, prefill_cache):
            if prefill_cache is None:
                return QuantizedKVCache(model, config)
            return QuantizedKVCache.from_cache(model, config, prefill_cache)

        return RuntimeMethod(f"kv-{config.label}", attach=lambda m: kv_cache(m, config), make_cache=make_cache,
                             shares_prefill=True,
                             description=f"KIVI-style {config.label} KV cache ({config.to_json()})")

    return build


for _bits in (2, 4, 8):
    register_method(f"kv:int{_bits}")(_builder(_bits))
register_method("kv:int2-mixed")(_builder(2, "int2-mixed"))


from . import hf_baseline  # noqa: E402,F401  (registers kv:hf-hqq-int2/int4, transformers' own quantized cache)
