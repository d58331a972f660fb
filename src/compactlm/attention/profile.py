"""Per-layer fidelity of SALS selection: overlap of latent top-k with the true top-k, and the dense layers it implies.

Based on arXiv 2510.24273, §3 (Fig. 2): latent-space top-k overlaps the true top-k well in most layers
but not in the first ones, which is why the paper keeps layers 0, 1 (and the last) dense. This profiler
measures it for a given model, rank and budget on calibration prompts: during a dense prefill it takes the
last ``queries`` positions of each prompt as decode-like queries and compares, per KV head, the top-k of
the true post-RoPE logits (max-pooled over the group's query heads) with the top-k of the latent scores.
It reports the set overlap and the share of true attention mass the latent choice captures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.sparse_decode import unrope
from .decode_common import RopeTable, resolve_count
from .runtime import attention_override
from .sals_calib import SALSProjections


@dataclass
class LayerProfile:
    layer: int
    overlap: float  # |latent top-k ∩ true top-k| / k (no forced tokens)
    mass: float  # true attention mass (group mean) on the latent top-k, relative to the true top-k's mass
    budget_mass: dict[str, float] | None = None  # absolute mass on each method's set at equal budget


def _mass(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Attention mass of p (B, H_kv, n) on the distinct slots idx (B, H_kv, m)."""
    hit = torch.zeros_like(p, dtype=torch.bool).scatter_(2, idx, True)
    return (p * hit).sum(-1).mean()


def _layer_stats(query, key, proj, r_star, rope: RopeTable, layer: int, keep: float | int, queries: int,
                 sink: int = 16, recent: int = 64, page: int = 16):
    from .selection import blocks_to_tokens, page_minmax, quest_bounds, streaming_tokens, topk_tokens

    b, h, t, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = rope.at(pos, layer, torch.float32)
    q_pre = unrope(query.float(), cos[:, None], sin[:, None])
    k_pre = unrope(key.float(), cos[:, None], sin[:, None])
    z = torch.einsum("bhtd,hdr->btr", k_pre, proj)[..., :r_star]  # (B, T, r*)
    overlaps, masses = [], []
    budget = {"sals": [], "oracle": [], "quest": [], "streaming": []}
    for qi in range(max(1, t - queries), t):
        n = qi + 1
        k = min(n, resolve_count(keep, n, "keep"))
        qq = query[:, :, qi].float().view(b, hkv, g, d)
        true = torch.einsum("bhgd,bhld->bhgl", qq, key[:, :, :n].float()) * d ** -0.5
        lat_q = torch.einsum("bhgd,hdr->bhgr", q_pre[:, :, qi].view(b, hkv, g, d), proj[..., :r_star])
        lat = torch.einsum("bhgr,blr->bhgl", lat_q, z[:, :n]).amax(2)
        t_idx = true.amax(2).topk(k, -1).indices
        l_idx = lat.topk(k, -1).indices
        hit = torch.zeros(b, hkv, n, dtype=torch.bool).scatter_(2, t_idx, True).gather(2, l_idx)
        overlaps.append(hit.float().mean())
        p = torch.softmax(true, -1).mean(2)  # (B, H_kv, n)
        masses.append((p.gather(2, l_idx).sum(-1) / p.gather(2, t_idx).sum(-1)).mean())
        # Equal budget (k + sink + recent tokens), as the decode methods choose them.
        budget["sals"].append(_mass(p, topk_tokens(lat, k, sink, recent)))
        budget["oracle"].append(_mass(p, topk_tokens(true.amax(2), k, sink, recent)))
        budget["streaming"].append(_mass(p, streaming_tokens(n, sink, k + recent, b, hkv)))
        lo, hi = page_minmax(key[:, :, :n].float(), page)
        bound = quest_bounds(qq, lo, hi).amax(2)
        npages = bound.shape[-1]
        forced = torch.zeros(npages, dtype=torch.bool)
        forced[: -(-sink // page)] = True
        forced[(n - recent) // page:] = True
        bound = bound.masked_fill(forced, float("inf"))
        chosen = bound.topk(min(npages, -(-k // page) + int(forced.sum())), -1).indices
        tokens, ok = blocks_to_tokens(chosen, page, n)
        budget["quest"].append(_mass(p, tokens if ok is None else torch.where(ok, tokens, n - 1)))
    stats = {m: float(torch.stack(v).mean()) for m, v in budget.items()}
    return float(torch.stack(overlaps).mean()), float(torch.stack(masses).mean()), stats


@torch.no_grad()
def profile_overlap(model: torch.nn.Module, calib: torch.Tensor, projections: SALSProjections, rank: float | int = 0.25,
                    score_dims: float | int = 0.5, keep: float | int = 0.125, queries: int = 16) -> list[LayerProfile]:
    """Per-layer :class:`LayerProfile` on ``calib`` (N, T) prompts (dense prefill, one prompt at a time)."""
    from ..models import get_adapter

    a = get_adapter(model)
    width = a.num_kv_heads * a.head_dim
    r = resolve_count(rank, width, "rank")
    r_star = min(r, resolve_count(score_dims, r, "score_dims"))
    rope = RopeTable(a)
    sums: list[list] = [[0.0, 0.0, {}] for _ in range(a.num_layers)]

    def handler_for(i: int):
        proj = projections.proj(i, r)

        def handler(module, query, key, value, attention_mask, scaling, fallback, **kwargs):
            o, m, budget = _layer_stats(query, key, proj, r_star, rope, i, keep, queries)
            sums[i][0] += o
            sums[i][1] += m
            for name, v in budget.items():
                sums[i][2][name] = sums[i][2].get(name, 0.0) + v
            return fallback(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

        return handler

    with attention_override(model, {i: handler_for(i) for i in range(a.num_layers)}):
        for row in calib:
            model(row[None].to(a.embed_tokens.weight.device), use_cache=False)
    n = calib.shape[0]
    return [LayerProfile(i, s[0] / n, s[1] / n, {k: v / n for k, v in s[2].items()}) for i, s in enumerate(sums)]


def propose_dense(profile: list[LayerProfile], threshold: float = 0.9, metric: str = "budget") -> list[int]:
    """Layers to keep dense: where SALS's choice captures less than ``threshold`` of what the oracle's does.

    ``metric="budget"``: attention mass on SALS's set / mass on the oracle's set, both at the full budget (sink,
    recent and top-k); ``"mass"`` or ``"overlap"``: the top-k-only figures of :class:`LayerProfile`.
    """
    def value(p: LayerProfile) -> float:
        if metric == "budget":
            return p.budget_mass["sals"] / max(p.budget_mass["oracle"], 1e-12)
        return getattr(p, metric)

    return [p.layer for p in profile if value(p) < threshold]
