"""Reference math of integer weight quantization: choose_qparams / quantize / dequantize.

Conventions (shared by every method, by :class:`~compactlm.modules.packed_linear.PackedLinear` and by the
compressed-tensors export):

- codes ``q`` are unsigned, ``0 <= q <= 2**bits - 1``; the weight is ``w = (q - zero) * scale``;
- ``scale`` and ``zero`` are per output row and per group of ``group_size`` consecutive input columns,
  shape ``(out, in // group_size)``; ``group_size=-1`` means one group per row (per channel);
- symmetric: ``zero = 2**(bits-1)`` and ``scale = absmax / ((2**bits - 1) / 2)``, codes clamped to the
  full range (the compressed-tensors / vLLM symmetric convention: signed code ``q - 2**(bits-1)``);
- asymmetric: the range always contains 0 (as GPTQ does), so an exact zero weight, e.g. a pruned one,
  dequantizes to exactly 0, and ``zero`` is an integer code in range.

An optional clipping search shrinks each group's range over a grid and keeps, per group, the ratio that
minimises ``sum |w - dequant(quant(w))|**norm`` (GPTQ's ``mse`` option, AWQ's clip search).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """The grid one linear is quantized on."""

    bits: int = 4
    group_size: int = 128  # -1: per output channel
    symmetric: bool = False
    clip_search: bool = False  # search a per-group range shrink that minimises reconstruction error
    clip_grid: int = 20  # ratios 1, 1 - 1/grid*(1-min_ratio), ... , min_ratio
    clip_min_ratio: float = 0.75
    clip_norm: float = 2.4  # GPTQ's error norm for the search

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size must be a positive number of input columns or -1 (per channel), "
                              f"got {self.group_size}")
        if not 0.0 < self.clip_min_ratio <= 1.0:
            raise ConfigError(f"clip_min_ratio must be in (0, 1], got {self.clip_min_ratio}")
        if self.clip_grid < 1:
            raise ConfigError(f"clip_grid must be >= 1, got {self.clip_grid}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")


def check_group_size(spec: QuantSpec, in_features: int, name: str = "this layer") -> None:
    """A group must tile the input width exactly: a clear error names the layer and the divisors."""
    g = spec.group_size
    if g != -1 and in_features % g != 0:
        divisors = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0]
        raise ConfigError(f"group_size={g} does not divide the input width {in_features} of {name}; "
                          f"use a divisor of {in_features} (e.g. {divisors or [in_features]}) or -1 for per channel")


def _range_qparams(wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero from per-group min/max (both tensors of the same shape; wmin <= 0 <= wmax)."""
    maxq = spec.maxq
    if spec.symmetric:
        absmax = torch.maximum(wmin.abs(), wmax)
        scale = absmax / (maxq / 2)
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        scale = (wmax - wmin) / maxq
        # An all-zero group would give scale 0: any positive scale represents it exactly.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-wmin / scale), 0, maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    rows, cols = w.shape
    g = spec.group_width(cols)
    return w.reshape(rows, cols // g, g)  # (out, groups, g)


def choose_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) ``scale`` (float, w's dtype or fp32) and integer-valued ``zero``: shapes (out, groups)."""
    check_group_size(spec, w.shape[1])
    wg = _grouped(w.float(), spec)  # (out, groups, g)
    wmin = wg.amin(dim=-1).clamp(max=0)
    wmax = wg.amax(dim=-1).clamp(min=0)
    scale, zero = _range_qparams(wmin, wmax, spec)
    if not spec.clip_search:
        return scale, zero
    best_err = torch.full_like(scale, float("inf"))
    for k in range(spec.clip_grid + 1):
        ratio = 1.0 - (1.0 - spec.clip_min_ratio) * k / spec.clip_grid
        s, z = _range_qparams(wmin * ratio, wmax * ratio, spec)
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, spec.maxq)
        err = ((q - z[..., None]) * s[..., None] - wg).abs().pow(spec.clip_norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _expand(t: torch.Tensor, cols: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """Per-group (out, groups) values broadcast to per-column (out, in)."""
    if g_idx is not None:
        return t[:, g_idx]
    return t.repeat_interleave(cols // t.shape[1], dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Unsigned integer codes (uint8, (out, in)) of ``w`` on the grid ``scale``/``zero``."""
    cols = w.shape[1]
    s = _expand(scale.float(), cols, g_idx)
    z = _expand(zero.float(), cols, g_idx)
    q = torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1)
    return q.to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` per column group, computed in fp32 and cast to ``dtype``."""
    rows, cols = q.shape
    if g_idx is None:  # contiguous groups: broadcast per group instead of materialising per-column scales
        groups = scale.shape[1]
        out = q.reshape(rows, groups, cols // groups).to(torch.float32)
        out.sub_(zero.float()[..., None]).mul_(scale.float()[..., None])  # in place: one buffer, not three
        return out.reshape(rows, cols).to(dtype)
    s = _expand(scale.float(), cols, g_idx)
    z = _expand(zero.float(), cols, g_idx)
    return ((q.float() - z) * s).to(dtype)


def rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(codes, scale, zero)`` for ``w`` (out, in)."""
    scale, zero = choose_qparams(w, spec)
    return quantize(w, scale, zero, spec.bits), scale, zero
