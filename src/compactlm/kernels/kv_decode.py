"""Decode attention over a quantized KV store with every scale folded out of the code tensors (CPU, eager).

Based on KIVI (Liu et al., arXiv 2402.02750), §3.3: with keys quantized per channel (scale ``s``, zero ``z``
per group of G tokens and channel) and values per token (per group of Gv channels),

    q · k_t = Σ_d (q_d s_{g,d}) c_{t,d} + Σ_d q_d z_{g,d}        p · V_j = Σ_t (p_t s_{t,j}) c_{t,j} + Σ_t p_t z_{t,j}

so the codes ``c`` are only expanded (one table lookup per byte, ``quantizer.unpack_to``) and multiplied as
they are: the scales go into the query (per group) and into the probabilities (per token), the zero terms are
one score per key group and one output per value group. No dequantized key or value is ever built.

Per-channel key widths (:class:`compactlm.kv.key_bits.MixedKeyStore`, ``--kv int2-mixed``): each width class
is a :class:`QuantizedKV` over gathered channels of every KV head. Its query is the block-diagonal gather
``Q_w[h·n + i, j] = q[h, i, d(j)]`` if channel ``j`` belongs to head ``h``, else 0 (``(H_kv·n, n_w)``), so one
product per class gives every head's partial scores; the 0-bit class (group means) adds one term per group.
The old path dequantized the chunk, scattered the classes back into channel order and multiplied: 130 of
its 433 CPU-ms per 8K step went to that dequantize-and-scatter (``benchmarks/results/kv/``).

The store is read in spans of :data:`SPAN_CHUNKS` chunks: the metadata of a span is decoded in one pass
(the 1-byte format costs ~15 small ops per decode, which at one query token cost more than its arithmetic),
codes at most one chunk of the layer's keys (``chunk × H_kv·D`` codes) or values at a time — a narrow key width
class in longer pieces — and the span's scores (``H·n × span`` fp32) go through one online-softmax update.
Working memory beyond the scores: one chunk's worth of codes and the decoded metadata of one span.
:func:`compactlm.kv.attention.reference_attention` is the plain path the tests hold this to.
"""

from __future__ import annotations

import torch

from ..kv.fit import decode_meta4
from ..kv.key_bits import MixedKeyStore
from ..kv.quantizer import QuantizedKV, unpack_to

SPAN_CHUNKS = 8  # chunks whose metadata is decoded together (8 × 1,024 tokens by default)

# one key term: (query rows (B, Hs, R, width) in the store's channel order, the store of that width)
KeyTerm = tuple[torch.Tensor, QuantizedKV]


def key_terms(q: torch.Tensor, qk: QuantizedKV | MixedKeyStore) -> tuple[list[KeyTerm], torch.Tensor | None]:
    """The query rows each key store is multiplied by, and the rows of the 0-bit class (or None).

    ``q`` (B, H_kv, n, D), already scaled. A uniform store is per head (rows = ``q``); a mixed store's
    classes hold gathered channels of all heads in one (B, 1, T, width) tensor, so their rows are the
    block-diagonal gather (B, 1, H_kv·n, width), zero on the padding channels that fill the last byte.
    """
    if isinstance(qk, QuantizedKV):
        return [(q, qk)], None
    b, hkv, n, d = q.shape
    eye = torch.eye(hkv, dtype=q.dtype, device=q.device)
    block = (q.unsqueeze(3) * eye[:, None, :, None]).reshape(b, 1, hkv * n, hkv * d)  # (B, 1, R, H_kv·D)
    terms = []
    for w, store in qk.stores.items():
        rows = block.index_select(-1, qk.channels[w])  # (B, 1, R, n_w)
        pad = store.packed.shape[-1] * (8 // store.bits) - rows.shape[-1]
        terms.append((torch.nn.functional.pad(rows, (0, pad)) if pad else rows, store))
    rows0 = block.index_select(-1, qk.channels[0]) if qk.means is not None else None
    return terms, rows0


def span_key_scores(q: torch.Tensor, qk: QuantizedKV | MixedKeyStore, terms: list[KeyTerm],
                    rows0: torch.Tensor | None, start: int, end: int, chunk: int) -> torch.Tensor:
    """Scores ``q · k_t`` of the stored keys ``[start, end)`` (group edges) -> fp32 (B, H_kv, n, end-start)."""
    b, hkv, n, d = q.shape
    dt = q.dtype
    g = qk.group_size
    hs, r = terms[0][0].shape[1:3] if terms else (1, hkv * n)
    groups, t = (end - start) // g, end - start
    bias = torch.zeros(b, hs, groups, r, dtype=torch.float32, device=q.device)
    folded = []
    for rows, store in terms:
        scale, zero = store.meta(start, end, torch.float32)  # (B, Hs, groups, width)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # as dequantize_groups reads them
        rows_f = rows.float()  # (B, Hs, R, width)
        # the scales folded into the query, once per group, in fp32 and cast once for the bf16 products
        folded.append(((scale.unsqueeze(-2) * rows_f.unsqueeze(2)).to(dt), store))  # (B, Hs, groups, R, width)
        bias += zero @ rows_f.transpose(-1, -2)  # Σ_d q_d z_{g,d}: (B, Hs, groups, R)
    if rows0 is not None:  # 0-bit channels: every token of a group reads the group mean
        bias += qk.means[..., start // g: end // g, :].float() @ rows0.float().transpose(-1, -2)
    out = bias.unsqueeze(-1).repeat(1, 1, 1, 1, g)  # (B, Hs, groups, R, G), a copy
    for qs, store in folded:
        width = qs.shape[-1]
        # a piece expands at most one chunk of the layer's keys (chunk × H_kv·D codes), as the chunked path's
        # dequantized chunk did: a narrow width class (the 4-bit one) is read in fewer, longer pieces
        piece = max(g, chunk * hkv * d // (hs * width) // g * g)
        for c0 in range(start, end, piece):
            c1 = min(c0 + piece, end)
            gs = slice((c0 - start) // g, (c1 - start) // g)
            codes = unpack_to(store.packed[..., c0:c1, :], store.bits, dt)  # (B, Hs, C, width)
            part = out[:, :, gs]  # a view: `out[...] += x` would also copy the sum back onto itself
            part += qs[:, :, gs] @ codes.view(b, hs, -1, g, width).transpose(-1, -2)  # (.., C/G, R, G)
    return out.permute(0, 1, 3, 2, 4).reshape(b, hkv, n, t)  # Hs·R = H_kv·n rows, head-major either way


def token_meta(qv: QuantizedKV, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(scale, zero)`` (B, H, T, D/Gv) of the values ``[start, end)``, as ``qv.meta`` decodes them.

    The 1-byte format has a few rows (channel groups) per head and one byte per token and row, so its
    decode runs once over the 256 possible bytes of each row (``decode_meta4``, the same elementwise
    formula, so the same floats) and each token's byte looks its pair up: one gather instead of ~15
    elementwise passes over every token.
    """
    if not qv.meta4 or end - start <= 256:
        return qv.meta(start, end, torch.float32)
    codes = qv.scale[..., start:end, :]  # (B, H, T, rows) uint8
    every = torch.arange(256, device=codes.device, dtype=torch.uint8).view(1, 1, 256, 1)
    pair = torch.stack(decode_meta4(every, qv.zero, torch.float32), -1)  # (B, H, 256, rows, 2): scale, zero
    both = pair.view(torch.int64).squeeze(-1).gather(2, codes.long()).unsqueeze(-1).view(torch.float32)  # one gather
    return both[..., 0], both[..., 1]


def span_values(p: torch.Tensor, qv: QuantizedKV, start: int, end: int, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
    """``p @ V[start:end]`` for probabilities ``p`` fp32 (B, H, n, end-start) -> fp32 (B, H, n, D)."""
    b, h, n, _ = p.shape
    gv = qv.group_size
    d = qv.packed.shape[-1] * (8 // qv.bits)
    scale, zero = token_meta(qv, start, end)  # (B, H, T, D/Gv)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).transpose(-1, -2).contiguous()  # (B, H, D/Gv, T)
    bias = p @ zero  # Σ_t p_t z_{t,j}: (B, H, n, D/Gv)
    # the scales folded into p: (B, H, D/Gv·n, T), row j·n + i = p_i scaled for channel group j
    ps = (scale.unsqueeze(3) * p.unsqueeze(2)).to(dtype).view(b, h, -1, end - start)
    acc = torch.zeros(b, h, d // gv * n, d, dtype=torch.float32, device=p.device)
    for c0 in range(start, end, chunk):
        c1 = min(c0 + chunk, end)
        codes = unpack_to(qv.packed[..., c0:c1, :], qv.bits, dtype)  # (B, H, C, D)
        # every group's rows against all D channels (2x the products of per-group blocks, but one contiguous GEMM)
        acc += ps[..., c0 - start: c1 - start] @ codes
    blocks = acc.view(b, h, d // gv, n, d // gv, gv).diagonal(dim1=2, dim2=4)  # (B, H, n, Gv, D/Gv): group j's own
    return (blocks.permute(0, 1, 2, 4, 3) + bias.unsqueeze(-1)).reshape(b, h, n, d)  # (B, H, n, D/Gv, Gv) -> D
