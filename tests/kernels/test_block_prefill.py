"""Block-sparse prefill kernels against the dense masked reference, on random inputs and random layouts."""

from __future__ import annotations

import pytest
import torch
from block_prefill_helpers import SHAPES, assert_close, inputs, random_layout
from triton_helpers import run_interpreted

from compactlm.errors import ConfigError
from compactlm.kernels.block_prefill import (
    block_attention,
    block_attention_flex,
    block_attention_reference,
    dense_causal_reference,
    dense_layout,
    layout_from_mask,
)


def token_mask(layout):
    """(B, H_kv, Tq, Tk) bool: query i may read key j iff j's block is in i's query-block row."""
    bsz, hk, nqb, _ = layout.kv_indices.shape
    nkb = -(-layout.kv_len // layout.block)
    blocks = torch.zeros(bsz, hk, nqb, nkb, dtype=torch.int32)
    width = torch.arange(layout.kv_indices.shape[-1])
    valid = (width < layout.kv_counts[..., None]).int()
    blocks = blocks.scatter_add(-1, layout.kv_indices.long(), valid) > 0
    rows = (torch.arange(layout.q_len) + layout.pad) // layout.block
    cols = torch.arange(layout.kv_len) // layout.block
    return blocks[:, :, rows][..., cols]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_reference_matches_dense_masked(shape, density):
    bsz, heads, kv_heads, q_len, kv_len, dim, block = shape
    q, k, v = inputs(bsz, heads, kv_heads, q_len, kv_len, dim, torch.float32)
    layout = random_layout(bsz, kv_heads, q_len, kv_len, block, density, seed=1)
    out = block_attention_reference(q, k, v, layout, chunk_blocks=2)
    ref = dense_causal_reference(q, k, v, keep_tokens=token_mask(layout))
    assert_close(out, ref, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_keep_all_equals_dense(shape):
    bsz, heads, kv_heads, q_len, kv_len, dim, block = shape
    q, k, v = inputs(bsz, heads, kv_heads, q_len, kv_len, dim, torch.float32)
    layout = dense_layout(bsz, kv_heads, q_len, kv_len, block)
    assert layout.block_fraction() == 1.0
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(block_attention_reference(q, k, v, layout), sdpa, atol=2e-6)
    assert_close(block_attention_flex(q, k, v, layout), sdpa, atol=2e-6)


@pytest.mark.parametrize(("shape", "dtype"), [(SHAPES[0], torch.float32), (SHAPES[3], torch.bfloat16),
                                             (SHAPES[2], torch.float32)])
def test_flex_matches_reference(shape, dtype):
    bsz, heads, kv_heads, q_len, kv_len, dim, block = shape
    q, k, v = inputs(bsz, heads, kv_heads, q_len, kv_len, dim, dtype, seed=3)
    layout = random_layout(bsz, kv_heads, q_len, kv_len, block, 0.25, seed=4)
    out = block_attention_flex(q, k, v, layout)
    ref = block_attention_reference(q.float(), k.float(), v.float(), layout)
    assert_close(out, ref, atol=2e-5 if dtype == torch.float32 else 3e-2)


TRITON_CHECK = """
import json, sys, torch
torch.set_num_threads(1)  # the interpreter runs numpy per program; one BLAS thread keeps it fast
from compactlm.kernels.block_prefill import block_attention_reference, block_attention_triton, layout_from_mask
bsz, heads, kv_heads, q_len, kv_len, dim, block, dtype = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
gen = torch.Generator().manual_seed(5)
q = torch.randn(bsz, heads, q_len, dim, generator=gen).to(dtype)
k = torch.randn(bsz, kv_heads, kv_len, dim, generator=gen).to(dtype)
v = torch.randn(bsz, kv_heads, kv_len, dim, generator=gen).to(dtype)
pad = (kv_len - q_len) % block
keep = torch.rand(bsz, kv_heads, -(-(q_len + pad) // block), -(-kv_len // block), generator=gen) < 0.5
layout = layout_from_mask(keep, block, q_len, kv_len)
out = block_attention_triton(q, k, v, layout).float()
ref = block_attention_reference(q.float(), k.float(), v.float(), layout)
print(json.dumps({"max": (out - ref).abs().max().item(), "mean": (out - ref).abs().mean().item()}))
"""


@pytest.mark.parametrize("shape", [(1, 4, 2, 256, 256, 32, 128), (1, 2, 1, 100, 356, 16, 128)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_interpreter_matches_reference(shape, dtype):
    """Runs in a fresh interpreter: TRITON_INTERPRET must be set before anything (inductor) imports triton."""
    diff = run_interpreted(TRITON_CHECK, [*shape, dtype])
    assert diff["max"] < (2e-5 if dtype == "float32" else 3e-2), diff


def test_layout_invariants():
    keep = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    keep[0, 0, 0, 3] = True  # a future block: must be dropped
    keep[0, 1, 3, 0] = True
    layout = layout_from_mask(keep, 16, 64, 64)
    assert layout.kv_counts.tolist() == [[[1, 1, 1, 1], [1, 1, 1, 2]]]  # diagonal always, nothing future
    assert layout.kv_indices[0, 1, 3, :2].tolist() == [0, 3]  # ascending, diagonal last
    assert layout.causal_blocks() == 2 * (1 + 2 + 3 + 4)
    assert layout.block_fraction() == pytest.approx(9 / 20)


def test_bad_inputs_raise():
    q, k, v = inputs(1, 3, 2, 64, 64, 16, torch.float32)
    layout = dense_layout(1, 2, 64, 64, 16)
    with pytest.raises(ConfigError, match="multiple"):
        block_attention_reference(q, k, v, layout)
    q, k, v = inputs(1, 4, 2, 64, 64, 16, torch.float32)
    with pytest.raises(ConfigError, match="impl"):
        block_attention(q, k, v, layout, impl="cuda-magic")
    with pytest.raises(ConfigError, match="layout built"):
        block_attention_reference(q[:, :, :32], k, v, layout)
    with pytest.raises(ConfigError, match="does not match"):
        layout_from_mask(torch.ones(1, 2, 3, 4, dtype=torch.bool), 16, 64, 64)
