"""Layer profiler for block-sparse prefill: which layers lose attention mass, so they can stay dense.

For every layer, run the model densely on calibration prompts and measure, per query and query head, the
share of the true softmax attention mass that falls inside the KV blocks the :class:`SparsePrefillConfig`
would choose. Layers below ``min_mass`` are proposed as ``dense_layers`` ("bad layer skip"), in the spirit
of MInference's offline per-head pattern search (arXiv 2407.02490, §3.2 "kernel-aware optimal sparse
pattern search"), reduced here to a per-layer keep-or-dense decision.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import CalibrationError, ConfigError
from ..kernels.block_prefill import BlockLayout
from ..models.adapter import get_adapter
from ..utils import progress
from .prefill_sparse import SparsePrefillConfig, select_blocks
from .runtime import attention_override


def with_dense_layers(cfg: SparsePrefillConfig, layers) -> SparsePrefillConfig:
    """``cfg`` with ``layers`` added to its dense-fallback layers (sorted, without repeats)."""
    return dataclasses.replace(cfg, dense_layers=tuple(sorted(set(cfg.dense_layers) | set(layers))))


@dataclass(frozen=True)
class LayerProfile:
    """Per-layer mean captured mass and block fraction, and the layers proposed for dense fallback."""

    mass: tuple[float, ...]
    block_fraction: tuple[float, ...]
    proposed: tuple[int, ...]
    min_mass: float

    def with_fallback(self, cfg: SparsePrefillConfig) -> SparsePrefillConfig:
        return with_dense_layers(cfg, self.proposed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def kept_key_blocks(layout: BlockLayout) -> torch.Tensor:
    """(B, H_kv, NQB, NKB) bool: the KV blocks each query block reads."""
    nkb = -(-layout.kv_len // layout.block)
    valid = (torch.arange(layout.kv_indices.shape[-1], device=layout.kv_counts.device)
             < layout.kv_counts[..., None]).int()
    counts = torch.zeros(*layout.kv_counts.shape, nkb, dtype=torch.int32, device=valid.device)
    return counts.scatter_add(-1, layout.kv_indices.long(), valid) > 0


def captured_mass(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, scale: float, rows: int = 256,
                  query_stride: int = 1) -> float:
    """Mean over batch, query heads and queries of the dense softmax mass inside the layout's blocks.

    q (B, H, Tq, D), k (B, H_kv, Tk, D); computed ``rows`` queries at a time so memory stays bounded.
    ``query_stride`` > 1 scores every ``query_stride``-th query only (a systematic sample, offset to the
    middle of each stride): the cost is O(Tq·Tk / stride), which at 8K tokens is what keeps a 30-layer
    profile within minutes on one CPU thread, while every query group and block row is still sampled.
    """
    if query_stride < 1:
        raise ConfigError(f"query_stride must be >= 1, got {query_stride}")
    bsz, heads, q_len, _ = q.shape
    rows_idx = torch.arange(min(query_stride // 2, q_len - 1), q_len, query_stride, device=q.device)
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    blocks = kept_key_blocks(layout)
    key_block = torch.arange(kv_len, device=q.device) // layout.block
    kf = k.float()[:, :, None]  # (B, Hk, 1, Tk, D)
    total = 0.0
    for r0 in range(0, rows_idx.numel(), rows):
        idx = rows_idx[r0:r0 + rows]
        qc = q[:, :, idx].float().view(bsz, kv_heads, group, idx.numel(), -1)  # (B, Hk, G, c, D)
        s = qc @ kf.transpose(-1, -2) * scale  # (B, Hk, G, c, Tk)
        pos = idx + (kv_len - q_len)
        s = s.masked_fill(torch.arange(kv_len, device=q.device)[None, :] > pos[:, None], -math.inf)
        probs = torch.softmax(s, -1)
        qb = (idx + layout.pad) // layout.block
        keep = blocks[:, :, qb][..., key_block]  # (B, Hk, c, Tk)
        total += float((probs * keep[:, :, None]).sum())
    return total / (bsz * heads * rows_idx.numel())


@torch.no_grad()
def profile_layers(model, batches: list[torch.Tensor], cfg: SparsePrefillConfig, min_mass: float = 0.9,
                   max_layers: int | None = None, query_stride: int = 1) -> LayerProfile:
    """Run ``batches`` (each (B, T) token ids) densely and score every layer's chosen blocks.

    Proposes the layers whose captured mass is below ``min_mass``, worst first, at most ``max_layers``.
    ``query_stride`` > 1 scores a systematic sample of the queries (see :func:`captured_mass`).
    """
    if not 0.0 < min_mass <= 1.0:
        raise ConfigError(f"min_mass must be in (0, 1], got {min_mass}")
    if query_stride < 1:
        raise ConfigError(f"query_stride must be >= 1 (1 = score every query), got {query_stride}")
    if not batches:
        raise CalibrationError("profile_layers needs at least one batch of calibration token ids")
    layers = get_adapter(model).num_layers
    mass_sum = [0.0] * layers
    frac_sum = [0.0] * layers
    calls = [0] * layers

    def make(i):
        def handler(module, query, key, value, attention_mask, scaling, fallback, **kwargs):
            if key.shape[2] > cfg.block_size and attention_mask is None:
                layout = select_blocks(query, key, cfg, scaling)
                mass_sum[i] += captured_mass(query, key, layout, scaling, query_stride=query_stride)
                frac_sum[i] += layout.block_fraction()
                calls[i] += 1
            return fallback(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

        return handler

    device = next(model.parameters()).device
    with attention_override(model, {i: make(i) for i in range(layers)}):
        for ids in progress(batches, desc="profile prefill layers"):
            model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1)
    if not all(calls):
        raise CalibrationError("no layer saw a plain causal prompt longer than one block; use longer prompts "
                               "without padding")
    mass = tuple(m / c for m, c in zip(mass_sum, calls, strict=True))
    frac = tuple(f / c for f, c in zip(frac_sum, calls, strict=True))
    bad = sorted((i for i in range(layers) if mass[i] < min_mass), key=lambda i: mass[i])
    if max_layers is not None:
        bad = bad[:max_layers]
    return LayerProfile(mass, frac, tuple(sorted(bad)), min_mass)
