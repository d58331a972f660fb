"""Decode attention over a quantized KV layer, dequantizing one chunk of tokens at a time.

Based on KIVI (Liu et al., arXiv 2402.02750), §3.3: attention over ``[quantized store | full-precision
window]`` splits into a part over the quantized tokens and a part over the exact ones. Here the
quantized part streams ``chunk_tokens`` tokens at a time and the parts are merged with an online
softmax (running max, running sum), so no full-length dequantized copy of the cache is ever built:
the extra memory is one chunk. :func:`reference_attention` is the plain path it is tested against.

GQA is handled by folding the query heads of each KV head into the query-token dim, which never
materialises the repeated keys (PROTOCOL ATTN-decode: the grouped form is the fast dense baseline).

Two paths read the store (same math up to fp rounding): ``"folded"`` (the default,
:mod:`compactlm.kernels.kv_decode`: scales folded into the query and the probabilities for uniform and
per-channel-width keys alike, metadata decoded once per span of chunks) and ``"chunked"`` (the earlier one:
per chunk, uniform keys folded, mixed-width and pre-RoPE keys dequantized then multiplied).
:func:`force_path` picks one for a block (tests, benchmarks). Pre-RoPE keys are dequantized and re-rotated
on both paths (RoPE mixes channel pairs, so their scales cannot fold into the query).
"""

from __future__ import annotations

import torch

from ..kernels.kv_decode import SPAN_CHUNKS, key_terms, span_key_scores, span_values
from ..utils import PathOverride
from .cache import QuantizedKVLayer
from .quantizer import QuantizedKV, hadamard, unpack_to

PATHS = ("folded", "chunked")
_PATH = PathOverride(PATHS)
force_path = _PATH.force  # run every quantized_decode_attention inside a block on one path


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

    def add(self, scores: torch.Tensor, v) -> None:
        """Merge a segment: ``scores`` (B, H_kv, n, t); ``v`` (B, H_kv, t, D) or a callable p -> p @ V (fp32)."""
        scores = scores.float()
        m_new = torch.maximum(self.m, scores.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # a fully masked row so far
        p = torch.exp(scores - safe)
        corr = torch.exp(self.m - safe)
        self.s = self.s * corr + p.sum(-1, keepdim=True)
        pv = v(p) if callable(v) else (p.to(v.dtype) @ v).float()
        self.acc = self.acc * corr + pv
        self.m = m_new

    def result(self) -> torch.Tensor:
        return self.acc / self.s


def _folded_key_scores(q: torch.Tensor, qk: QuantizedKV, start: int, end: int) -> torch.Tensor:
    """``q @ dequant(K[start:end])^T`` without dequantizing: per-channel scales fold into the query.

    score_t = Σ_d q_d (s_{g,d} c_{t,d} + z_{g,d}) = (q ⊙ s_g) · c_t + q · z_g (KIVI §3.3), so only
    the codes are expanded (one table lookup) and the scale/zero work is per group, not per token.
    """
    b, h, n, d = q.shape
    g = qk.group_size
    codes = unpack_to(qk.packed[..., start:end, :], qk.bits, q.dtype)  # (B, H, C, D)
    c = end - start
    scale, zero = qk.meta(start, end, q.dtype)  # (B, H, C/G, D) each
    qs = q.unsqueeze(2) * scale.unsqueeze(3)  # (B, H, C/G, n, D)
    scores = qs @ codes.view(b, h, c // g, g, d).transpose(-1, -2)  # (B, H, C/G, n, G)
    bias = (q @ zero.transpose(-1, -2)).float()  # (B, H, n, C/G)
    scores = scores.float().permute(0, 1, 3, 2, 4) + bias.unsqueeze(-1)  # (B, H, n, C/G, G)
    return scores.reshape(b, h, n, c)


def _folded_values(p: torch.Tensor, qv: QuantizedKV, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """``p @ dequant(V[start:end])`` with the per-token scales folded into ``p`` (B, H, n, C) -> fp32 (B, H, n, D)."""
    b, h, n, c = p.shape
    codes = unpack_to(qv.packed[..., start:end, :], qv.bits, dtype)  # (B, H, C, D)
    d = codes.shape[-1]
    gv = qv.group_size
    scale, zero = qv.meta(start, end, dtype)  # (B, H, C, D/Gv) each
    pd = p.to(dtype)
    ps = pd.unsqueeze(2) * scale.permute(0, 1, 3, 2).unsqueeze(3)  # (B, H, D/Gv, n, C)
    cv = codes.view(b, h, c, d // gv, gv).permute(0, 1, 3, 2, 4)  # (B, H, D/Gv, C, Gv)
    out = (ps @ cv).float().permute(0, 1, 3, 2, 4)  # (B, H, n, D/Gv, Gv)
    bias = (pd @ zero).float()  # (B, H, n, D/Gv)
    return (out + bias.unsqueeze(-1)).reshape(b, h, n, d)


def quantized_decode_attention(query: torch.Tensor, layer: QuantizedKVLayer, scaling: float,
                               mask: torch.Tensor | None = None, chunk_tokens: int | None = None,
                               path: str | None = None) -> torch.Tensor:
    """Attention of ``query`` (B, H, Tq, D) over everything ``layer`` holds -> (B, Tq, H, D).

    ``mask`` (B, 1, Tq, T_total) bool in cache order (sinks, store, window), or None. Chunks of the
    store are read in the query's dtype; softmax statistics and the accumulator stay fp32. ``path``:
    ``"folded"`` (default) or ``"chunked"`` (module docstring); :func:`force_path` overrides it.
    """
    path = _PATH.forced or path or "folded"
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    b, h, tq, d = query.shape
    hkv = layer.keys.shape[1]
    rep = h // hkv
    dt = query.dtype
    q = query.reshape(b, hkv, rep * tq, d) * scaling  # (B, H_kv, rep·Tq, D)
    acc = _Online(q)
    chunk = chunk_tokens or layer.cfg.chunk_tokens
    offset = 0

    def masked(scores: torch.Tensor) -> torch.Tensor:
        n = scores.shape[-1]
        if mask is None:
            return scores
        m = mask[:, :, :, offset: offset + n].bool()  # (B, 1, Tq, n)
        m = m.unsqueeze(2).expand(b, 1, rep, tq, n).reshape(b, 1, rep * tq, n)
        return scores.masked_fill(~m, float("-inf"))

    def exact(k: torch.Tensor, v: torch.Tensor) -> None:
        nonlocal offset
        if k.shape[-2]:
            acc.add(masked((q @ k.to(dt).transpose(-1, -2)).float()), v.to(dt))
            offset += k.shape[-2]

    rot = hadamard(d, query.device) if layer.cfg.value_rotation else None

    def rotate_back(pv: torch.Tensor) -> torch.Tensor:  # the store holds V·H (H symmetric orthonormal)
        return pv if rot is None else pv @ rot

    exact(layer.sink_k, layer.sink_v)
    if path == "folded":
        terms = None if layer.cfg.pre_rope or layer.qk is None else key_terms(q, layer.qk)
        span = chunk * SPAN_CHUNKS
        for start in range(0, layer.quantized_length, span):
            end = min(start + span, layer.quantized_length)
            if terms is None:  # pre-RoPE: dequantize and re-rotate each chunk of keys
                scores = torch.cat([(q @ layer.dequantized_keys(c, min(c + chunk, end), dt).transpose(-1, -2))
                                    .float() for c in range(start, end, chunk)], -1)
            else:
                scores = span_key_scores(q, layer.qk, *terms, start, end, chunk)
            acc.add(masked(scores), lambda p, s=start, e=end: rotate_back(span_values(p, layer.qv, s, e, chunk, dt)))
            offset += end - start
    else:
        for start in range(0, layer.quantized_length, chunk):
            end = min(start + chunk, layer.quantized_length)
            if layer.cfg.pre_rope or not isinstance(layer.qk, QuantizedKV):
                # RoPE mixes channel pairs, and mixed-width keys have no single code tensor: dequantize, then attend
                scores = (q @ layer.dequantized_keys(start, end, dt).transpose(-1, -2)).float()
            else:
                scores = _folded_key_scores(q, layer.qk, start, end)
            acc.add(masked(scores), lambda p, s=start, e=end: rotate_back(_folded_values(p, layer.qv, s, e, dt)))
            offset += end - start
    exact(layer.keys, layer.values)
    out = acc.result().reshape(b, h, tq, d)
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
