"""Group-wise asymmetric min-max quantization of KV tensors, as pure tensor functions.

Based on KIVI (Liu et al., arXiv 2402.02750), §3.2-3.3: keys are quantized *per channel* (each
channel's min/max taken over a group of ``group_size`` consecutive tokens, because key outliers sit
in fixed channels) and values *per token* (min/max over a group of ``group_size`` channels of one
token). Codes are ``round((x - zero) / scale)`` in ``[0, 2^bits - 1]`` with ``zero = min`` and
``scale = (max - min) / (2^bits - 1)``; they are packed ``8 / bits`` to a byte along the last dim.

Tensors are (B, H, T, D). ``dim=-2`` groups along tokens (keys), ``dim=-1`` along channels (values).
The scale and zero are rounded to ``meta_dtype`` *before* the codes are computed, so the stored
metadata is exactly what the codes were fitted to. Other methods import these (SALS quantizes values).

``meta_dtype="int8"`` stores each group's metadata in 2 bytes instead of 4 (fp16 scale + zero):
the scale as a uint8 log2 code, ``scale = 2^((u - 128) / 8)`` (1/8-octave steps, rounded to nearest;
the OCP MX formats' shared E8M0 scale with 8× finer steps), and the offset as an int8 zero point ``z``
in quarter steps, ``x ≈ scale · (code - z / 4)`` (integer zero points: Jacob et al., arXiv 1712.05877,
§2.1; quarter steps because whole steps cost int2 ~0.3-0.7 dB SQNR on keys). Where ``-min`` exceeds
32 scales (the int8 range), the scale is enlarged until it fits. The codes are fitted to the stored
(decoded) scale and zero point, as for the float formats; on random groups of 32 the SQNR is within
~0.05 dB of fp16 metadata at 2 bits.

``meta_dtype="int4"`` stores 1 byte per group (4-bit scale and offset codes relative to a per-row base,
see :mod:`compactlm.kv.fit`); for it ``quantize_groups`` returns the base in place of the zero tensor.
``clip_search=True`` fits every group's range by the lowest reconstruction error (:func:`fit.search_range`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fit import decode_meta4, fit_meta4, meta4_base, search_range

VALID_BITS = (2, 4, 8)
META8 = "int8"  # meta_dtype of the 2-byte metadata format (uint8 log2 scale + int8 zero point)
META4 = "int4"  # meta_dtype of the 1-byte metadata format (4-bit scale and offset codes + a per-row base)
# KVQuant.meta_dtype name -> what quantize_groups takes as its meta_dtype (the cache and the inspector's simulation).
META_DTYPES: dict[str, torch.dtype | str] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                                             "int8": META8, "int4": META4}
_LOG_STEPS = 8  # scale codes per octave
_LOG_BIAS = 128  # scale code of 2^0: scales 2^-16 .. 2^15.875
_ZERO_STEPS = 4  # zero-point units per scale step


def encode_meta8(mn: torch.Tensor, mx: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) -> (uint8 log2 scale code, int8 zero point in quarter steps)."""
    need = (mx - mn) / qmax
    # round(-min / scale · 4) must lie in [-128, 127]: enlarge the scale (one code up) where the offset is large
    floor = torch.where(mn > 0, mn / (128 / _ZERO_STEPS), -mn / (127 / _ZERO_STEPS))
    u = torch.round(_LOG_STEPS * torch.log2(need.clamp_min(2.0 ** -16)))
    u_floor = torch.ceil(_LOG_STEPS * torch.log2(floor.clamp_min(2.0 ** -16)))
    u = (torch.maximum(u, u_floor) + _LOG_BIAS).clamp_(0, 255)
    scale = torch.exp2((u - _LOG_BIAS) / _LOG_STEPS)
    z = torch.round(-mn / scale * _ZERO_STEPS).clamp_(-128, 127)
    return u.to(torch.uint8), z.to(torch.int8)


def decode_meta8(scale_code: torch.Tensor, zero_point: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 scale code, int8 zero point) -> the float (scale, zero) of ``x = code · scale + zero``."""
    scale = torch.exp2((scale_code.float() - _LOG_BIAS) / _LOG_STEPS)
    return scale.to(dtype), (-zero_point.float() / _ZERO_STEPS * scale).to(dtype)


def is_meta4(scale: torch.Tensor, zero: torch.Tensor) -> bool:
    """True for the 1-byte format: uint8 packed codes with a float (B, H, 1, rows, 6) base as ``zero``."""
    return scale.dtype == torch.uint8 and zero.is_floating_point()


def decode_meta(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored metadata (float, the 2-byte or the 1-byte format) as float ``(scale, zero)`` in ``dtype``."""
    if is_meta4(scale, zero):
        return decode_meta4(scale, zero, dtype)
    if scale.dtype == torch.uint8:
        return decode_meta8(scale, zero, dtype)
    return scale.to(dtype), zero.to(dtype)


def _check(bits: int, group_size: int, x: torch.Tensor, dim: int) -> None:
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits}")
    if x.dim() != 4 or dim not in (-1, -2):
        raise ValueError(f"expected a (B, H, T, D) tensor and dim -1 or -2, got shape {tuple(x.shape)}, dim {dim}")
    if x.shape[dim] % group_size:
        axis = "tokens" if dim == -2 else "channels"
        raise ValueError(f"{x.shape[dim]} {axis} is not a multiple of group_size {group_size}")
    if (x.shape[-1] * bits) % 8:
        raise ValueError(f"head dim {x.shape[-1]} × {bits} bits does not fill whole bytes")


def _grouped(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    b, h, t, d = x.shape
    if dim == -2:
        return x.reshape(b, h, t // group_size, group_size, d)  # (B, H, T/G, G, D): reduce dim -2
    return x.reshape(b, h, t, d // group_size, group_size)  # (B, H, T, D/G, G): reduce dim -1


def quantize_groups(x: torch.Tensor, bits: int, group_size: int, dim: int,
                    meta_dtype: torch.dtype | str = torch.float16,
                    valid: torch.Tensor | None = None, clip_search: bool = False,
                    base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric codes of ``x`` (B, H, T, D) in groups along ``dim`` (min-max range, or searched).

    Returns ``(codes uint8 (B, H, T, D), scale, zero)`` with scale/zero (B, H, T/G, D) for ``dim=-2``
    and (B, H, T, D/G) for ``dim=-1``, in ``meta_dtype`` (``"int8"``: uint8 scale codes and int8 zero
    points, see :func:`encode_meta8`; ``"int4"``: one packed uint8 per group and, as ``zero``, the per-row
    base (B, H, 1, rows, 6) — ``base`` passes the one a layer fixed at its first flush, None computes it
    from ``x``). ``valid`` (B, T) bool excludes padded tokens from the range and the fitting error of token
    groups (their codes are still produced, and never attended to). ``clip_search`` picks each group's range
    by the lowest reconstruction error (:func:`compactlm.kv.fit.search_range`); the 1-byte format always does.
    """
    _check(bits, group_size, x, dim)
    qmax = 2 ** bits - 1
    xf = x.float()
    g = _grouped(xf, group_size, dim)
    w = empty = None
    if valid is not None and dim == -2:
        v = valid[:, None, :, None].to(torch.bool).expand_as(xf)  # (B, H, T, D)
        w = _grouped(v, group_size, dim)
        mn = torch.where(w, g, torch.inf).amin(dim)
        mx = torch.where(w, g, -torch.inf).amax(dim)
        empty = ~w.any(dim)
        mn = torch.where(empty, 0.0, mn)
        mx = torch.where(empty, 0.0, mx)
    else:
        mn, mx = g.amin(dim), g.amax(dim)
    if meta_dtype == META4:
        base = meta4_base(mn, mx, qmax, dim, empty) if base is None else base
        scale, s, z = fit_meta4(g, mn, mx, base, qmax, dim, w)
        codes = ((g - z.unsqueeze(dim)) / s.unsqueeze(dim)).round_().clamp_(0, qmax)
        return codes.to(torch.uint8).reshape(x.shape), scale, base
    if isinstance(meta_dtype, str):
        if meta_dtype != META8:
            raise ValueError(f"meta_dtype must be a torch float dtype, {META8!r} or {META4!r}, got {meta_dtype!r}")

        def encode(lo, hi):
            sc, zp = encode_meta8(lo, hi, qmax)
            return (sc, zp, *decode_meta8(sc, zp))
    else:
        def encode(lo, hi):
            sc, lo_m = ((hi - lo) / qmax).to(meta_dtype), lo.to(meta_dtype)
            s = sc.float()
            s = torch.where(s > 0, s, torch.ones_like(s))  # constant groups: any scale reproduces them exactly
            return sc, lo_m, s, lo_m.float()
    scale, zero, s, z = search_range(g, mn, mx, qmax, dim, encode, w) if clip_search else encode(mn, mx)
    codes = ((g - z.unsqueeze(dim)) / s.unsqueeze(dim)).round_().clamp_(0, qmax)
    return codes.to(torch.uint8).reshape(x.shape), scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dim: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: ``codes · scale + zero`` in ``dtype`` (B, H, T, D)."""
    g = _grouped(codes.to(dtype), group_size, dim)
    s, z = decode_meta(scale, zero, dtype)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (g * s.unsqueeze(dim) + z.unsqueeze(dim)).reshape(codes.shape)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``8 / bits`` per byte along the last dim: (..., D) -> (..., D·bits/8)."""
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (..., D·bits/8) uint8 -> (..., D) uint8."""
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    out = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * per)


_HADAMARD: dict[tuple[int, torch.device], torch.Tensor] = {}


def hadamard(n: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix (n, n) in fp32, n a power of two; symmetric, so H @ H = I.

    Rotating each token's value channels by it before per-token quantization spreads outlier channels
    over the whole head (QuaRot, Ashkboos et al., arXiv 2404.00456, §4: Hadamard-rotated KV cache).
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    key = (n, torch.device(device or "cpu"))
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = (h / n ** 0.5).to(key[1])
        _HADAMARD[key] = h
    return h


_LUTS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
# a table row of 8/bits codes in the output dtype read as one integer, so the lookup is a 1-D gather
_WIDE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def unpack_to(packed: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`unpack_codes` straight to ``dtype`` codes with one table lookup per byte (no shift passes).

    Where a byte's ``8 / bits`` codes in ``dtype`` fit one machine integer (2-bit bf16/fp16: 8 bytes; 4-bit
    bf16: 4; 4-bit fp32: 8), the table is a (256,) integer tensor and the lookup one ``index_select`` over the
    flat bytes, reinterpreted as ``dtype``: ~3.5x faster than ``embedding`` over (256, 8/bits) rows on this
    project's CPU (46 vs 160 µs for a 3 × 1024 × 16-byte value chunk, 1 thread). Bit-exact either way.
    """
    key = (bits, dtype, packed.device)
    lut = _LUTS.get(key)
    if lut is None:  # row b = the 8/bits codes byte b holds, in pack order
        lut = unpack_codes(torch.arange(256, dtype=torch.uint8, device=packed.device)[:, None], bits).to(dtype)
        wide = _WIDE.get(lut.shape[-1] * lut.element_size())
        lut = lut.contiguous().view(wide).reshape(256) if wide is not None else lut
        _LUTS[key] = lut
    if lut.dim() == 1:
        flat = lut.index_select(0, packed.reshape(-1).to(torch.int32))  # (N,) one integer per byte
        return flat.view(dtype).reshape(*packed.shape[:-1], -1)
    out = torch.nn.functional.embedding(packed.long(), lut)  # (..., D·bits/8, 8/bits)
    return out.reshape(*packed.shape[:-1], -1)


@dataclass
class QuantizedKV:
    """One quantized tensor (B, H, T, D): packed codes plus per-group scale and zero; appendable along T."""

    packed: torch.Tensor  # uint8 (B, H, T, D·bits/8)
    scale: torch.Tensor  # (B, H, T/G, D) for keys (dim=-2), (B, H, T, D/G) for values (dim=-1)
    zero: torch.Tensor  # same shape as scale; the 1-byte format: the per-row base (B, H, 1, rows, 6), kept once
    bits: int
    group_size: int
    dim: int

    @classmethod
    def quantize(cls, x: torch.Tensor, bits: int, group_size: int, dim: int,
                 meta_dtype: torch.dtype | str = torch.float16, valid: torch.Tensor | None = None,
                 clip_search: bool = False, like: QuantizedKV | None = None) -> QuantizedKV:
        """Quantize ``x``; ``like`` (the store this will be appended to) passes its 1-byte-metadata base on."""
        base = like.zero if like is not None and like.meta4 else None
        codes, scale, zero = quantize_groups(x, bits, group_size, dim, meta_dtype, valid, clip_search, base)
        return cls(pack_codes(codes, bits), scale, zero, bits, group_size, dim)

    @property
    def meta4(self) -> bool:
        return is_meta4(self.scale, self.zero)

    @property
    def length(self) -> int:
        return self.packed.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def _meta_rows(self, start: int, end: int) -> slice:
        g = self.group_size if self.dim == -2 else 1
        return slice(start // g, end // g)

    def _zero_rows(self, rows: slice) -> torch.Tensor:
        return self.zero if self.meta4 else self.zero[..., rows, :]

    def meta(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Float ``(scale, zero)`` in ``dtype`` of the groups covering tokens ``[start, end)``."""
        rows = self._meta_rows(start, end)
        return decode_meta(self.scale[..., rows, :], self._zero_rows(rows), dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tokens ``[start, end)`` dequantized to ``dtype`` (token-grouped tensors: bounds on group edges)."""
        end = self.length if end is None else end
        rows = self._meta_rows(start, end)
        codes = unpack_codes(self.packed[..., start:end, :], self.bits)
        return dequantize_groups(codes, self.scale[..., rows, :], self._zero_rows(rows), self.group_size,
                                 self.dim, dtype)

    def append(self, other: QuantizedKV) -> QuantizedKV:
        if self.meta4 and other.zero is not self.zero:
            raise ValueError("1-byte metadata: quantize what you append with like=<this store> (one base per layer)")
        zero = self.zero if self.meta4 else torch.cat([self.zero, other.zero], -2)  # one base per layer
        return QuantizedKV(torch.cat([self.packed, other.packed], -2), torch.cat([self.scale, other.scale], -2),
                           zero, self.bits, self.group_size, self.dim)

    def map_batch(self, fn) -> QuantizedKV:
        """Apply ``fn`` to the batch dim of every held tensor (beam reorder, batch select, repeat)."""
        return QuantizedKV(fn(self.packed), fn(self.scale), fn(self.zero), self.bits, self.group_size, self.dim)
