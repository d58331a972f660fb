"""Fitting each quantization group's range: MSE-optimal clipping and the 1-byte (4 + 4-bit) metadata.

Min-max ranges waste levels at 2 bits: one extreme token (keys, per channel) or channel (values, per
token) stretches the step for the other 31 elements of the group. :func:`search_range` tries ranges cut
at both ends and keeps, per group, the one whose *stored* metadata reconstructs the group with the lowest
squared error (the clipping-range search of weight quantizers, e.g. GPTQ's ``mse`` grid, here on an
asymmetric 2-D grid because key channels carry offsets that a shrink towards zero would not fit).

The 1-byte metadata (``meta_dtype="int4"``) codes each group's scale in ``u_bits`` (4) bits and its offset
in the other 4, relative to a per-row base (keys: per channel, values: per channel group) fixed when a
layer's first tokens are quantized — KVQuant (Hooper et al., arXiv 2401.18079) §3.1-3.2 observes that
pre-RoPE key ranges are a property of the channel, so a group needs only its deviation from the channel's
typical range. The stored tensors are the packed byte per group ``u << (8 − u_bits) | z`` and the base
(B, H, 1, rows, 6) fp32 = (log2 of scale code 0, median group midpoint, half the code range, octaves per scale
code, u_bits, z_step), so a stored base says which :class:`Meta4Grid` its codes use:

    scale = 2^(base_lo + u · base_step)                 u < 2^u_bits
    low   = base_mid + scale · ((z - z_mid) · z_step - qmax / 2)      z < 2^(8 - u_bits), z_mid its middle
    x     ≈ low + scale · code

The representable (scale, offset) pairs are searched for the lowest squared error (every scale, the
2·Z_SEARCH + 1 offsets around the group's own midpoint for each), so clipping is part of the fit. The
constants were chosen by key/value reconstruction error on 2,048 tokens of PPL-decode-q window 0
(``benchmarks/kv_fit_screen.py``; z_step 0.5 → 0.2 was the one change that mattered: 0.1065 → 0.1000
relative squared value error, 0.0186 → 0.0174 key error; 3 or 5 scale bits did no better). Keys and values
have a grid each (:data:`KEY_GRID`, :data:`VALUE_GRID`): the same codes, but values are fitted by the x²-weighted
error; wider value scale ranges, 5 scale bits and grids that never clip did not lower the answer NLL of 24 RULER
prompts at 4K, the weighting did (``benchmarks/kv_meta_screen.py``, docs/kv-cache.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# fraction of the min-max range cut from the low / high end (6 × 6 = 36 candidate ranges per group)
CLIP_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)


@dataclass(frozen=True)
class Meta4Grid:
    """How a 1-byte metadata code splits: ``u_bits`` scale bits (``steps`` codes per octave, the row's median
    scale at code ``mid_code``) and 8 − ``u_bits`` offset bits in ``z_step`` scales; ``cover``: only grids whose
    range holds the group's min and max compete (no clipping), where any does."""

    u_bits: int
    steps: int
    mid_code: int
    z_step: float
    cover: bool
    magnitude_weighted: bool = False  # weight each element's squared error by x²: protects large channels


# Token-grouped tensors (keys, per channel): 4 + 4 bits, 1/4-octave scales over 2^-2.75 .. 2^+1 of the median.
KEY_GRID = Meta4Grid(u_bits=4, steps=4, mid_code=11, z_step=0.2, cover=False)
# Channel-grouped tensors (values, per token): the same grid, fitted by the x²-weighted error. A plain squared-error
# fit clips a token's largest channels, which carry what an attended token contributes: on 24 RULER prompts at 4K
# that clipping cost 0.043 of the 0.089 nats the 1-byte cache lost against exact (benchmarks/kv_meta_screen.py).
VALUE_GRID = Meta4Grid(u_bits=4, steps=4, mid_code=11, z_step=0.2, cover=False, magnitude_weighted=True)
_UNCOVERED = 1e30
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
    """The per-row base of the 1-byte metadata from a first batch of groups: (B, H, 1, rows, 6) fp32.

    ``mn``/``mx`` are (B, H, groups, rows) for keys (``dim=-2``) and (B, H, tokens, groups) for values;
    rows are the last dim in both. Medians over the groups of a row; empty (all-padding) groups are left out,
    and a row with none takes the median over the batch. The scale grid is :data:`KEY_GRID` for token groups
    (``dim=-2``) and :data:`VALUE_GRID` for channel groups (``dim=-1``).
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
    grid = KEY_GRID if dim == -2 else VALUE_GRID
    lo = stats[0] - grid.mid_code / grid.steps
    full = torch.ones_like(lo)
    return torch.stack([lo, stats[1], full * (qmax / 2), full / grid.steps, full * grid.u_bits, full * grid.z_step],
                       -1).float()


def decode_meta4(byte: torch.Tensor, base: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(packed uint8 per group, base (B, H, 1, rows, 6)) -> float ``(scale, zero)`` of ``x = code · scale + zero``."""
    log_lo, mid_b, half, step, u_bits, z_step = base.unbind(-1)
    z_span = torch.exp2(8 - u_bits)  # offset codes per scale code
    b = byte.float()
    u = torch.floor(b / z_span)
    z = b - u * z_span
    scale = torch.exp2(log_lo + u * step)
    low = mid_b + scale * ((z - (z_span - 1) / 2) * z_step - half)
    return scale.to(dtype), low.to(dtype)


def fit_meta4(g: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, base: torch.Tensor, qmax: int, dim: int,
              w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lowest-error 1-byte metadata per group: (packed uint8, float scale, float low).

    Encodes on the grid of ``dim`` (:data:`KEY_GRID` / :data:`VALUE_GRID`), the one :func:`meta4_base` wrote
    into ``base`` for the decoder; only the base's data-dependent columns (scale of code 0, midpoint) are read.
    """
    grid = KEY_GRID if dim == -2 else VALUE_GRID
    log_lo, mid_b = base[..., 0], base[..., 1]
    u_bits, step, z_step, cover = grid.u_bits, 1 / grid.steps, grid.z_step, grid.cover
    if grid.magnitude_weighted:
        w = g.square() if w is None else g.square() * w
    mid = (mx + mn) / 2
    zb = 8 - u_bits
    z_max, z_mid = 2 ** zb - 1, (2 ** zb - 1) / 2
    best = best_err = None
    for u in range(2 ** u_bits):
        s = torch.exp2(log_lo + u * step).expand_as(mid)
        z0 = torch.round((mid - mid_b) / (s * z_step) + z_mid)
        for dz in range(-Z_SEARCH, Z_SEARCH + 1):
            z = (z0 + dz).clamp(0, z_max)
            lo = mid_b + s * ((z - z_mid) * z_step - qmax / 2)
            byte = (z + 2 ** zb * u).to(torch.uint8)
            err = group_error(g, s, lo, qmax, dim, w)
            if cover:  # a grid that clips the group's extremes loses to any that covers them
                err = torch.where((lo <= mn) & (lo + qmax * s >= mx), err, err + _UNCOVERED)
            best, best_err = _keep_lower(best, best_err, (byte, s, lo), err)
    return best[0], best[1], best[2]
