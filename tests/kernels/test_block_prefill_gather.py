"""The CPU gather-then-dense block-sparse kernel against the plain reference, and through the model handler."""

from __future__ import annotations

import math

import pytest
import torch
from block_prefill_helpers import SHAPES, assert_close, inputs, random_layout

from compactlm.attention import sparse_attention
from compactlm.attention.prefill_sparse import SparsePrefillConfig, block_scores, select_blocks
from compactlm.errors import ConfigError
from compactlm.kernels.block_prefill import block_attention, block_attention_reference, dense_layout
from compactlm.kernels.block_prefill_gather import block_attention_gather, infer_run_blocks, keep_mask, plan_runs

# The shared shapes plus one query block of 16 tokens (q_len < kv_len, unaligned).
GATHER_SHAPES = [*SHAPES, (1, 4, 1, 20, 40, 16, 16)]


@pytest.mark.parametrize("shape", GATHER_SHAPES)
@pytest.mark.parametrize("density", [0.1, 0.4, 1.0])
def test_random_layouts_match_reference(shape, density):
    """Random layouts: KV heads keep different counts (the per-count call split) and runs are mostly invalid."""
    bsz, heads, kv_heads, q_len, kv_len, dim, block = shape
    q, k, v = inputs(bsz, heads, kv_heads, q_len, kv_len, dim, torch.float32, seed=1)
    layout = random_layout(bsz, kv_heads, q_len, kv_len, block, density, seed=2)
    assert_close(block_attention_gather(q, k, v, layout), block_attention_reference(q, k, v, layout), atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("share", "sinks"), [(2, 1), (4, 0), (4, 2)])
def test_selected_layouts_use_runs_and_match_reference(shape, dtype, share, sinks):
    """Layouts from select_blocks: query groups of several blocks become runs of the two-call split."""
    bsz, heads, kv_heads, q_len, kv_len, dim, block = shape
    q, k, v = inputs(bsz, heads, kv_heads, q_len, kv_len, dim, dtype, seed=3)
    cfg = SparsePrefillConfig(share_len=share * block, block_size=block, dense_head=0, keep_ratio=0.3,
                              sink_blocks=sinks, tail_blocks=1)
    layout = select_blocks(q, k, cfg)
    first = (layout.q_offset - layout.pad) // block
    if layout.kv_counts.shape[-1] >= 2 * share:
        assert infer_run_blocks(keep_mask(layout), first) == share  # the group structure is found
    out = block_attention_gather(q, k, v, layout)
    ref = block_attention_reference(q.float(), k.float(), v.float(), layout)
    assert_close(out, ref, atol=2e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("run_blocks", [1, 2, 3, 8])
def test_forced_run_lengths_agree(run_blocks):
    """Any run length is exact: runs that break the split's conditions fall back to single query blocks."""
    q, k, v = inputs(1, 4, 2, 300, 300, 16, torch.float32, seed=4)
    cfg = SparsePrefillConfig(share_len=64, block_size=16, dense_head=0, keep_ratio=0.35)
    layout = select_blocks(q, k, cfg)
    ref = block_attention_reference(q, k, v, layout)
    assert_close(block_attention_gather(q, k, v, layout, run_blocks=run_blocks), ref, atol=2e-5)


def test_plan_runs_splits_invalid_runs():
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[..., torch.arange(4), torch.arange(4)] = True  # diagonal only
    assert plan_runs(keep, 0, 2) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # block (1, 0) missing: not a run
    keep[..., 1, 0] = keep[..., 3, 2] = True
    assert plan_runs(keep, 0, 2) == [(0, 2), (2, 4)]
    keep[..., 3, 0] = True  # rows 2 and 3 now keep different past blocks
    assert plan_runs(keep, 0, 2) == [(0, 2), (2, 3), (3, 4)]
    assert infer_run_blocks(keep, 0) == 1


def test_dense_layout_equals_sdpa():
    q, k, v = inputs(2, 6, 2, 333, 333, 32, torch.float32, seed=5)
    layout = dense_layout(2, 2, 333, 333, 32)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(block_attention_gather(q, k, v, layout), sdpa, atol=2e-6)
    assert_close(block_attention(q, k, v, layout, impl="auto"), sdpa, atol=2e-6)  # auto = gather on CPU


def test_gather_rejects_non_cpu_and_bad_shapes():
    q, k, v = inputs(1, 4, 2, 64, 64, 16, torch.float32)
    layout = dense_layout(1, 2, 64, 64, 16)
    with pytest.raises(ConfigError, match="CPU kernel"):
        block_attention_gather(q.to("meta"), k.to("meta"), v.to("meta"), layout)
    with pytest.raises(ConfigError, match="layout built"):
        block_attention_gather(q[:, :, :32], k, v, layout)


def test_lse_scores_equal_brute_force_up_to_a_row_constant():
    """The fused lse estimate = per-block logsumexp of the pooled query's scores, shifted per (head, group)."""
    q, k = inputs(1, 4, 2, 200, 260, 16, torch.float32, seed=6)[:2]
    cfg = SparsePrefillConfig(share_len=32, block_size=16, dense_head=0)
    scale = 0.25
    got = block_scores(q, k, cfg, scale)  # (1, 4, NG, NK)
    front = 60 % 32
    qp = torch.nn.functional.pad(q, (0, 0, front, -(front + 200) % 32))
    counts = torch.nn.functional.pad(torch.ones(200), (front, -(front + 200) % 32)).view(-1, 32).sum(-1)
    q_mean = qp.view(1, 4, -1, 32, 16).sum(-2) / counts[:, None]  # (1, 4, NG, D)
    s = q_mean @ k.repeat_interleave(2, 1).transpose(-1, -2) * scale  # (1, 4, NG, 260)
    s = torch.nn.functional.pad(s, (0, 12), value=-math.inf).unflatten(-1, (17, 16))
    brute = torch.logsumexp(s, -1)  # (1, 4, NG, NK)
    g_last = (60 - front) + (torch.arange(got.shape[2]) + 1) * 32 - 1
    for g in range(got.shape[2]):
        causal = slice(0, int(min(g_last[g], 259)) // 16 + 1)
        diff = got[0, :, g, causal] - brute[0, :, g, causal]  # constant along the blocks of a row
        assert (diff - diff[:, :1]).abs().max() < 1e-4, (g, diff)


@torch.no_grad()
def test_model_handler_gather_matches_reference(tiny_llama):
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(7))
    outs, stats = {}, {}
    for impl in ("reference", "gather"):
        cfg = SparsePrefillConfig(share_len=32, block_size=16, dense_head=0, keep_ratio=0.3, impl=impl)
        with sparse_attention(tiny_llama, cfg) as built:
            outs[impl] = tiny_llama(ids).logits
        stats[impl] = built[0].state
    assert sum(stats["gather"].sparse_calls.values()) == 2 and not stats["gather"].dense_calls
    assert stats["gather"].block_fraction() < 0.6
    torch.testing.assert_close(outs["gather"], outs["reference"], atol=1e-4, rtol=1e-4)
    dense = tiny_llama(ids).logits
    assert (outs["gather"] - dense).abs().max() > 1e-3  # the sparse pattern changed the output: it really ran
