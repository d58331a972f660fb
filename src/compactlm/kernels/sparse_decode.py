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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attention.selection import pool_heads, topk_blocks, topk_tokens
from ..errors import ConfigError


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


DECODE_IMPLS = ("auto", "torch", "triton", "cpu")


@dataclass
class DecodeBuffers:
    """Preallocated gather outputs, reused across decode steps while shapes allow (grown on demand)."""

    store: dict[str, torch.Tensor] = field(default_factory=dict)
    derived_store: dict[str, tuple[torch.Tensor, int, Any, torch.Tensor]] = field(default_factory=dict)

    def derived(self, name: str, source: torch.Tensor, key: Any, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, computed once while ``source`` is the same tensor object, unmodified, and ``key`` the same.

        For per-layer constants such as the projection's contiguous scoring columns: copying that strided slice
        each step took 0.3 ms of the 0.49 ms the latent queries cost at ATTN-decode shapes (32K, after a dense
        step; 0.19 ms with the copy cached). Holding the source itself, not its address, keeps a freed and
        reallocated tensor from passing for it.
        """
        hit = self.derived_store.get(name)
        if hit is not None and hit[0] is source and hit[1] == source._version and hit[2] == key:
            return hit[3]
        out = make()
        self.derived_store[name] = (source, source._version, key, out)
        return out

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        buf = self.store.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self.store[name] = buf
        return buf[:numel].view(shape)


def _row_view(src: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A 2-D (rows, D) view of ``src`` (..., L, D) without copying, and the row stride of each leading dim.

    Why not ``reshape``: the caches hand out ``[:, :, :length]`` slices of buffers with spare capacity, which are
    not contiguous, and ``reshape`` would then copy the whole cache on every decode step. Rows of such a slice
    sit at a fixed stride in the buffer, so one strided view over it serves every gather. Falls back to one
    contiguous copy only when rows themselves are not contiguous.
    """
    d = src.shape[-1]
    if src.stride(-1) != 1 or src.stride(-2) != d or any(st % d for st in src.stride()[:-2]):
        src = src.contiguous()
    lead = [st // d for st in src.stride()[:-2]]
    rows = sum((n - 1) * st for n, st in zip(src.shape[:-2], lead, strict=True)) + src.shape[-2]
    return src.as_strided((rows, d), (d, 1)), lead


def _flat_rows(idx: torch.Tensor, lead: list[int], per_head: bool) -> torch.Tensor:
    """Slot indices (B, H_kv, n) -> row indices into :func:`_row_view` of a (B, [H_kv,] L, ·) source."""
    b, h, _ = idx.shape
    offs = (torch.arange(b, device=idx.device) * lead[0]).view(b, 1, 1)
    if per_head:
        offs = offs + (torch.arange(h, device=idx.device) * lead[1]).view(1, h, 1)
    return (idx + offs).reshape(-1)


def gather_heads(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of per-head ``src`` (B, H_kv, L, D) at ``idx`` (B, H_kv, n) -> (B, H_kv, n, D)."""
    flat, lead = _row_view(src)
    rows = _flat_rows(idx, lead, per_head=True)
    if out is None:
        return flat.index_select(0, rows).view(*idx.shape, flat.shape[-1])
    torch.index_select(flat, 0, rows, out=out.view(-1, flat.shape[-1]))
    return out


def gather_shared(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of head-shared ``src`` (B, L, R) (the joint latent) at ``idx`` (B, H_kv, n) -> (B, H_kv, n, R)."""
    flat, lead = _row_view(src)
    rows = _flat_rows(idx, lead, per_head=False)
    if out is None:
        return flat.index_select(0, rows).view(*idx.shape, flat.shape[-1])
    torch.index_select(flat, 0, rows, out=out.view(-1, flat.shape[-1]))
    return out


def weighted_rows(p: torch.Tensor, src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Σ_i p[..., i] · src[b, h, idx[b, h, i]]: p (B, H_kv, G, n), src (B, H_kv, L, D) -> (B, H_kv, G, D).

    The value half of attention over chosen slots, fused with their gather: ``embedding_bag`` reads each chosen
    row once per query head straight from the cache, instead of copying the rows out and reading the copy back
    (measured here at 32K, bf16, 1 thread: 1.2 ms vs 2.6 ms for index_select + bmm).
    """
    b, hkv, g, n = p.shape
    flat, lead = _row_view(src)
    rows = _flat_rows(idx, lead, per_head=True).view(b, hkv, 1, n).expand(b, hkv, g, n).reshape(-1)
    offsets = torch.arange(0, b * hkv * g * n, n, device=p.device)
    out = torch.nn.functional.embedding_bag(rows, flat, offsets, mode="sum",
                                            per_sample_weights=p.to(flat.dtype).reshape(-1))
    return out.view(b, hkv, g, flat.shape[-1])


def _chosen_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, valid: torch.Tensor | None) -> torch.Tensor:
    """Softmax (fp32) of q (B, H_kv, G, D) against keys k (B, H_kv, n, D), masked by valid (B, H_kv|1, n)."""
    s = torch.matmul(q, k.transpose(-1, -2))  # (B, H_kv, G, n)
    s = (s.float() if s.element_size() < 4 else s) * scaling
    if valid is not None:
        s.masked_fill_(~valid[:, :, None, :], float("-inf"))
    return torch.softmax(s, dim=-1)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of grouped queries without materialising the GQA repeat.

    q (B, H_kv, G, D), k/v (B, H_kv, n, D), valid (B, H_kv, n) or (B, 1, n) bool -> (B, H_kv, G, D).
    Softmax in fp32.
    """
    return torch.matmul(_chosen_probs(q, k, scaling, valid).to(v.dtype), v)


def chosen_attention(q: torch.Tensor, k_sel: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, scaling: float,
                     valid: torch.Tensor | None = None, v_sel: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of grouped queries q (B, H_kv, G, D) over chosen slots idx (B, H_kv, n) -> (B, H_kv, G, D).

    ``k_sel`` (B, H_kv, n, D) are the chosen keys; values are read from the whole cache ``values``
    (B, H_kv, L, D) at ``idx`` by :func:`weighted_rows`, unless the caller already has them as ``v_sel``.
    """
    if v_sel is not None:
        return grouped_attention(q, k_sel, v_sel, scaling, valid)
    return weighted_rows(_chosen_probs(q, k_sel, scaling, valid), values, idx).to(q.dtype)


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
    KV head, first r* columns; z_score (B, L, r*) -> (B, L, G, H_kv), or (B, L, 1, H_kv) with
    ``mean_over_group``: scores are linear in q, so the group mean is the score of the mean latent query
    (G times fewer multiply-adds).

    Why token-major: ``z @ q_latᵀ`` (M = L) streams the latent rows once and reads the ``[..., :r*]`` slice of
    the cache in place; the transposed product ``q_lat @ zᵀ`` ran 4-6x slower here at 32K tokens (bf16, 1
    thread). Columns are ordered (G, H_kv) so that pooling over G combines contiguous (L, H_kv) slices.
    """
    b, hkv = q_pre.shape[:2]
    cols = latent_queries(q_pre, proj_score, mean_over_group)  # (B, G'·H_kv, r*)
    return torch.matmul(z_score, cols.transpose(1, 2)).view(b, -1, cols.shape[1] // hkv, hkv)


def latent_queries(q_pre: torch.Tensor, proj_score: torch.Tensor, mean_over_group: bool = False) -> torch.Tensor:
    """Latent queries q·U_h of q_pre (B, H_kv, G, D) -> (B, G'·H_kv, r*), rows ordered (G', H_kv) (G' = 1: mean)."""
    b, hkv = q_pre.shape[:2]
    # proj_score is a column slice of the projection: a contiguous copy (r*·D·H_kv elements) made the bf16 product
    # 10x faster here (0.03 vs 0.32 ms at 8 x 128 x 128) with bit-identical results.
    q_lat = torch.matmul(q_pre, proj_score.contiguous())  # (B, H_kv, G, r*): per head, q·U_h
    if mean_over_group:
        q_lat = q_lat.mean(2, keepdim=True)
    return q_lat.transpose(1, 2).reshape(b, q_lat.shape[2] * hkv, q_lat.shape[-1])


def pooled_latent_scores(q_pre: torch.Tensor, proj_score: torch.Tensor, z_score: torch.Tensor, pool: str,
                         scaling: float) -> torch.Tensor:
    """Latent scores pooled over each KV head's query heads (as :func:`pool_heads`) -> (B, H_kv, L), contiguous."""
    if pool == "softmax":  # a softmax over tokens per query head needs the head-major layout
        return pool_heads(latent_scores(q_pre, proj_score, z_score).permute(0, 3, 2, 1).contiguous(), pool, scaling)
    if pool not in ("max", "mean"):
        raise ConfigError(f"pool={pool!r} is not a head pooling; use 'max', 'mean' or 'softmax'")
    s = latent_scores(q_pre, proj_score, z_score, mean_over_group=pool == "mean")  # (B, L, G', H_kv)
    pooled = s[:, :, 0]
    if s.shape[2] > 1:  # max over G as a chain of elementwise maxima: 4x faster than amax over a size-G dim
        pooled = torch.maximum(pooled, s[:, :, 1])
        for j in range(2, s.shape[2]):
            torch.maximum(pooled, s[:, :, j], out=pooled)
    return pooled.transpose(1, 2).contiguous()


def sals_decode(q: torch.Tensor, q_cos: torch.Tensor, q_sin: torch.Tensor, latent: torch.Tensor,
                values: torch.Tensor | PackedValues, positions: torch.Tensor, proj: torch.Tensor, r_star: int,
                cos_table: torch.Tensor, sin_table: torch.Tensor, params: SelectParams, scaling: float,
                valid: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                buffers: DecodeBuffers | None = None, exact: ExactKeys | None = None, impl: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SALS decode step for one layer -> (out (B, 1, H, D), chosen slots (B, H_kv, n)).

    q (B, H, 1, D) post-RoPE query and its q_cos/q_sin (B, 1, D); latent (B, L, r) joint latent keys;
    values (B, H_kv, L, D) or :class:`PackedValues`; positions (B, L) RoPE positions of the slots;
    proj (H_kv, D, r) the joint projection split per KV head; cos/sin_table (P, D) RoPE rows by position;
    ``keys`` (B, H_kv, L, D) post-RoPE keys in ``index`` mode (then nothing is rebuilt); ``exact``: keys kept
    exactly for sink and recent slots in ``compressed`` mode, used instead of their rebuild.
    ``impl``: ``"torch"`` (these tensor ops), ``"triton"`` (:mod:`.sparse_decode_triton`, one fused launch after
    the selection), ``"cpu"`` (:mod:`.sparse_decode_cpu`: compiled pooled top-k, and in ``index`` mode with
    full-precision values one select-gather-attend pass; built on first use, a build failure raises) or
    ``"auto"``: Triton on CUDA tensors where it applies (full-precision values, no exact keys), else ``"torch"``.
    """
    if impl not in DECODE_IMPLS:
        raise ConfigError(f"impl={impl!r}: choose one of {', '.join(DECODE_IMPLS)}")
    b, h, _, d = q.shape
    hkv = proj.shape[0]
    g = h // hkv
    buffers = buffers or DecodeBuffers()
    q_g = q.view(b, hkv, g, d)
    proj_score = buffers.derived("proj_score", proj, r_star, lambda: proj[:, :, :r_star].contiguous())
    fused_ok = exact is None and not isinstance(values, PackedValues)
    if impl == "cpu":
        from . import sparse_decode_cpu as cpu

        if q.is_cuda:
            raise ConfigError("impl='cpu' runs on CPU tensors; use impl='auto' or 'triton' on CUDA")
        idx, ok = cpu.sals_select_cpu(q_g, q_cos, q_sin, proj_score, latent[:, :, :r_star], params, positions, valid,
                                      buffers), None
        if keys is not None and not isinstance(values, PackedValues):  # index mode: read chosen rows in place
            out = cpu.attend_chosen(q_g, keys.to(q.dtype), values, idx, scaling, selected_valid(valid, idx, ok))
            return out.reshape(b, h, 1, d).transpose(1, 2), idx
    else:
        # Score in the pre-RoPE latent space: undo the query's rotation (RoPE-free q·k, §4.2).
        q_pre = unrope(q_g, q_cos[:, None], q_sin[:, None])
        pooled = pooled_latent_scores(q_pre, proj_score, latent[:, :, :r_star], params.pool, scaling)
        idx, ok = select(pooled, params, positions, valid)  # (B, H_kv, n)
    if impl == "triton" and not fused_ok:
        raise ConfigError("impl='triton' handles full-precision values without exact sink/recent keys; "
                          "use impl='torch' or 'auto' for this cache")
    if impl == "triton" or (impl == "auto" and fused_ok and q.is_cuda):
        from .sparse_decode_triton import sals_attend_triton

        out = sals_attend_triton(q_g, idx, values, scaling, selected_valid(valid, idx, ok), keys=keys, latent=latent,
                                 proj=proj, positions=positions, cos_table=cos_table, sin_table=sin_table)
        return out.reshape(b, h, 1, d).transpose(1, 2), idx
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
    v_sel = values.gather(idx, q.dtype, buffers) if isinstance(values, PackedValues) else None
    out = chosen_attention(q_g, k_sel.to(q.dtype), values, idx, scaling, selected_valid(valid, idx, ok), v_sel)
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
    out = chosen_attention(q.view(b, hkv, h // hkv, d), k_sel, values, idx, scaling, selected_valid(valid, idx, ok))
    return out.reshape(b, h, 1, d).transpose(1, 2)
