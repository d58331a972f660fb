"""Decode-time baselines beside SALS, in the same framework: StreamingLLM, Quest and oracle top-k.

All three read the full-precision keys the model's ``DynamicCache`` returns and attend exactly over the
chosen slots (:func:`~compactlm.kernels.sparse_decode.sparse_gather_decode`). Budgets match SALS: ``keep``
tokens by score (a fraction of the context or a count) plus ``sink`` first and ``recent`` last tokens, so
``SALSConfig(keep=1/8, sink=16, recent=64)`` and ``QuestConfig(keep=1/8, sink=16, recent=64)`` read as many
tokens (Quest rounds up to whole pages).

- :class:`StreamingConfig`: StreamingLLM (Xiao et al., arXiv 2309.17453, §3.2): sinks + a recent window of
  ``keep + recent`` tokens, no scoring.
- :class:`QuestConfig`: Quest (Tang et al., arXiv 2406.10774, §3): per-page channel min/max of the post-RoPE
  keys bound q·k from above; the best ``ceil(keep/page)`` pages are read. Deviation: a GQA group shares one
  page choice (bounds pooled by max over its query heads). Bounds of complete pages are computed once per
  cache and kept; only the newest partial page is recomputed per step.
- :class:`OracleConfig`: the true q·k top-k (scores from every full key): the upper bound of token selection.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ConfigError
from ..evaluation.methods import FULL, RuntimeMethod, register_method
from ..kernels.sparse_decode import DecodeBuffers, sparse_gather_decode
from .decode_common import CacheCapture, DecodeBudget, padding_valid, resolve_count
from .runtime import PhaseHandlers, register_runtime, sparse_attention
from .selection import NEG, blocks_to_tokens, page_minmax, pool_heads, quest_bounds, streaming_tokens, topk_tokens


@dataclasses.dataclass(frozen=True)
class StreamingConfig(DecodeBudget):
    """StreamingLLM at the same budget: ``sink`` first tokens + the last ``keep + recent`` tokens."""


@dataclasses.dataclass(frozen=True)
class QuestConfig(DecodeBudget):
    """Quest page selection by min/max bounds; ``page`` tokens per page."""

    page: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.page, int) or self.page < 1:
            raise ConfigError(f"QuestConfig.page must be an int ≥ 1 (tokens per page), got {self.page!r}")


@dataclasses.dataclass(frozen=True)
class OracleConfig(DecodeBudget):
    """Oracle top-k over the true q·k scores, pooled over a GQA group by ``pool``."""

    pool: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in ("max", "mean", "softmax"):
            raise ConfigError(f"OracleConfig.pool={self.pool!r}; use 'max', 'mean' or 'softmax'")


class _QuestPages:
    """Page bounds of complete pages for one layer of one cache (recomputed when the cache changes)."""

    def __init__(self) -> None:
        self.owner: int | None = None
        self.pages = 0
        self.kmin: torch.Tensor | None = None
        self.kmax: torch.Tensor | None = None

    def bounds(self, owner: int, keys: torch.Tensor, page: int, valid: torch.Tensor | None):
        length = keys.shape[2]
        full = length // page
        if owner != self.owner or full < self.pages or valid is not None:
            self.owner, self.pages, self.kmin, self.kmax = owner, 0, None, None
        if full > self.pages:
            lo, hi = page_minmax(keys[:, :, self.pages * page: full * page], page,
                                 None if valid is None else valid[:, self.pages * page: full * page])
            self.kmin = lo if self.kmin is None else torch.cat([self.kmin, lo], 2)
            self.kmax = hi if self.kmax is None else torch.cat([self.kmax, hi], 2)
            self.pages = full
        if full * page < length:
            lo, hi = page_minmax(keys[:, :, full * page:], page, None if valid is None else valid[:, full * page:])
            if self.kmin is None:
                return lo, hi
            return torch.cat([self.kmin, lo], 2), torch.cat([self.kmax, hi], 2)
        return self.kmin, self.kmax


def _select(cfg: Any, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, scaling: float,
            pages: _QuestPages | None, owner: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chosen slots (B, H_kv, n) and their in-range mask (None = all in range)."""
    b, h, _, d = query.shape
    hkv, length = keys.shape[1], keys.shape[2]
    k = resolve_count(cfg.keep, length, "keep")
    positions = None if valid is None else valid.long().cumsum(-1) - 1
    if isinstance(cfg, StreamingConfig):
        return streaming_tokens(length, cfg.sink, k + cfg.recent, b, hkv, positions, valid, keys.device), None
    q = query.view(b, hkv, h // hkv, d)
    if isinstance(cfg, OracleConfig):
        scores = torch.matmul(q, keys.transpose(-1, -2)).float()  # (B, H_kv, G, L): the true logits
        return topk_tokens(pool_heads(scores, cfg.pool, scaling), k, cfg.sink, cfg.recent, positions, valid), None
    kmin, kmax = pages.bounds(owner, keys, cfg.page, valid)
    bound = quest_bounds(q.float(), kmin, kmax).amax(2)  # (B, H_kv, P)
    bound = torch.nan_to_num(bound, nan=NEG, posinf=NEG)  # pages that are all padding
    npages = bound.shape[-1]
    slots = torch.arange(length, device=keys.device)
    forced = (slots >= length - cfg.recent)[None].expand(b, -1)
    forced = forced | ((positions < cfg.sink) & valid) if valid is not None else forced | (slots < cfg.sink)[None]
    fpad = torch.nn.functional.pad(forced, (0, npages * cfg.page - length), value=False)
    fpage = fpad.view(b, npages, cfg.page).any(-1)
    bound = bound.masked_fill(fpage[:, None], float("inf"))
    m = min(npages, -(-k // cfg.page) + int(fpage.sum(-1).max()))
    chosen = bound.topk(m, dim=-1, sorted=False).indices
    return blocks_to_tokens(chosen, cfg.page, length)


def _handler(cfg: Any, capture: CacheCapture, i: int):
    pages = _QuestPages() if isinstance(cfg, QuestConfig) else None
    buffers = DecodeBuffers()

    def decode(module, query, key, value, attention_mask, scaling, fallback, **kwargs):
        valid = padding_valid(attention_mask, key.shape[2])
        owner = id(capture.layer(i))
        idx, ok = _select(cfg, query, key, valid, scaling, pages, owner)
        return sparse_gather_decode(query, key, value, idx, scaling, valid, buffers, ok), None

    return decode


def _build(model: torch.nn.Module, cfg: Any) -> PhaseHandlers:
    from ..models import get_adapter

    adapter = get_adapter(model)
    capture = CacheCapture()
    hook = adapter.decoder.register_forward_pre_hook(capture, with_kwargs=True)
    handlers = {i: _handler(cfg, capture, i) for i in cfg.sparse_layers(adapter.num_layers)}
    return PhaseHandlers(decode=handlers, close=hook.remove, state=capture)


for _cfg_type in (StreamingConfig, QuestConfig, OracleConfig):
    register_runtime(_cfg_type)(_build)


def baseline_method(cfg: Any, name: str) -> RuntimeMethod:
    return RuntimeMethod(name, attach=lambda m: sparse_attention(m, cfg), make_cache=FULL.make_cache,
                         shares_prefill=True, description=f"{name}: {cfg.to_json()}")


def _builder(cls: type, name: str):
    def build(model: torch.nn.Module, options: dict[str, Any]) -> RuntimeMethod:
        from .sals import config_from_options

        return baseline_method(config_from_options(cls, options), name)

    return build


register_method("attn:streaming")(_builder(StreamingConfig, "streaming"))
register_method("attn:quest")(_builder(QuestConfig, "quest"))
register_method("attn:oracle")(_builder(OracleConfig, "oracle"))
