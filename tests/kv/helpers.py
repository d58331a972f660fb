"""Shared checks of the KV-cache tests."""

from __future__ import annotations

import torch

from compactlm.kv import quantized_decode_attention, reference_attention


def fused_matches_reference(layer, g: torch.Generator, masked: bool, heads: int = 4) -> tuple[torch.Tensor, ...]:
    """Assert the fused decode attention over ``layer`` equals plain attention over its materialized keys/values.

    One random query per row of the layer's batch (``heads`` query heads); ``masked`` left-pads row 0 by 5 tokens.
    Returns the materialized ``(keys, values)``.
    """
    k, v = layer.materialize()
    b, _, t, d = k.shape
    query = torch.randn(b, heads, 1, d, generator=g)
    mask = None
    if masked:
        mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
        mask[0, ..., :5] = False  # left padding of row 0
    ref = reference_attention(query, k, v, 0.25, mask)
    got = quantized_decode_attention(query, layer, 0.25, mask)
    assert got.shape == (b, 1, heads, d)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
    return k, v
