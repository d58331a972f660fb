"""Fitting each quantization group's range: MSE-optimal clipping and the 1-byte (4 + 4-bit) metadata.

Min-max ranges waste levels at 2 bits: one extreme token (keys, per channel) or channel (values, per
token) stretches the step for the other 31 elements of the group. :func:`search_range` tries ranges cut
at both ends and keeps, per group, the one whose *stored* metadata reconstructs the group with the lowest
squared error (the clipping-range search of weight quantizers, e.g. GPTQ's ``mse`` grid, here on an
asymmetric 2-D grid because key channels carry offsets that a shrink towards zero would not fit).

The 1-byte metadata (``meta_dtype="int4"``) codes each group's scale in U_BITS (4) bits and its offset
in the other 4, relative to a per-row base (keys: per channel, values: per channel group) fixed when a
layer's first tokens are quantized — KVQuant (Hooper et al., arXiv 2401.18079) §3.1-3.2 observes that
pre-RoPE key ranges are a property of the channel, so a group needs only its deviation from the channel's
typical range. The stored tensors are the packed byte per group ``u << (8 − U_BITS) | z`` and the base
(B, H, 1, rows, 3) fp32 = (log2 of the median group scale, median group midpoint, half the code range):

    scale = 2^(base_log2 + (u - U_MID) / U_STEPS)       u < 2^U_BITS (1/U_STEPS-octave steps)
    low   = base_mid + scale · ((z - z_mid) · Z_STEP - qmax / 2)      z < 2^(8 - U_BITS), z_mid its middle
    x     ≈ low + scale · code

The representable (scale, offset) pairs are searched for the lowest squared error (every scale, the
2·Z_SEARCH + 1 offsets around the group's own midpoint for each), so clipping is part of the fit. The
constants were chosen by key/value reconstruction error on 2,048 tokens of PPL-decode-q window 0
(``benchmarks/kv_fit_screen.py``; Z_STEP 0.5 → 0.2 was the one change that mattered: 0.1065 → 0.1000
relative squared value error, 0.0186 → 0.0174 key error; 3 or 5 scale bits did no better).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# fraction of the min-max range cut from the low / high end (6 × 6 = 36 candidate ranges per group)
CLIP_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
U_BITS = 4  # 1-byte metadata: bits of the scale code (the offset code takes the other 8 - U_BITS)
U_STEPS = 4  # 1-byte metadata: scale codes per octave
U_MID = 11  # scale code of the base scale: codes cover 2^-2.75 .. 2^+1 of the row's median group scale
Z_STEP = 0.2  # 1-byte metadata: midpoint offsets in 0.2 scales, ±1.5 scales around the row's median midpoint
Z_SEARCH = 2  # 1-byte metadata: offsets tried on each side of the group's own midpoint

# (low, high) per group -> (stored scale, stored zero, float scale, float low) with x ≈ low + scale · code
Encode = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def group_error(g: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, qmax: int, dim: int,
                w: torch.Tensor | None) -> torch.Tensor:
    """Squared reconstruction error per group of ``g`` (grouped fp32) on the grid ``lo + s · code``."""
    su, lu = s.unsqueeze(dim), lo.unsqueeze(dim)
    e = (((g - lu) / su).round_().clamp_(0, qmax) * su + lu - g).square_()
    return (e if w is None else e * w).sum(dim)


def _keep_lower(best: list | None, best_err: torch.Tensor | None, cand, err: torch.Tensor):
    """Per group, keep whichever of ``best`` and ``cand`` (tensors alike in shape) has the lower error."""
    if best is None:
        return list(cand), err
    better = err < best_err
    return ([torch.where(better, new, old) for new, old in zip(cand, best, strict=True)],
            torch.where(better, err, best_err))


def search_range(g: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, qmax: int, dim: int, encode: Encode,
                 w: torch.Tensor | None = None):
    """Per group, the clipped range of :data:`CLIP_GRID` with the lowest error after ``encode``.

    ``w`` (grouped, bool or float) weights the error (padding excluded). Returns ``encode``'s 4 tensors.
    """
    r = mx - mn
    best = best_err = None
    for a in CLIP_GRID:
        for b in CLIP_GRID:
            cand = encode(mn + a * r, mx - b * r)
            best, best_err = _keep_lower(best, best_err, cand, group_error(g, cand[2], cand[3], qmax, dim, w))
    return tuple(best)


def meta4_base(mn: torch.Tensor, mx: torch.Tensor, qmax: int, dim: int, empty: torch.Tensor | None) -> torch.Tensor:
    """The per-row base of the 1-byte metadata from a first batch of groups: (B, H, 1, rows, 3) fp32.

    ``mn``/``mx`` are (B, H, groups, rows) for keys (``dim=-2``) and (B, H, tokens, groups) for values;
    rows are the last dim in both. Medians over the groups of a row; empty (all-padding) groups are left out,
    and a row with none takes the median over the batch.
    """
    log_s = torch.log2(((mx - mn) / qmax).clamp_min(2.0 ** -20))
    mid = (mx + mn) / 2
    if empty is not None:
        log_s = log_s.masked_fill(empty, float("nan"))
        mid = mid.masked_fill(empty, float("nan"))
    stats = []
    for t in (log_s, mid):
        m = t.nanmedian(-2, keepdim=True).values  # (B, H, 1, rows)
        fallback = t.permute(1, 3, 0, 2).flatten(2).nanmedian(-1).values  # (H, rows): over batch and groups
        m = torch.where(torch.isnan(m), fallback[None, :, None, :].expand_as(m), m)
        stats.append(torch.nan_to_num(m, nan=0.0))
    half = torch.full_like(stats[0], qmax / 2)
    return torch.stack([*stats, half], -1).float()


def decode_meta4(byte: torch.Tensor, base: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(packed uint8 per group, base (B, H, 1, rows, 3)) -> float ``(scale, zero)`` of ``x = code · scale + zero``."""
    zb = 8 - U_BITS
    u = (byte >> zb).float()
    z = (byte & (2 ** zb - 1)).float()
    z_mid = (2 ** zb - 1) / 2
    log_b, mid_b, half = base[..., 0], base[..., 1], base[..., 2]
    scale = torch.exp2(log_b + (u - U_MID) / U_STEPS)
    low = mid_b + scale * ((z - z_mid) * Z_STEP - half)
    return scale.to(dtype), low.to(dtype)


def fit_meta4(g: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, base: torch.Tensor, qmax: int, dim: int,
              w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lowest-error 1-byte metadata per group: (packed uint8, float scale, float low)."""
    log_b, mid_b = base[..., 0], base[..., 1]
    mid = (mx + mn) / 2
    zb = 8 - U_BITS
    z_max, z_mid = 2 ** zb - 1, (2 ** zb - 1) / 2
    best = best_err = None
    for u in range(2 ** U_BITS):
        s = torch.exp2(log_b + (u - U_MID) / U_STEPS).expand_as(mid)
        z0 = torch.round((mid - mid_b) / (s * Z_STEP) + z_mid)
        for dz in range(-Z_SEARCH, Z_SEARCH + 1):
            z = (z0 + dz).clamp(0, z_max)
            lo = mid_b + s * ((z - z_mid) * Z_STEP - qmax / 2)
            byte = (z + 2 ** zb * u).to(torch.uint8)
            best, best_err = _keep_lower(best, best_err, (byte, s, lo), group_error(g, s, lo, qmax, dim, w))
    return best[0], best[1], best[2]
