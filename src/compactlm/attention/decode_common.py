"""Plumbing shared by the decode-time sparse attention methods (SALS and the baselines).

- :class:`CacheCapture`: a forward pre-hook on the decoder that sees the cache of every call, converts its
  sparse layers in place (so ``model.generate`` works without passing a special cache) and lets the
  per-layer handlers find their cache layer;
- :class:`RopeTable`: cos/sin rows by position, built once from the model's own rotary module;
- :func:`decode_inputs`: the query's cos/sin and the padding mask of one decode call;
- :class:`DecodeBudget`: the budget fields (keep, sink, recent, dense layers) their configs share, checked by
  :func:`validate_budget`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..config import BaseConfig
from ..errors import ConfigError


def resolve_count(value: float | int, total: int, name: str) -> int:
    """A fraction (float ≤ 1) of ``total``, rounded up, or an int count."""
    if isinstance(value, float):
        return max(1, min(total, math.ceil(value * total)))
    if value < 1:
        raise ConfigError(f"{name} must be ≥ 1 as a count, got {value}")
    return int(value)


def validate_budget(cfg: Any, fractions: tuple[str, ...] = ("keep",)) -> None:
    """Check the budget fields every decode method shares, naming the config class and field in each error.

    ``fractions`` name the fields that take a fraction in (0, 1] or a positive int count (``keep``; SALS adds
    ``rank`` and ``score_dims``); ``sink``, ``dense_first`` and ``dense_last`` are ints ≥ 0, ``recent`` an int
    ≥ 1 (it always holds the new token), ``dense_layers`` None or layer indices ≥ 0, stored as a tuple so that
    a config read back from JSON (a list) compares equal to the one written. Call it from ``__post_init__``.
    """
    cls = type(cfg).__name__
    for name in fractions:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise ConfigError(f"{cls}.{name} must be a fraction in (0, 1] or a positive int count, got {v!r}")
        if isinstance(v, float) and v > 1:
            raise ConfigError(f"{cls}.{name}={v} is a float above 1; give a fraction in (0, 1] or an int count")
    for name in ("sink", "dense_first", "dense_last"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"{cls}.{name} must be an int ≥ 0, got {v!r}")
    if not isinstance(cfg.recent, int) or cfg.recent < 1:
        raise ConfigError(f"{cls}.recent must be an int ≥ 1 (the new token itself), got {cfg.recent!r}")
    if cfg.dense_layers is not None:
        if not all(isinstance(i, int) and i >= 0 for i in cfg.dense_layers):
            raise ConfigError(f"{cls}.dense_layers must be layer indices ≥ 0 (or None), got {cfg.dense_layers!r}")
        object.__setattr__(cfg, "dense_layers", tuple(cfg.dense_layers))


@dataclasses.dataclass(frozen=True)
class DecodeBudget(BaseConfig):
    """The token budget every decode-time method shares, so that equal fields read equal numbers of tokens.

    ``keep`` tokens chosen by the method's score (a fraction of the context or a count) plus the ``sink``
    first and ``recent`` last tokens; the first ``dense_first`` and last ``dense_last`` layers (or an explicit
    ``dense_layers`` list) stay dense. Subclasses add their own fields and may name more fraction-or-count
    fields in ``FRACTIONS``.
    """

    FRACTIONS: ClassVar[tuple[str, ...]] = ("keep",)

    keep: float | int = 0.125
    sink: int = 16
    recent: int = 64
    dense_first: int = 2
    dense_last: int = 1
    dense_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        validate_budget(self, self.FRACTIONS)

    def sparse_layers(self, num_layers: int) -> list[int]:
        return layer_ranges(num_layers, self.dense_first, self.dense_last, self.dense_layers)


def layer_ranges(num_layers: int, dense_first: int, dense_last: int, dense_layers: tuple[int, ...] | None) -> list[int]:
    """The sparse layers: all but the first N and last M, or all but an explicit dense list."""
    if dense_layers is not None:
        bad = [i for i in dense_layers if i >= num_layers]
        if bad:
            raise ConfigError(f"dense_layers {bad} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
        dense = set(dense_layers)
    else:
        dense = set(range(min(dense_first, num_layers))) | set(range(max(0, num_layers - dense_last), num_layers))
    return [i for i in range(num_layers) if i not in dense]


class RopeTable:
    """cos/sin (P, D) rows by position for each layer type, from the adapter's rotary (grown by doubling)."""

    def __init__(self, adapter: Any):
        self.adapter = adapter
        self._tables: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, size: int, layer: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.adapter.layer_type(layer) if self.adapter.family.rotary_takes_layer_type else "", dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < size:
            n = max(size, 2 * cached[0].shape[0] if cached else 4096)
            device = self.adapter.embed_tokens.weight.device
            x = torch.zeros(1, dtype=torch.float32, device=device)
            cos, sin = self.adapter.rotary(x, torch.arange(n, device=device)[None], layer)
            cached = (cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous())
            self._tables[key] = cached
        return cached

    def at(self, positions: torch.Tensor, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (*positions.shape, D) at integer ``positions``."""
        cos, sin = self.tables(int(positions.max()) + 1, layer, dtype)
        flat = positions.reshape(-1)
        shape = (*positions.shape, cos.shape[-1])
        return cos.index_select(0, flat).view(shape), sin.index_select(0, flat).view(shape)


class CacheCapture:
    """Decoder forward pre-hook: remembers the call's cache and converts its layers with ``convert``."""

    def __init__(self, convert: Callable[[Any], None] | None = None):
        self.convert = convert
        self.cache: Any = None

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.cache = cache
        if cache is not None and self.convert is not None:
            self.convert(cache)

    def layer(self, i: int) -> Any:
        if self.cache is None or not hasattr(self.cache, "layers") or i >= len(self.cache.layers):
            return None
        return self.cache.layers[i]


def padding_valid(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """(B, L) bool of real tokens from a decode step's SDPA-format mask, or None when nothing is masked."""
    if attention_mask is None:
        return None
    m = attention_mask[:, 0, -1, :length]
    valid = m if m.dtype == torch.bool else m > float("-inf")
    return None if bool(valid.all()) else valid


def decode_inputs(rope: RopeTable, query: torch.Tensor, kwargs: dict[str, Any], attention_mask: torch.Tensor | None,
                  length: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q_cos, q_sin) (B, 1, D) at the query's position, and the padding mask (B, L) or None."""
    b = query.shape[0]
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.full((1, 1), length - 1, dtype=torch.long, device=query.device)
    pos = pos[:, -1:].expand(b, 1)
    cos, sin = rope.at(pos, layer, query.dtype)
    return cos, sin, padding_valid(attention_mask, length)
