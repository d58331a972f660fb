"""Scoped attention overrides through transformers' ``AttentionInterface``.

Every runtime attention method (SALS decode, block-sparse prefill, baselines) attaches here, so they
compose: :func:`attention_override` installs one named attention function, ``"compactlm"``, and a
per-layer handler on each attention module; on exit it restores the model's previous implementation
and removes the handlers, even on error. Nothing is registered at import time.

A handler has the signature of a transformers attention function plus ``fallback``::

    handler(module, query, key, value, attention_mask, scaling, fallback, **kwargs) -> (out, weights)

with ``query`` (B, H, Tq, D), ``key``/``value`` (B, H_kv, Tk, D) as returned by the cache, and
``out`` (B, Tq, H, D). ``fallback`` is the model's original attention function (usually SDPA): a
handler calls it for the cases it does not change (e.g. decode-only methods during prefill).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..models.adapter import get_adapter

ATTN_NAME = "compactlm"
_HANDLER_ATTR = "_compactlm_attention_handler"
_FALLBACK_ATTR = "_compactlm_attention_fallback"

Handler = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _dispatch(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    fallback = getattr(module, _FALLBACK_ATTR)
    handler = getattr(module, _HANDLER_ATTR, None)
    if handler is None:
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return handler(module, query, key, value, attention_mask, scaling, fallback, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _dispatch)
    # Same mask format as SDPA: boolean, or None for plain causal attention (lets kernels skip masking).
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _additive_mask(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA's mask format (bool, or None = causal with the queries at the end) as eager's additive float mask."""
    if attention_mask is None:
        q_len, kv_len = query.shape[-2], key.shape[-2]
        pos = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        attention_mask = (torch.arange(kv_len, device=query.device)[None, :] <= pos)[None, None]
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return attention_mask


def _fallback_for(module: nn.Module, impl: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in ("eager", None) or impl not in ALL_ATTENTION_FUNCTIONS:
        import sys

        eager = sys.modules[type(module).__module__].eager_attention_forward

        # The override builds SDPA-format masks (see _register); eager attention adds its mask to the
        # scores, so it needs the additive form — a bool mask would add 0/1 and None would drop causality.
        def eager_with_sdpa_mask(module, query, key, value, attention_mask, **kwargs):
            return eager(module, query, key, value, _additive_mask(query, key, attention_mask), **kwargs)

        return eager_with_sdpa_mask
    return ALL_ATTENTION_FUNCTIONS[impl]


@contextlib.contextmanager
def attention_override(model: nn.Module, handlers: Mapping[int, Handler]) -> Iterator[nn.Module]:
    """Route attention of layer ``i`` through ``handlers[i]`` inside the ``with`` block.

    Layers without a handler keep the model's original attention. Nesting is refused: compose methods
    into one handler per layer instead (what :func:`compactlm.sparse_attention` does).
    """
    adapter = get_adapter(model)
    config = model.config
    previous = config._attn_implementation
    if previous == ATTN_NAME:
        raise RuntimeError("compactlm attention is already active on this model; compose configs in one call instead")
    for i in handlers:
        if not 0 <= i < adapter.num_layers:
            raise IndexError(f"layer {i} out of range for a {adapter.num_layers}-layer model")
    _register()
    modules = [adapter.attention(i) for i in range(adapter.num_layers)]
    try:
        for i, module in enumerate(modules):
            setattr(module, _FALLBACK_ATTR, _fallback_for(module, previous))
            if i in handlers:
                setattr(module, _HANDLER_ATTR, handlers[i])
        config._attn_implementation = ATTN_NAME
        yield model
    finally:
        config._attn_implementation = previous
        for module in modules:
            for attr in (_HANDLER_ATTR, _FALLBACK_ATTR):
                if hasattr(module, attr):
                    delattr(module, attr)


# --- composing runtime methods --------------------------------------------------------------------------

PhaseBuilder = Callable[[nn.Module, Any], "PhaseHandlers"]
RUNTIME_BUILDERS: dict[type, PhaseBuilder] = {}


class PhaseHandlers:
    """What one runtime attention config installs: per-layer handlers for prefill and/or decode.

    ``prefill`` handlers run when the query has more than one token, ``decode`` handlers when it has
    one. ``close`` (optional) releases per-run state when the scope ends.
    """

    def __init__(self, prefill: Mapping[int, Handler] | None = None, decode: Mapping[int, Handler] | None = None,
                 close: Callable[[], None] | None = None, state: Any = None):
        self.prefill = dict(prefill or {})
        self.decode = dict(decode or {})
        self.close = close
        self.state = state


def register_runtime(config_type: type) -> Callable[[PhaseBuilder], PhaseBuilder]:
    """Register ``builder(model, config) -> PhaseHandlers`` for a runtime attention config type."""

    def decorator(fn: PhaseBuilder) -> PhaseBuilder:
        RUNTIME_BUILDERS[config_type] = fn
        return fn

    return decorator


def _by_phase(prefill: Handler | None, decode: Handler | None) -> Handler:
    def handler(module, query, key, value, attention_mask, scaling, fallback, **kwargs):
        chosen = decode if query.shape[-2] == 1 else prefill
        if chosen is None:
            return fallback(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return chosen(module, query, key, value, attention_mask, scaling, fallback, **kwargs)

    return handler


@contextlib.contextmanager
def sparse_attention(model: nn.Module, *configs: Any) -> Iterator[list[PhaseHandlers]]:
    """Run ``model`` with runtime attention configs (e.g. a prefill config and a decode config) in scope.

    At most one config may claim each (layer, phase); the scope yields the built :class:`PhaseHandlers`
    (their ``state`` carries per-run objects such as a method's cache).
    """
    built: list[PhaseHandlers] = []
    prefill: dict[int, Handler] = {}
    decode: dict[int, Handler] = {}
    try:
        for cfg in configs:
            builder = RUNTIME_BUILDERS.get(type(cfg))
            if builder is None:
                known = ", ".join(t.__name__ for t in RUNTIME_BUILDERS) or "none registered"
                raise TypeError(f"{type(cfg).__name__} is not a runtime attention config (known: {known})")
            phases = builder(model, cfg)
            built.append(phases)
            for table, new, phase in ((prefill, phases.prefill, "prefill"), (decode, phases.decode, "decode")):
                clash = set(table) & set(new)
                if clash:
                    from ..errors import ConfigError

                    raise ConfigError(f"two attention configs both handle the {phase} phase of layers "
                                      f"{sorted(clash)}; give each phase to one config")
                table.update(new)
        layers = set(prefill) | set(decode)
        handlers = {i: _by_phase(prefill.get(i), decode.get(i)) for i in layers}
        with attention_override(model, handlers):
            yield built
    finally:
        for phases in built:
            if phases.close is not None:
                phases.close()
