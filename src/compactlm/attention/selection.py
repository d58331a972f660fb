"""Which cached tokens a decode step attends to: token and block top-k, Quest bounds, StreamingLLM, oracle.

Pure tensor math shared by SALS (:mod:`compactlm.attention.sals`) and the decode baselines
(:mod:`compactlm.attention.decode_baselines`). Conventions, for one decode step over a cache of ``L`` slots:

- ``scores`` are per KV head, already pooled over the query heads of its group: (B, H_kv, L);
- ``valid`` (B, L) bool marks real tokens (False for left padding); ``None`` means all are real;
- ``positions`` (B, L) are the RoPE positions of the slots (sinks are the first ``sink`` *positions*,
  so a left-padded row still keeps its first real tokens);
- every selector returns slot indices (B, H_kv, n) with a fixed ``n`` per call; slots that are not
  valid may appear only when a row has fewer than ``n`` valid tokens, and callers mask them out.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

NEG = float("-inf")


def budget(keep: float | int, length: int) -> int:
    """Tokens chosen by score for a cache of ``length``: a fraction (float < 1) or a count (int)."""
    if isinstance(keep, float) and keep < 1.0:
        return max(1, math.ceil(keep * length))
    return int(keep)


def pool_heads(scores: torch.Tensor, how: str = "max", scaling: float = 1.0) -> torch.Tensor:
    """Pool (B, H_kv, G, L) per-query-head scores to (B, H_kv, L): one selection per KV head group.

    ``max``: the largest logit over the group's heads; ``mean``: their mean logit; ``softmax``: the sum of
    each head's attention probabilities (a token matters if it matters to any head, weighted by mass).
    """
    if how == "max":
        return scores.amax(dim=2)
    if how == "mean":
        return scores.mean(dim=2)
    if how == "softmax":
        return torch.softmax(scores.float() * scaling, dim=-1).sum(dim=2)
    raise ConfigError(f"pool={how!r} is not a head pooling; use 'max', 'mean' or 'softmax'")


def forced_mask(length: int, sink: int, recent: int, positions: torch.Tensor | None,
                valid: torch.Tensor | None) -> torch.Tensor | None:
    """(B or 1, L) bool: sink tokens (first ``sink`` positions) and the ``recent`` last slots, always kept."""
    if sink == 0 and recent == 0:
        return None
    device = positions.device if positions is not None else None
    slots = torch.arange(length, device=device)
    forced = (slots >= length - recent)[None]  # left padding keeps the newest tokens in the last slots
    if sink:
        if positions is None or valid is None:
            forced = forced | (slots < sink)[None]
        else:
            forced = forced | ((positions < sink) & valid)
    return forced


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys in the float order of ``scores`` (equal floats get equal keys, except −0.0 just below +0.0; NaN
    above +inf, as topk treats it).

    Why: ``topk`` over int32 ran ~1.5x faster than over fp32 or bf16 here (8 rows × 32K, k = 1/8), and the
    top-k is the largest single cost of a decode-time selection after the scoring GEMM. The map flips the
    magnitude bits of negative floats so that more negative sorts lower.
    """
    bits = scores.float().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def topk_tokens(scores: torch.Tensor, k: int, sink: int = 0, recent: int = 0,
                positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Slots (B, H_kv, n) of the ``k`` best-scoring tokens plus the sink and recent ones; n = min(L, k+sink+recent)."""
    length = scores.shape[-1]
    n = min(length, k + sink + recent)
    forced = forced_mask(length, sink, recent, positions, valid)
    s = scores
    if forced is not None or valid is not None:
        s = scores.clone()
        if valid is not None:
            s.masked_fill_(~valid[:, None, :], NEG)
        if forced is not None:
            s.masked_fill_(forced[:, None, :], float("inf"))
    return sortable_keys(s).topk(n, dim=-1, sorted=False).indices


def block_scores(scores: torch.Tensor, block: int, reduce: str = "max") -> torch.Tensor:
    """(B, H_kv, L) token scores -> (B, H_kv, ceil(L/block)) block scores (max, mean or logsumexp).

    The last, partial block is padded with -inf (so max and logsumexp ignore the padding; mean averages
    only the real tokens).
    """
    b, h, length = scores.shape
    nblocks = -(-length // block)
    pad = nblocks * block - length
    s = torch.nn.functional.pad(scores.float(), (0, pad), value=NEG).view(b, h, nblocks, block)
    if reduce == "max":
        return s.amax(-1)
    if reduce == "logsumexp":
        return torch.logsumexp(s, -1)
    if reduce == "mean":
        finite = torch.isfinite(s)
        return torch.where(finite, s, 0.0).sum(-1) / finite.sum(-1).clamp(min=1)
    raise ConfigError(f"block_reduce={reduce!r} is not a block score; use 'max', 'mean' or 'logsumexp'")


def blocks_to_tokens(block_idx: torch.Tensor, block: int, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expand chosen blocks (B, H_kv, m) to token slots (B, H_kv, m·block) and an in-range mask.

    Slots past the end of a partial last block are clamped to L-1 and marked False in the mask (else the
    last token would count twice in the softmax); the mask is None when every block is whole.
    """
    tokens = (block_idx[..., None] * block + torch.arange(block, device=block_idx.device)).flatten(-2)
    if length % block == 0:
        return tokens, None
    ok = tokens < length
    return tokens.clamp_(max=length - 1), ok


def topk_blocks(scores: torch.Tensor, k: int, block: int, reduce: str = "max", sink: int = 0, recent: int = 0,
                positions: torch.Tensor | None = None, valid: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact top-k over contiguous blocks of ``block`` tokens: ceil(k/block) blocks plus sink and recent tokens.

    Returns slots and their in-range mask (see :func:`blocks_to_tokens`).

    Forced tokens' blocks get +inf (so they are chosen first and cost no extra budget beyond their blocks).
    """
    length = scores.shape[-1]
    s = scores if valid is None else scores.masked_fill(~valid[:, None, :], NEG)
    forced = forced_mask(length, sink, recent, positions, valid)
    bs = block_scores(s, block, reduce)
    nblocks = bs.shape[-1]
    if forced is not None:
        fpad = torch.nn.functional.pad(forced, (0, nblocks * block - length), value=False)
        fblock = fpad.view(fpad.shape[0], nblocks, block).any(-1)  # (B, nblocks)
        bs = bs.masked_fill(fblock[:, None, :], float("inf"))
        nforced = int(fblock.sum(-1).max())
    else:
        nforced = 0
    m = min(nblocks, -(-k // block) + nforced)
    chosen = bs.topk(m, dim=-1, sorted=False).indices
    return blocks_to_tokens(chosen, block, length)


def quest_bounds(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q·k over each page (arXiv 2406.10774, §3.2): Σ_d max(q_d·min_d, q_d·max_d).

    query (B, H_kv, G, D); kmin/kmax (B, H_kv, P, D) per-page channel minima and maxima -> (B, H_kv, G, P).
    Computed as two GEMMs, max(q_d·m_d, q_d·M_d) = max(q_d, 0)·M_d + min(q_d, 0)·m_d, instead of the
    (G, P, D) elementwise maximum: the same bound without its (B, H_kv, G, P, D) temporaries.
    """
    return (torch.matmul(query.clamp(min=0), kmax.transpose(-1, -2))
            + torch.matmul(query.clamp(max=0), kmin.transpose(-1, -2)))


def page_minmax(keys: torch.Tensor, page: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page channel min and max of keys (B, H_kv, L, D) -> two (B, H_kv, ceil(L/page), D) tensors.

    Padding and the tail of the last page are excluded (set to +inf for min and -inf for max).
    """
    b, h, length, d = keys.shape
    pages = -(-length // page)
    k = keys.float()
    lo, hi = k, k
    if valid is not None:
        lo = k.masked_fill(~valid[:, None, :, None], float("inf"))
        hi = k.masked_fill(~valid[:, None, :, None], NEG)
    pad = pages * page - length
    lo = torch.nn.functional.pad(lo, (0, 0, 0, pad), value=float("inf")).view(b, h, pages, page, d).amin(3)
    hi = torch.nn.functional.pad(hi, (0, 0, 0, pad), value=NEG).view(b, h, pages, page, d).amax(3)
    return lo, hi


def streaming_tokens(length: int, sink: int, window: int, batch: int, kv_heads: int,
                     positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """StreamingLLM (arXiv 2309.17453, §3.2): the first ``sink`` tokens and the last ``window`` slots."""
    n = min(length, sink + window)
    if valid is None or positions is None:
        if length <= sink + window:
            slots = torch.arange(length, device=device)
        else:
            slots = torch.cat([torch.arange(sink, device=device), torch.arange(length - window, length, device=device)])
        return slots.view(1, 1, -1).expand(batch, kv_heads, -1)
    # Left padding: sinks are the first real positions, found by scoring slots and taking a top-n.
    slots = torch.arange(length, device=positions.device, dtype=torch.float32)
    score = torch.where(valid, slots, NEG)
    score = torch.where(valid & (positions < sink), float("inf"), score)
    return score.topk(n, dim=-1, sorted=False).indices[:, None, :].expand(batch, kv_heads, -1)
