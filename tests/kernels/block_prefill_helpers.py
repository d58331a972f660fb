"""Inputs, layouts and checks shared by the block-sparse prefill kernel tests.

Imported by ``test_block_prefill.py`` and ``test_block_prefill_gather.py`` as a plain module (``tests/kernels``
is not a package; pytest puts the test file's folder on ``sys.path``), like ``tests/inspector/inspector_helpers.py``.
"""

from __future__ import annotations

import torch

from compactlm.kernels.block_prefill import BlockLayout, layout_from_mask

# (batch, heads, kv_heads, q_len, kv_len, dim, block): GQA 2/4/1, MHA, an uneven last block, chunked prefill
# (q_len < kv_len, aligned and not).
SHAPES = [
    (1, 4, 2, 256, 256, 32, 32),
    (2, 4, 1, 200, 200, 16, 32),
    (1, 2, 2, 96, 320, 32, 32),
    (1, 8, 2, 100, 333, 64, 64),
]


def inputs(bsz: int, heads: int, kv_heads: int, q_len: int, kv_len: int, dim: int, dtype: torch.dtype,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B, H, Tq, D), k and v (B, H_kv, Tk, D), drawn in fp32 then cast (same values for any dtype)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, q_len, dim, generator=gen).to(dtype)
    k = torch.randn(bsz, kv_heads, kv_len, dim, generator=gen).to(dtype)
    v = torch.randn(bsz, kv_heads, kv_len, dim, generator=gen).to(dtype)
    return q, k, v


def random_layout(bsz: int, kv_heads: int, q_len: int, kv_len: int, block: int, density: float,
                  seed: int) -> BlockLayout:
    """Each (query block, KV block) pair kept with probability ``density``, independently per KV head."""
    gen = torch.Generator().manual_seed(seed)
    pad = (kv_len - q_len) % block
    nqb, nkb = -(-(q_len + pad) // block), -(-kv_len // block)
    keep = torch.rand(bsz, kv_heads, nqb, nkb, generator=gen) < density
    return layout_from_mask(keep, block, q_len, kv_len)


def assert_close(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Same shape and allclose in fp32; the failure message gives the max and mean difference."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    diff = (out.float() - ref.float()).abs()
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol), (
        f"max diff {diff.max():.3e}, mean diff {diff.mean():.3e}")
