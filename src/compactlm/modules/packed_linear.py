"""PackedLinear: a linear layer holding b-bit packed weights with their own metadata (STYLE 11).

State (all in ``state_dict``, so save/load and the compressed-tensors export need nothing else):
``qdata`` int32 ``(out, ceil(in*b/32))`` in the compressed-tensors bit layout (see
:mod:`compactlm.primitives.pack`), ``scale`` ``(out, groups)``, ``zero`` uint8 codes ``(out, groups)``,
optional ``g_idx`` ``(in,)`` and ``bias``; ``bits``, ``group_size``, ``symmetric`` are attributes.
The weight is ``(q - zero) * scale`` (see :mod:`compactlm.primitives.quant`).

Two compute paths, both exact to the same dequantized weight up to the activation dtype:

- ``int4``: PyTorch's CPU int4 kernel ``torch.ops.aten._weight_int4pack_mm_for_cpu`` with bf16
  activations. It computes ``w = (q - 8) * s + z'``, so our zero becomes ``z' = (8 - zero) * scale``.
  2- and 3-bit layers use it too: each group's codes are shifted by ``8 - zero`` into 4-bit codes
  (the additive zero is then exactly 0), repacked once into the kernel's 4-bit layout — so at run time
  such a layer holds its b-bit codes plus a 4-bit kernel copy.
- ``dequant``: unpack, dequantize to the activation dtype, ``F.linear`` (every bit width, every device).

The int4 kernel wins at small M (decode) and loses at larger M (measured here: ≈4× faster at M=1,
≈0.8× at M=16), so the path is chosen per call from the number of rows, against a crossover measured
once per (out, in, group) shape in this process (:func:`int4_crossover`); ``force_path`` overrides it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives.pack import pack_int32, unpack_int32
from ..primitives.quant import dequantize
from ..utils import PathOverride, median_time

INT4_GROUP_SIZES = (32, 64, 128, 256)
_CROSSOVER: dict[tuple[int, int, int], int] = {}  # (out, in, group) -> largest M where int4 is faster
ALWAYS = 1 << 30  # crossover value meaning "the int4 kernel won at every measured M"


_PATH = PathOverride(("int4", "dequant"))
force_path = _PATH.force  # force every PackedLinear onto "int4" or "dequant" inside a block


@torch.no_grad()
def int4_crossover(out_features: int, in_features: int, group_size: int, ms: tuple[int, ...] = (1, 4, 16, 64, 256)
                   ) -> int:
    """Largest M (of ``ms``) at which the int4 kernel beats dequantize+bf16 matmul on this CPU; 0 if never.

    Measured on random data of this shape once per process and cached: the choice of path comes from a
    measurement on the machine that runs the model, not from a constant. If the kernel still wins at the
    largest M measured, it is used for every M (:data:`ALWAYS`).
    """
    key = (out_features, in_features, group_size)
    if key in _CROSSOVER:
        return _CROSSOVER[key]
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8)
    scale = torch.rand(out_features, in_features // group_size) * 0.01 + 1e-3
    zero = torch.full_like(scale, 8, dtype=torch.uint8)
    layer = PackedLinear.from_codes(q, scale, zero, bits=4, group_size=group_size, symmetric=False)
    best = 0
    for m in ms:
        x = torch.randn(m, in_features, dtype=torch.bfloat16)
        t_int4 = median_time(lambda x=x: layer._int4_matmul(x), warmup=1, repeat=7)
        t_deq = median_time(lambda x=x: F.linear(x, layer.dequantize_weight(torch.bfloat16)), warmup=1, repeat=7)
        if t_int4 < t_deq:
            best = m
        else:
            break
    if best == ms[-1]:
        best = ALWAYS
    _CROSSOVER[key] = best
    return best


class PackedLinear(nn.Module):
    """A quantized ``nn.Linear`` replacement; ``forward`` takes and returns the activation dtype."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, has_g_idx: bool = False, scale_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = 1 if group_size == -1 else in_features // group_size
        words = -(-in_features * bits // 32)
        self.register_buffer("qdata", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=scale_dtype))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if has_g_idx else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype), requires_grad=False) if bias else None
        self._int4_cache: tuple[torch.Tensor, torch.Tensor, torch.device] | None = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, group_size: int,
                   symmetric: bool, bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                   scale_dtype: torch.dtype | None = None) -> PackedLinear:
        """Build from unsigned codes ``(out, in)``, per-group ``scale``/``zero`` ``(out, groups)``."""
        out_features, in_features = codes.shape
        scale_dtype = scale_dtype or scale.dtype
        m = cls(in_features, out_features, bits, group_size, symmetric, bias=bias is not None,
                has_g_idx=g_idx is not None, scale_dtype=scale_dtype)
        m.qdata.copy_(pack_int32(codes, bits))
        m.scale.copy_(scale.to(scale_dtype))
        m.zero.copy_(zero.round().to(torch.uint8))
        if g_idx is not None:
            m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m.to(codes.device)

    def codes(self) -> torch.Tensor:
        """Unsigned codes ``(out, in)`` (uint8)."""
        return unpack_int32(self.qdata, self.bits, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g_idx = None if self.g_idx is None else self.g_idx.long()
        return dequantize(self.codes(), self.scale, self.zero, g_idx, dtype=dtype)

    # --- compute paths --------------------------------------------------------------------------------
    def int4_supported(self) -> bool:
        # 2- and 3-bit codes shifted by 8 - zero are valid 4-bit codes (see _int4_operands).
        return (self.bits in (2, 3, 4) and self.g_idx is None and self.qdata.device.type == "cpu"
                and self.group_size in INT4_GROUP_SIZES and self.in_features % self.group_size == 0)

    def _int4_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.qdata.device
        if self._int4_cache is None or self._int4_cache[2] != dev:
            q = self.codes().to(torch.int32)
            s = self.scale.float()
            if self.bits < 4:
                # Shift each group's codes so that its zero lands on the kernel's 8: q + 8 - zero stays in
                # [0, 15] for 2/3-bit codes, and the additive zero is then exactly 0 (a bf16 z' = (8 - zero)·s
                # would add a rounding offset shared by the whole group).
                q = q + (8 - self.zero.to(torch.int32)).repeat_interleave(self.group_size, dim=1)
                z = torch.zeros_like(s)
            else:
                z = (8.0 - self.zero.float()) * s  # the kernel's additive zero: (q - 8)·s + z' = (q - zero)·s
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (groups, out, 2)
            self._int4_cache = (weight, sz, dev)
        return self._int4_cache[0], self._int4_cache[1]

    def _int4_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        weight, sz = self._int4_operands()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.to(torch.bfloat16).contiguous(), weight,
                                                           self.group_size, sz)

    def choose_path(self, x: torch.Tensor) -> str:
        forced = _PATH.forced
        if forced == "int4":
            if not self.int4_supported():
                raise ValueError(f"the int4 path needs 2-4 bits, a CPU tensor, no g_idx and a group size in "
                                 f"{INT4_GROUP_SIZES}; this layer has bits={self.bits}, group={self.group_size}")
            return "int4"
        if forced == "dequant" or not self.int4_supported() or x.dtype != torch.bfloat16:
            return "dequant"
        rows = x.numel() // x.shape[-1]
        limit = int4_crossover(self.out_features, self.in_features, self.group_size)
        return "int4" if rows <= limit else "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.choose_path(x) == "int4":
            y = self._int4_matmul(x.reshape(-1, self.in_features)).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        self._int4_cache = None  # device/dtype moves invalidate the kernel's repacked weight
        return super()._apply(fn, recurse)

    def weight_bits(self) -> int:
        return self.out_features * self.in_features * self.bits

    def metadata_bits(self) -> int:
        """Bits spent on scales (16-bit, as exported) and zeros (``bits`` each, asymmetric only)."""
        n = self.scale.numel()
        return n * 16 + (0 if self.symmetric else n * self.bits)

    def extra_repr(self) -> str:
        g = "channel" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={g}, "
                f"symmetric={self.symmetric}, bias={self.bias is not None}")
