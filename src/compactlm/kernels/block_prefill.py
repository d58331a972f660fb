"""Block-sparse causal prefill attention: compute only the chosen (query block, KV block) tiles.

The block layout says, for every query block of ``block`` tokens and every KV head, which KV blocks it
attends to. Three implementations of the same contract, compared in ``tests/kernels/test_block_prefill.py``:

- :func:`block_attention_reference`: plain PyTorch, online softmax over the kept blocks of one query
  block at a time; it never builds the dense (T, T) score matrix (at most one row strip of kept keys).
- :func:`block_attention_flex`: compiled FlexAttention fed a ``BlockMask.from_kv_blocks`` built from the
  layout's indices (the fast CPU path; a Python ``mask_mod`` evaluated over 16K x 16K positions exhausts
  memory, see FACTS.md). Off-diagonal kept blocks are "full" blocks, the diagonal is the only partial one.
- :func:`.block_prefill_gather.block_attention_gather`: "gather then dense" on CPU: the kept blocks of a run
  of query blocks are gathered into one contiguous K/V run and attended with ATen's mask-free CPU flash
  kernel, the causal diagonal in one batched call, the two merged by their log-sum-exps (``auto`` on CPU).
- :func:`block_attention_triton`: a Triton kernel (FlashAttention-2 style loop, arXiv 2307.08691 §3.1,
  restricted to the listed KV blocks as in MInference's block-sparse kernel, arXiv 2407.02490 §3.2).
  Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests), where ``tl.dot`` is upcast to
  fp32 because the interpreter multiplies bf16 wrongly.

Shapes: ``q`` (B, H, Tq, D); ``k``/``v`` (B, H_kv, Tk, D) with H a multiple of H_kv (GQA); queries sit at
absolute positions ``Tk - Tq .. Tk - 1`` (prefill, or one chunk of a chunked prefill), so query ``i`` may
see key ``j`` iff ``j <= Tk - Tq + i``. Output (B, H, Tq, D).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class BlockLayout:
    """Which KV blocks each query block reads, per KV head (run data, not a config).

    ``kv_indices`` (B, H_kv, NQB, M) int32: kept KV block indices, ascending, valid entries first, the
    diagonal block (the one holding the query block's own positions) last; ``kv_counts`` (B, H_kv, NQB)
    int32: how many entries are valid. Query block ``m`` covers queries ``m*block - pad`` onward, where
    ``pad = q_offset % block`` aligns query blocks to absolute positions.
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    block: int
    q_len: int
    kv_len: int

    @property
    def q_offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def pad(self) -> int:  # queries prepended so that query blocks start at multiples of ``block``
        return self.q_offset % self.block

    def computed_blocks(self) -> int:
        return int(self.kv_counts.sum())

    def causal_blocks(self) -> int:
        """Blocks a dense causal kernel computes for the same shape (the denominator of block_fraction)."""
        nqb = self.kv_counts.shape[-1]
        first = self.q_offset // self.block
        per_row = torch.arange(first, first + nqb) + 1
        return int(per_row.sum()) * self.kv_counts.shape[0] * self.kv_counts.shape[1]

    def block_fraction(self) -> float:
        return self.computed_blocks() / max(1, self.causal_blocks())


def layout_from_mask(keep: torch.Tensor, block: int, q_len: int, kv_len: int) -> BlockLayout:
    """Turn a boolean (B, H_kv, NQB, NKB) keep mask into a :class:`BlockLayout` (diagonal forced on)."""
    b, hk, nqb, nkb = keep.shape
    first = (kv_len - q_len) // block
    diag = torch.arange(first, first + nqb, device=keep.device)  # (NQB,)
    if nkb != -(-kv_len // block) or first + nqb != nkb:
        raise ConfigError(f"keep mask of {nqb} x {nkb} blocks does not match q_len={q_len}, kv_len={kv_len}, "
                          f"block={block}")
    cols = torch.arange(nkb, device=keep.device)
    keep = keep & (cols[None, :] <= diag[:, None])  # never a future block
    keep = keep | (cols[None, :] == diag[:, None])  # always the diagonal
    counts = keep.sum(-1, dtype=torch.int32)
    width = int(counts.max()) if counts.numel() else 1
    key = torch.where(keep, cols, nkb + cols)  # kept blocks sort first, ascending
    order = key.argsort(dim=-1)[..., :width]
    idx = torch.where(order < nkb, order, 0)
    valid = torch.arange(width, device=keep.device) < counts[..., None]
    idx = torch.where(valid, idx, 0).to(torch.int32)
    return BlockLayout(idx.contiguous(), counts.contiguous(), block, q_len, kv_len)


def dense_layout(batch: int, kv_heads: int, q_len: int, kv_len: int, block: int,
                 device: torch.device | str = "cpu") -> BlockLayout:
    """Every causal block kept: the block-sparse kernels then compute exact dense causal attention."""
    nqb = -(-(q_len + (kv_len - q_len) % block) // block)
    nkb = -(-kv_len // block)
    keep = torch.ones(batch, kv_heads, nqb, nkb, dtype=torch.bool, device=device)
    return layout_from_mask(keep, block, q_len, kv_len)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> int:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ConfigError(f"expected q (B,H,Tq,D) and k, v (B,H_kv,Tk,D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                          f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ConfigError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if (layout.q_len, layout.kv_len) != (q.shape[2], k.shape[2]):
        raise ConfigError(f"layout built for q_len={layout.q_len}, kv_len={layout.kv_len}, called with "
                          f"{q.shape[2]}, {k.shape[2]}")
    return q.shape[1] // k.shape[1]


# --- plain PyTorch reference ---------------------------------------------------------------------------

def block_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                              scale: float | None = None, chunk_blocks: int = 16) -> torch.Tensor:
    """Online-softmax block-sparse attention in fp32, one query block at a time (the tests' oracle)."""
    group = _check(q, k, v, layout)
    bsz, heads, q_len, dim = q.shape
    kv_len, blk, pad = k.shape[2], layout.block, layout.pad
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(bsz, heads, q_len, dim, dtype=torch.float32, device=q.device)
    for m in range(layout.kv_counts.shape[-1]):
        q0, q1 = max(0, m * blk - pad), min(q_len, (m + 1) * blk - pad)
        if q0 >= q1:
            continue
        q_pos = torch.arange(q0, q1, device=q.device) + layout.q_offset  # absolute positions (Tm,)
        for b in range(bsz):
            for hk in range(k.shape[1]):
                qs = q[b, hk * group:(hk + 1) * group, q0:q1].float() * scale  # (G, Tm, D)
                n = int(layout.kv_counts[b, hk, m])
                blocks = layout.kv_indices[b, hk, m, :n].tolist()
                run_max = torch.full(qs.shape[:2], -math.inf, device=q.device)
                run_sum = torch.zeros(qs.shape[:2], device=q.device)
                acc = torch.zeros_like(qs)
                for c in range(0, n, chunk_blocks):
                    pos = torch.cat([torch.arange(j * blk, min((j + 1) * blk, kv_len), device=q.device)
                                     for j in blocks[c:c + chunk_blocks]])  # (Tc,)
                    s = qs @ k[b, hk, pos].float().T  # (G, Tm, Tc): one strip, never (T, T)
                    s = s.masked_fill(pos[None, None, :] > q_pos[None, :, None], -math.inf)
                    new_max = torch.maximum(run_max, s.amax(-1))
                    p = torch.exp(s - new_max[..., None])
                    alpha = torch.exp(run_max - new_max)
                    run_sum = run_sum * alpha + p.sum(-1)
                    acc = acc * alpha[..., None] + p @ v[b, hk, pos].float()
                    run_max = new_max
                out[b, hk * group:(hk + 1) * group, q0:q1] = acc / run_sum[..., None]
    return out.to(q.dtype)


def dense_causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                           keep_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Dense masked attention (materialises the scores): the oracle for small test shapes only.

    ``keep_tokens`` (B, H_kv, Tq, Tk) bool restricts each query to those keys on top of causality.
    """
    group = q.shape[1] // k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    kk = k.float().repeat_interleave(group, 1)
    vv = v.float().repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    allowed = torch.arange(kv_len)[None, :] <= (torch.arange(q_len) + kv_len - q_len)[:, None]
    if keep_tokens is not None:
        allowed = allowed & keep_tokens.repeat_interleave(group, 1)
    s = s.masked_fill(~allowed, -math.inf)
    return (torch.softmax(s, -1) @ vv).to(q.dtype)


# --- compiled FlexAttention (CPU fast path) ----------------------------------------------------------------

@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Static shapes: the CPU flex kernel is specialised per sequence length (3-25 s the first time).
    return torch.compile(flex_attention, dynamic=False)


def _causal_mask_mod(offset: torch.Tensor):
    # The offset is a captured tensor (not a Python int) so that new offsets reuse the compiled kernel.
    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal


def flex_block_mask(layout: BlockLayout, heads: int):
    """A FlexAttention ``BlockMask`` over the padded shapes: kept off-diagonal blocks full, diagonal partial."""
    from torch.nn.attention.flex_attention import BlockMask

    group = heads // layout.kv_indices.shape[1]
    idx = layout.kv_indices.repeat_interleave(group, 1)  # (B, H, NQB, M): one row per query head
    counts = layout.kv_counts.repeat_interleave(group, 1)
    diag = idx.gather(-1, (counts - 1).clamp_min(0).long()[..., None])  # (B, H, NQB, 1)
    nkb = -(-layout.kv_len // layout.block)
    full_idx = torch.zeros(*idx.shape[:-1], nkb, dtype=torch.int32)
    full_idx[..., :idx.shape[-1]] = idx  # the first counts-1 entries are the full (off-diagonal) blocks
    part_idx = torch.zeros_like(full_idx)
    part_idx[..., :1] = diag
    # Padded query row 0 sits at absolute position q_offset - pad.
    offset = torch.tensor(layout.q_offset - layout.pad, dtype=torch.int64)
    nqb = idx.shape[2]
    return BlockMask.from_kv_blocks(
        torch.ones_like(counts), part_idx.contiguous(), (counts - 1).contiguous(), full_idx.contiguous(),
        BLOCK_SIZE=layout.block, mask_mod=_causal_mask_mod(offset),
        seq_lengths=(nqb * layout.block, nkb * layout.block),
        compute_q_blocks=False)  # the transposed (backward) indices cost more than the selection; no backward here


def block_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                         scale: float | None = None, block_mask=None) -> torch.Tensor:
    """Block-sparse causal attention through compiled FlexAttention (pads to whole blocks, then trims)."""
    _check(q, k, v, layout)
    blk, pad = layout.block, layout.pad
    nqb = layout.kv_counts.shape[-1]
    nkb = -(-layout.kv_len // blk)
    qp = torch.nn.functional.pad(q, (0, 0, pad, nqb * blk - pad - q.shape[2]))
    kp = torch.nn.functional.pad(k, (0, 0, 0, nkb * blk - k.shape[2]))
    vp = torch.nn.functional.pad(v, (0, 0, 0, nkb * blk - v.shape[2]))
    mask = block_mask if block_mask is not None else flex_block_mask(layout, q.shape[1])
    out = _compiled_flex()(qp, kp, vp, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, pad:pad + q.shape[2]]


# --- Triton ----------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


tl = None  # triton.language, bound on first use: Triton is optional and CPU runs never import it


@functools.cache
def _triton_kernel():
    # The interpreter resolves ``tl`` through the kernel's module globals, so bind it there; the kernel is
    # built lazily because ``triton.jit`` reads TRITON_INTERPRET when it decorates.
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def _fwd(Q, K, V, O, IDX, CNT, scale, q_len, kv_len, q_start, pad, group,
             sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, sib, sih, sim, scb, sch,
             heads: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
        m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        hk = h // group
        rows = m * BLOCK + tl.arange(0, BLOCK)  # padded query index; absolute position = q_start + rows
        q_idx = rows - pad  # index into Q
        dims = tl.arange(0, D)
        q_ok = (q_idx >= 0) & (q_idx < q_len)
        q = tl.load(Q + b * sqb + h * sqh + q_idx[:, None] * sqt + dims[None, :], mask=q_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = q_start + rows
        m_i = tl.full([BLOCK], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, D], tl.float32)
        n = tl.load(CNT + b * scb + hk * sch + m)
        for t in range(0, n):
            j = tl.load(IDX + b * sib + hk * sih + m * sim + t)
            cols = j * BLOCK + tl.arange(0, BLOCK)
            k_ok = cols < kv_len
            kt = tl.load(K + b * skb + hk * skh + cols[:, None] * skt + dims[None, :], mask=k_ok[:, None], other=0.0)
            vt = tl.load(V + b * skb + hk * skh + cols[:, None] * skt + dims[None, :], mask=k_ok[:, None], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt)) * scale
            s = tl.where(k_ok[None, :] & (cols[None, :] <= q_pos[:, None]), s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + q_idx[:, None] * sot + dims[None, :], out.to(O.dtype.element_ty),
                 mask=q_ok[:, None])

    return _fwd


def block_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                           scale: float | None = None) -> torch.Tensor:
    """Block-sparse causal attention in one Triton launch: grid (query blocks, batch x heads)."""
    group = _check(q, k, v, layout)
    dim = q.shape[-1]
    if dim & (dim - 1) or dim < 16 or layout.block < 16 or layout.block & (layout.block - 1):
        raise ConfigError(f"the Triton kernel needs a power-of-two head dim and block >= 16 (got head dim {dim}, "
                          f"block {layout.block}); use impl='flex' or 'reference'")
    if q.device.type != "cuda" and not _interpreting():
        raise ConfigError("Triton has no CPU backend: set TRITON_INTERPRET=1 (tests) or use impl='flex' on CPU")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    bsz, heads = q.shape[:2]
    idx, cnt = layout.kv_indices.to(q.device), layout.kv_counts.to(q.device)
    q_start = layout.q_offset - layout.pad  # absolute position of padded query row 0
    grid = (cnt.shape[-1], bsz * heads)
    _triton_kernel()[grid](
        q, k, v, out, idx, cnt, 1.0 / math.sqrt(dim) if scale is None else scale,
        q.shape[2], k.shape[2], q_start, layout.pad, group,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), idx.stride(0), idx.stride(1), idx.stride(2),
        cnt.stride(0), cnt.stride(1),
        heads=heads, BLOCK=layout.block, D=dim,
        UPCAST=_interpreting() or q.dtype == torch.float32,
    )
    return out


IMPLS = ("auto", "gather", "flex", "reference", "triton")


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                    scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Dispatch: ``auto`` = Triton on CUDA, gather-then-dense on CPU; the others force one path.

    On CPU ``auto`` takes ``gather`` from measurements (ATTN-prefill shapes, keep 0.25, one thread, timed
    round-robin in one process; ``benchmarks/results/prefill_attention_cpu_{4k-8k,16k}_gather.json``): in
    steady state the compiled FlexAttention kernel is faster at 4K and 8K (90 vs 118 ms, 364 vs 395 ms) and
    slower at 16K (1,218 vs 1,122 ms), but it compiles once per sequence length (3-7 s idle, minutes under
    load), which a model serving prompts of varying length pays again and again; ``gather`` compiles nothing.
    Force ``flex`` for many prompts of one fixed length of 8K or less.
    """
    if impl == "auto":
        impl = "triton" if q.device.type == "cuda" else "gather"
    if impl == "gather":
        from .block_prefill_gather import block_attention_gather

        return block_attention_gather(q, k, v, layout, scale)
    if impl == "flex":
        return block_attention_flex(q, k, v, layout, scale)
    if impl == "triton":
        return block_attention_triton(q, k, v, layout, scale)
    if impl == "reference":
        return block_attention_reference(q, k, v, layout, scale)
    raise ConfigError(f"unknown kernel impl {impl!r}; choose one of {IMPLS}")
