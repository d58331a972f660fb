"""Bit packing of unsigned b-bit codes (b in 1..8) into int32 words, in the compressed-tensors layout.

Layout (compressed-tensors ``pack-quantized``, the one vLLM reads): along the packed dimension, every 32
consecutive codes form one dense bit stream of ``32 * b`` bits, least significant bit first, stored as
``b`` int32 words; code ``i`` of a block starts at bit ``i * b``. For b in {2, 4, 8} no code crosses a
word (this is the plain "``32 / b`` codes per word" layout); 3-bit codes straddle words. The last block
is zero-padded and the output truncated to ``ceil(n * b / 32)`` words. Packing along dim 0 (the
layout of compressed-tensors' asymmetric zero points) is packing of the transpose.
"""

from __future__ import annotations

import math
import sys

import torch


def _positions(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(32, device=device, dtype=torch.int64) * bits  # bit position of each code in its block
    return start // 32, start % 32  # word index within the block, bit offset within that word


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack unsigned codes ``(rows, n)`` (any int dtype, values < 2**bits) into int32 ``(rows, ceil(n*b/32))``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1..8-bit codes, got bits={bits}")
    if dim == 0:
        return pack_int32(codes.t(), bits).t().contiguous()
    rows, n = codes.shape
    blocks = math.ceil(n / 32)
    v = torch.zeros(rows, blocks * 32, dtype=torch.int64, device=codes.device)
    v[:, :n] = codes.to(torch.int64)
    v = v.view(rows, blocks, 32)
    word, off = _positions(bits, codes.device)
    words = torch.zeros(rows, blocks, bits + 1, dtype=torch.int64, device=codes.device)  # +1: overflow slot
    # Bits never overlap, so adding contributions equals OR-ing them.
    words.scatter_add_(2, word.expand(rows, blocks, 32), (v << off) & 0xFFFFFFFF)
    spill = (v >> (32 - off)) * (off + bits > 32)  # the high part of a code that crosses into the next word
    words.scatter_add_(2, (word + 1).expand(rows, blocks, 32), spill)
    words = words[..., :bits].reshape(rows, blocks * bits)[:, : math.ceil(n * bits / 32)]
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: unsigned codes (uint8) ``(rows, n)`` from int32 ``(rows, words)``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can unpack 1..8-bit codes, got bits={bits}")
    if dim == 0:
        return unpack_int32(packed.t(), bits, n).t().contiguous()
    rows, nwords = packed.shape
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # Fast path (2/4/8 bits): no code crosses a byte, so split little-endian bytes (uint8 math is cheap).
        data = packed.contiguous().view(torch.uint8).view(rows, nwords, 4)
        if sys.byteorder == "big":
            data = data.flip(-1)
        if bits == 8:
            return data.reshape(rows, -1)[:, :n]
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (data.unsqueeze(-1) >> shifts) & mask  # (rows, words, 4, 8/b)
        return codes.reshape(rows, -1)[:, :n]
    blocks = math.ceil(n / 32)
    if bits == 3:
        return _unpack3(packed, rows, nwords, blocks)[:, :n]
    u = torch.zeros(rows, blocks * bits + 1, dtype=torch.int64, device=packed.device)
    u[:, :nwords] = packed.to(torch.int64) & 0xFFFFFFFF
    word, off = _positions(bits, packed.device)
    base = (torch.arange(blocks, device=packed.device) * bits)[:, None] + word  # (blocks, 32)
    pair = u[:, base] | (u[:, base + 1] << 32)  # (rows, blocks, 32): the two words a code can touch
    codes = (pair >> off) & mask
    return codes.reshape(rows, blocks * 32)[:, :n].to(torch.uint8)


def _unpack3(packed: torch.Tensor, rows: int, nwords: int, blocks: int) -> torch.Tensor:
    """3-bit codes without a gather: a block's 96 bits read as two overlapping 64-bit windows.

    Codes 0..20 lie in bits 0..62 (words 0-1), codes 21..31 in bits 63..95 (words 1-2). This is the
    runtime path of 3-bit :class:`PackedLinear`, so it avoids the slower general gather.
    """
    u = torch.zeros(rows, blocks * 3, dtype=torch.int64, device=packed.device)
    u[:, :nwords] = packed.to(torch.int64) & 0xFFFFFFFF
    u = u.view(rows, blocks, 3)
    lo = u[..., 0] | (u[..., 1] << 32)  # bits 0..63 (the top bit may turn the int64 negative: masked below)
    hi = u[..., 1] | (u[..., 2] << 32)  # bits 32..95
    s_lo = torch.arange(0, 63, 3, device=packed.device)  # codes 0..20
    s_hi = torch.arange(63, 96, 3, device=packed.device) - 32  # codes 21..31
    codes = torch.cat([(lo.unsqueeze(-1) >> s_lo) & 7, (hi.unsqueeze(-1) >> s_hi) & 7], dim=-1)
    return codes.reshape(rows, blocks * 32).to(torch.uint8)
