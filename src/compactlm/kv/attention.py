"""Decode attention over a quantized KV layer, dequantizing one chunk of tokens at a time.

Based on KIVI (Liu et al., arXiv 2402.02750), §3.3: attention over ``[quantized store | full-precision
window]`` splits into a part over the quantized tokens and a part over the exact ones. Here the
quantized part streams ``chunk_tokens`` tokens at a time and the parts are merged with an online
softmax (running max, running sum), so no full-length dequantized copy of the cache is ever built:
the extra memory is one chunk. :func:`reference_attention` is the plain path it is tested against.

GQA is handled by folding the query heads of each KV head into the query-token dim, which never
materialises the repeated keys (PROTOCOL ATTN-decode: the grouped form is the fast dense baseline).
"""

from __future__ import annotations

import torch

from .cache import QuantizedKVLayer


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain softmax attention in fp32: query (B, H, Tq, D), key/value (B, H_kv, Tk, D) -> (B, Tq, H, D).

    ``mask`` is SDPA's boolean mask (B, 1, Tq, Tk), True = attend; None = every key is visible.
    """
    rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(rep, 1)
    v = value.float().repeat_interleave(rep, 1)
    scores = query.float() @ k.transpose(-1, -2) * scaling  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool(), float("-inf"))
    out = torch.softmax(scores, -1) @ v  # (B, H, Tq, D)
    return out.transpose(1, 2).to(query.dtype)


class _Online:
    """Online-softmax accumulator over key segments (grouped query layout (B, H_kv, rep·Tq, ·))."""

    def __init__(self, q: torch.Tensor):
        b, hkv, n, d = q.shape
        self.m = torch.full((b, hkv, n, 1), float("-inf"), dtype=torch.float32, device=q.device)
        self.s = torch.zeros_like(self.m)
        self.acc = torch.zeros(b, hkv, n, d, dtype=torch.float32, device=q.device)

    def add(self, scores: torch.Tensor, v: torch.Tensor) -> None:
        scores = scores.float()
        m_new = torch.maximum(self.m, scores.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # a fully masked row so far
        p = torch.exp(scores - safe)
        corr = torch.exp(self.m - safe)
        self.s = self.s * corr + p.sum(-1, keepdim=True)
        self.acc = self.acc * corr + (p.to(v.dtype) @ v).float()
        self.m = m_new

    def result(self) -> torch.Tensor:
        return self.acc / self.s


def quantized_decode_attention(query: torch.Tensor, layer: QuantizedKVLayer, scaling: float,
                               mask: torch.Tensor | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Attention of ``query`` (B, H, Tq, D) over everything ``layer`` holds -> (B, Tq, H, D).

    ``mask`` (B, 1, Tq, T_total) bool in cache order (sinks, store, window), or None.
    """
    b, h, tq, d = query.shape
    hkv = layer.keys.shape[1]
    rep = h // hkv
    dt = query.dtype  # chunks are dequantized to the model's dtype: half the traffic of fp32 in a bf16 model
    q = query.reshape(b, hkv, rep * tq, d) * scaling  # (B, H_kv, rep·Tq, D)
    acc = _Online(q)
    chunk = chunk_tokens or layer.cfg.chunk_tokens
    offset = 0

    def segment(k: torch.Tensor, v: torch.Tensor) -> None:
        nonlocal offset
        n = k.shape[-2]
        if n == 0:
            return
        scores = (q @ k.to(dt).transpose(-1, -2)).float()  # (B, H_kv, rep·Tq, n)
        if mask is not None:
            m = mask[:, :, :, offset: offset + n].bool()  # (B, 1, Tq, n)
            m = m.unsqueeze(2).expand(b, 1, rep, tq, n).reshape(b, 1, rep * tq, n)
            scores = scores.masked_fill(~m, float("-inf"))
        acc.add(scores, v)
        offset += n

    segment(layer.sink_k, layer.sink_v)
    for start in range(0, layer.quantized_length, chunk):
        end = min(start + chunk, layer.quantized_length)
        segment(layer.dequantized_keys(start, end, dt), layer.qv.dequantize(dt, start, end))
    segment(layer.keys, layer.values)
    out = acc.result().reshape(b, h, tq, d)  # softmax statistics and accumulator stay fp32
    return out.transpose(1, 2).to(query.dtype)


def dense_grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact dense attention in the grouped form (no GQA repeat): the fast dense decode baseline on CPU.

    Same contract as :func:`reference_attention`; scores and softmax in fp32, matmuls in the input dtype.
    """
    b, h, tq, d = query.shape
    hkv = key.shape[1]
    rep = h // hkv
    q = query.reshape(b, hkv, rep * tq, d)
    scores = (q @ key.transpose(-1, -2)).float() * scaling  # (B, H_kv, rep·Tq, Tk)
    if mask is not None:
        m = mask.bool().unsqueeze(2).expand(b, 1, rep, tq, key.shape[-2]).reshape(b, 1, rep * tq, -1)
        scores = scores.masked_fill(~m, float("-inf"))
    out = torch.softmax(scores, -1).to(value.dtype) @ value  # (B, H_kv, rep·Tq, D)
    return out.reshape(b, h, tq, d).transpose(1, 2)
