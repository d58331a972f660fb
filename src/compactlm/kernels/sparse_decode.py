"""Fused CPU decode step of sparse attention: latent scores, top-k, gather, rebuild + RoPE, exact attention.

The SALS decode step (arXiv 2510.24273, §4) for one layer and one new query token, written as a few large
tensor operations so that the bytes read are what the method promises: the latent scoring columns of
every cached token, then only the chosen tokens' latent rows (or full keys in ``index`` mode) and values.
Gathers go through ``index_select`` into preallocated buffers (:class:`DecodeBuffers`): measured here,
``torch.gather`` and fresh output tensors cost 2-3x more at 32K-64K tokens.

The plain reference of every function is in :mod:`compactlm.kernels.reference`; tests compare the two.
RoPE follows the ``rotate_half`` convention that every supported family (Llama, Qwen, Mistral, Gemma 3) uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention.selection import pool_heads, topk_blocks, topk_tokens


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE with per-element ``cos``/``sin`` broadcastable to ``x``."""
    return torch.addcmul(x * cos, rotate_half(x), sin)


def unrope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert :func:`rope`: rotate back by -θ and undo any attention scaling folded into cos/sin."""
    norm = cos * cos + sin * sin  # 1 for plain RoPE; s² where the family scales cos and sin by s
    return torch.addcmul(x * cos, rotate_half(x), -sin) / norm


@dataclass
class DecodeBuffers:
    """Preallocated gather outputs, reused across decode steps while shapes allow (grown on demand)."""

    store: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        buf = self.store.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self.store[name] = buf
        return buf[:numel].view(shape)


def _flat_index(idx: torch.Tensor, length: int, per_head: bool) -> torch.Tensor:
    """Slot indices (B, H_kv, n) -> row indices into a flattened (B·[H_kv·]L, ·) source."""
    b, h, _ = idx.shape
    if per_head:
        offs = (torch.arange(b * h, device=idx.device) * length).view(b, h, 1)
    else:
        offs = (torch.arange(b, device=idx.device) * length).view(b, 1, 1)
    return (idx + offs).reshape(-1)


def gather_heads(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of per-head ``src`` (B, H_kv, L, D) at ``idx`` (B, H_kv, n) -> (B, H_kv, n, D)."""
    b, h, length, d = src.shape
    flat = src.reshape(b * h * length, d) if src.is_contiguous() else src.flatten(0, 2)
    rows = _flat_index(idx, length, per_head=True)
    if out is None:
        return flat.index_select(0, rows).view(b, h, idx.shape[-1], d)
    torch.index_select(flat, 0, rows, out=out.view(-1, d))
    return out


def gather_shared(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of head-shared ``src`` (B, L, R) (the joint latent) at ``idx`` (B, H_kv, n) -> (B, H_kv, n, R)."""
    b, length, r = src.shape
    rows = _flat_index(idx, length, per_head=False)
    flat = src.reshape(b * length, r)
    if out is None:
        return flat.index_select(0, rows).view(b, idx.shape[1], idx.shape[2], r)
    torch.index_select(flat, 0, rows, out=out.view(-1, r))
    return out


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of grouped queries without materialising the GQA repeat.

    q (B, H_kv, G, D), k/v (B, H_kv, n, D), valid (B, H_kv, n) or (B, 1, n) bool -> (B, H_kv, G, D).
    Softmax in fp32.
    """
    s = torch.matmul(q, k.transpose(-1, -2))  # (B, H_kv, G, n)
    s = (s.float() if s.element_size() < 4 else s) * scaling
    if valid is not None:
        s.masked_fill_(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.matmul(p, v)


@dataclass(frozen=True)
class PackedValues:
    """Per-token quantized values (KIVI layout, :mod:`compactlm.kv.quantizer`): only chosen rows are dequantized.

    packed (B, H_kv, L, D·bits/8) uint8; scale/zero (B, H_kv, L, D/group).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int

    def gather(self, idx: torch.Tensor, dtype: torch.dtype, buffers: DecodeBuffers) -> torch.Tensor:
        from ..kv.quantizer import dequantize_groups, unpack_codes

        b, hkv, n = idx.shape
        packed = gather_heads(self.packed, idx, buffers.get("vq", (b, hkv, n, self.packed.shape[-1]), torch.uint8,
                                                           idx.device))
        scale = gather_heads(self.scale, idx)
        zero = gather_heads(self.zero, idx)
        return dequantize_groups(unpack_codes(packed, self.bits), scale, zero, self.group, -1, dtype)


@dataclass(frozen=True)
class ExactKeys:
    """Exact post-RoPE keys a compressed SALS cache keeps for a few slots, to replace their latent rebuild.

    ``keys`` (B, H_kv, S + R, D): rows 0..S-1 are the sink tokens, whose slots are ``sink_slot`` (B, S) (-1 where
    a row has no such token yet); rows S + (slot mod R) are a ring holding the last R slots of a cache of
    ``length`` slots. Memory is constant in the context length.
    """

    keys: torch.Tensor
    sink_slot: torch.Tensor
    recent: int
    length: int

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Row of ``keys`` holding each chosen slot of idx (B, H_kv, n), or -1 where only the latent has it."""
        sinks = self.sink_slot.shape[-1]
        rows = torch.full_like(idx, -1)
        if self.recent:
            rows = torch.where(idx >= self.length - self.recent, sinks + idx % self.recent, rows)
        if sinks:
            eq = idx[..., None] == self.sink_slot[:, None, None, :]  # (B, H_kv, n, S): S is small
            rows = torch.where(eq.any(-1), eq.to(torch.int32).argmax(-1), rows)
        return rows

    def apply(self, k_sel: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """k_sel (B, H_kv, n, D) rebuilt keys of slots idx, with the exactly kept ones swapped in."""
        rows = self.rows(idx)
        exact = gather_heads(self.keys, rows.clamp(min=0))
        return torch.where((rows >= 0)[..., None], exact.to(k_sel.dtype), k_sel)


@dataclass(frozen=True)
class SelectParams:
    """How one decode step chooses tokens (a view of the method config, resolved to counts)."""

    k: int  # tokens chosen by score (beyond sink and recent)
    sink: int
    recent: int
    pool: str = "max"
    block: int = 1
    block_reduce: str = "max"


def select(pooled: torch.Tensor, p: SelectParams, positions: torch.Tensor | None,
           valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token slots (B, H_kv, n) from pooled scores (B, H_kv, L): token or block top-k, plus sink and recent.

    Also returns a (B, H_kv, n) mask of slots to attend (None = all): block selection pads the last block.
    """
    if p.block > 1:
        return topk_blocks(pooled, p.k, p.block, p.block_reduce, p.sink, p.recent, positions, valid)
    return topk_tokens(pooled, p.k, p.sink, p.recent, positions, valid), None


def selected_valid(valid: torch.Tensor | None, idx: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor | None:
    """Mask (B, H_kv, n) of chosen slots that are real tokens and in range."""
    b, hkv, n = idx.shape
    sel = None if valid is None else valid.gather(1, idx.view(b, -1)).view(b, hkv, n)
    if ok is None:
        return sel
    return ok if sel is None else sel & ok


def latent_scores(q_pre: torch.Tensor, proj_score: torch.Tensor, z_score: torch.Tensor,
                  mean_over_group: bool = False) -> torch.Tensor:
    """SALS latent scores: pre-RoPE queries projected to latent space against latent keys.

    q_pre (B, H_kv, G, D); proj_score (H_kv, D, r*) = the rows of the joint projection that belong to each
    KV head, first r* columns; z_score (B, L, r*) -> (B, H_kv, G, L), or (B, H_kv, 1, L) with
    ``mean_over_group``: scores are linear in q, so the group mean is the score of the mean latent query
    (G times fewer multiply-adds, one GEMM with M = H_kv over the head-shared latent).
    """
    b, hkv, g, d = q_pre.shape
    q_lat = torch.matmul(q_pre, proj_score)  # (B, H_kv, G, r*): per head, q·U_h
    if mean_over_group:
        q_lat = q_lat.mean(2, keepdim=True)
    s = torch.matmul(q_lat.reshape(b, -1, q_lat.shape[-1]), z_score.transpose(1, 2))  # (B, H_kv·G', L)
    return s.view(b, hkv, q_lat.shape[2], -1)


def sals_decode(q: torch.Tensor, q_cos: torch.Tensor, q_sin: torch.Tensor, latent: torch.Tensor,
                values: torch.Tensor | PackedValues, positions: torch.Tensor, proj: torch.Tensor, r_star: int,
                cos_table: torch.Tensor, sin_table: torch.Tensor, params: SelectParams, scaling: float,
                valid: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                buffers: DecodeBuffers | None = None, exact: ExactKeys | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SALS decode step for one layer -> (out (B, 1, H, D), chosen slots (B, H_kv, n)).

    q (B, H, 1, D) post-RoPE query and its q_cos/q_sin (B, 1, D); latent (B, L, r) joint latent keys;
    values (B, H_kv, L, D) or :class:`PackedValues`; positions (B, L) RoPE positions of the slots;
    proj (H_kv, D, r) the joint projection split per KV head; cos/sin_table (P, D) RoPE rows by position;
    ``keys`` (B, H_kv, L, D) post-RoPE keys in ``index`` mode (then nothing is rebuilt); ``exact``: keys kept
    exactly for sink and recent slots in ``compressed`` mode, used instead of their rebuild.
    """
    b, h, _, d = q.shape
    hkv = proj.shape[0]
    g = h // hkv
    buffers = buffers or DecodeBuffers()
    q_g = q.view(b, hkv, g, d)
    # Score in the pre-RoPE latent space: undo the query's rotation (RoPE-free q·k, §4.2).
    q_pre = unrope(q_g, q_cos[:, None], q_sin[:, None])
    mean = params.pool == "mean"
    scores = latent_scores(q_pre, proj[:, :, :r_star], latent[:, :, :r_star], mean_over_group=mean)
    pooled = scores[:, :, 0] if mean else pool_heads(scores, params.pool, scaling)
    idx, ok = select(pooled, params, positions, valid)  # (B, H_kv, n)
    n = idx.shape[-1]
    if keys is not None:
        k_sel = gather_heads(keys, idx, buffers.get("k", (b, hkv, n, d), keys.dtype, keys.device))
    else:
        z_sel = gather_shared(latent, idx, buffers.get("z", (b, hkv, n, latent.shape[-1]), latent.dtype,
                                                         latent.device))
        k_pre = torch.matmul(z_sel, proj.transpose(1, 2))  # (B, H_kv, n, D): rebuild only the chosen keys
        pos = positions.gather(1, idx.view(b, -1)).view(-1)
        cos = cos_table.index_select(0, pos).view(b, hkv, n, d)
        sin = sin_table.index_select(0, pos).view(b, hkv, n, d)
        k_sel = rope(k_pre, cos, sin)
        if exact is not None:
            k_sel = exact.apply(k_sel, idx)
    if isinstance(values, PackedValues):
        v_sel = values.gather(idx, q.dtype, buffers)
    else:
        v_sel = gather_heads(values, idx, buffers.get("v", (b, hkv, n, d), values.dtype, values.device))
    out = grouped_attention(q_g, k_sel.to(q.dtype), v_sel, scaling, selected_valid(valid, idx, ok))  # (B, H_kv, G, D)
    return out.reshape(b, h, 1, d).transpose(1, 2), idx


def dense_grouped_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Dense decode attention as grouped matmul-softmax-matmul (the ATTN-decode baseline): (B, H, 1, D) each."""
    b, h, _, d = q.shape
    hkv = keys.shape[1]
    return grouped_attention(q.view(b, hkv, h // hkv, d), keys, values, scaling).reshape(b, h, 1, d)


def sparse_gather_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                         scaling: float, valid: torch.Tensor | None = None,
                         buffers: DecodeBuffers | None = None, ok: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention over chosen slots idx (B, H_kv, n) of full keys/values -> (B, 1, H, D) (baselines)."""
    b, h, _, d = q.shape
    hkv = keys.shape[1]
    n = idx.shape[-1]
    buffers = buffers or DecodeBuffers()
    k_sel = gather_heads(keys, idx, buffers.get("k", (b, hkv, n, d), keys.dtype, keys.device))
    v_sel = gather_heads(values, idx, buffers.get("v", (b, hkv, n, d), values.dtype, values.device))
    out = grouped_attention(q.view(b, hkv, h // hkv, d), k_sel, v_sel, scaling, selected_valid(valid, idx, ok))
    return out.reshape(b, h, 1, d).transpose(1, 2)
