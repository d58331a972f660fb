"""Triton SALS decode attention for GPUs: gather the chosen slots, rebuild their keys, rotate, attend — one launch.

The CPU path (:mod:`compactlm.kernels.sparse_decode`) runs the step after selection as separate tensor ops: gather
the chosen latent rows (or keys), rebuild keys with a GEMM, apply RoPE, ``q·kᵀ``, softmax, ``p·v``. Each op writes
its result to memory and the next reads it back. This kernel does the whole step per tile of chosen slots in
registers, so the bytes moved are the ones the method promises (SALS, arXiv 2510.24273, §4: the chosen latent rows
and values, or the chosen keys and values in ``index`` mode):

- grid = (batch × KV heads, splits): each program owns one KV head's query group (padded to 16 rows for
  ``tl.dot``) and a contiguous share of the chosen slots, and keeps an online softmax over its tiles
  (FlashAttention-2, arXiv 2307.08691 §3.1); the splits are merged afterwards by their log-sum-exp, as in
  flash-decoding, so a batch-1 step still fills the GPU;
- ``compressed`` mode: a tile of chosen latent rows z (BLOCK_N × r) is multiplied by the KV head's two halves of the
  joint projection, giving the two halves of the pre-RoPE keys; RoPE is applied on the halves (the
  ``rotate_half`` convention with ``cos``/``sin`` tables that repeat their halves, as every supported family
  builds them — checked, not assumed) and the query halves score against them;
- ``index`` mode: the chosen post-RoPE keys are loaded directly.

Exact sink/recent keys (:class:`~compactlm.kernels.sparse_decode.ExactKeys`) and quantized values are not handled
here: :func:`compactlm.kernels.sparse_decode.sals_decode` runs its tensor path for them. Tests run this kernel under
``TRITON_INTERPRET=1`` on CPU against the plain reference (fp32: the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import ConfigError

tl = None  # triton.language, bound on first use: Triton is optional and CPU runs never import it


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@functools.cache
def _kernel():
    # The interpreter resolves ``tl`` through the kernel's module globals, so bind it there; the kernel is built
    # lazily because ``triton.jit`` reads TRITON_INTERPRET when it decorates.
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def _fwd(Q, IDX, VALID, K, V, Z, P, COS, SIN, POS, ACC, MAX, SUM,
             n, tiles_per_split, group, hkv, scale,
             sqb, sqh, sib, sih, skb, skh, skl, svb, svh, svl, szb, szl, sph, spd, spr, sct, spb, spl,
             sab, sah, sas, smb, smh,
             G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, R: tl.constexpr, R_TRUE: tl.constexpr,
             COMPRESSED: tl.constexpr, HAS_VALID: tl.constexpr, UPCAST: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // hkv
        h = bh % hkv
        rows = tl.arange(0, G)
        row_ok = rows < group
        q_rows = Q + b * sqb + (h * group + rows[:, None]) * sqh
        m_i = tl.full([G], -1.0e30, tl.float32)
        l_i = tl.zeros([G], tl.float32)
        acc = tl.zeros([G, D], tl.float32)
        dims = tl.arange(0, D)
        if COMPRESSED:
            half = tl.arange(0, D // 2)
            rdims = tl.arange(0, R)
            r_ok = rdims < R_TRUE
            q1 = tl.load(q_rows + half[None, :], mask=row_ok[:, None], other=0.0)
            q2 = tl.load(q_rows + D // 2 + half[None, :], mask=row_ok[:, None], other=0.0)
            # The KV head's rows of the joint projection, transposed: (R, D/2) per half, loaded once.
            p_base = P + h * sph + rdims[:, None] * spr
            p1 = tl.load(p_base + half[None, :] * spd, mask=r_ok[:, None], other=0.0)
            p2 = tl.load(p_base + (D // 2 + half[None, :]) * spd, mask=r_ok[:, None], other=0.0)
            if UPCAST:
                q1 = q1.to(tl.float32)
                q2 = q2.to(tl.float32)
                p1 = p1.to(tl.float32)
                p2 = p2.to(tl.float32)
        else:
            q = tl.load(q_rows + dims[None, :], mask=row_ok[:, None], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
        first = split * tiles_per_split * BLOCK_N
        for t in range(0, tiles_per_split):
            slots = first + t * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = slots < n
            idx = tl.load(IDX + b * sib + h * sih + slots, mask=ok, other=0).to(tl.int64)
            if HAS_VALID:
                ok = ok & (tl.load(VALID + b * sib + h * sih + slots, mask=ok, other=0) != 0)
            if COMPRESSED:
                z = tl.load(Z + b * szb + idx[:, None] * szl + rdims[None, :], mask=ok[:, None] & r_ok[None, :],
                            other=0.0)
                if UPCAST:
                    z = z.to(tl.float32)
                k1 = tl.dot(z, p1)  # (BLOCK_N, D/2): first halves of the rebuilt pre-RoPE keys
                k2 = tl.dot(z, p2)
                pos = tl.load(POS + b * spb + idx * spl, mask=ok, other=0).to(tl.int64)
                c = tl.load(COS + pos[:, None] * sct + half[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                s = tl.load(SIN + pos[:, None] * sct + half[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                r1 = (k1 * c - k2 * s).to(q1.dtype)  # rotate_half RoPE on the two halves
                r2 = (k2 * c + k1 * s).to(q1.dtype)
                scores = tl.dot(q1, tl.trans(r1)) + tl.dot(q2, tl.trans(r2))
            else:
                k = tl.load(K + b * skb + h * skh + idx[:, None] * skl + dims[None, :], mask=ok[:, None], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(ok[None, :], scores * scale, -1.0e30)
            v = tl.load(V + b * svb + h * svh + idx[:, None] * svl + dims[None, :], mask=ok[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            p = tl.where(ok[None, :], p, 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        base = b * smb + h * smh + split * G + rows
        tl.store(MAX + base, m_i)
        tl.store(SUM + base, l_i)
        tl.store(ACC + b * sab + h * sah + split * sas + rows[:, None] * D + dims[None, :], acc)

    return _fwd


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


_HALVES: dict[tuple, bool] = {}


def _halves_equal(table: torch.Tensor) -> bool:
    """Whether a RoPE table repeats its halves; memoized per table (and version), since it is checked every decode
    step of every layer and, on a GPU, each check would otherwise synchronise the device."""
    key = (table.data_ptr(), table._version, tuple(table.shape), tuple(table.stride()), str(table.device))
    if key not in _HALVES:
        if len(_HALVES) > 256:  # tables are few (one per dtype and length); keep the memo small
            _HALVES.clear()
        half = table.shape[-1] // 2
        _HALVES[key] = bool(torch.equal(table[..., :half], table[..., half:]))
    return _HALVES[key]


def sals_attend_triton(q: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, scaling: float,
                       valid: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                       latent: torch.Tensor | None = None, proj: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None, cos_table: torch.Tensor | None = None,
                       sin_table: torch.Tensor | None = None, block_n: int = 64, splits: int | None = None
                       ) -> torch.Tensor:
    """Exact attention of q (B, H_kv, G, D) over the chosen slots idx (B, H_kv, n) -> (B, H_kv, G, D).

    ``index`` mode: pass ``keys`` (B, H_kv, L, D), post-RoPE. ``compressed`` mode: pass ``latent`` (B, L, r),
    ``proj`` (H_kv, D, r), ``positions`` (B, L) and the (P, D) ``cos_table``/``sin_table``; the chosen keys are
    rebuilt and rotated inside the kernel. ``values`` (B, H_kv, L, D); ``valid`` (B, H_kv, n) bool masks slots.
    """
    if q.device.type != "cuda" and not interpreting():
        raise ConfigError("the Triton SALS kernel needs a CUDA device (or TRITON_INTERPRET=1 in tests); "
                          "on CPU sals_decode uses its tensor path")
    b, hkv, group, d = q.shape
    n = idx.shape[-1]
    compressed = keys is None
    if d & (d - 1) or d < 32:
        raise ConfigError(f"the Triton SALS kernel needs a power-of-two head dim ≥ 32, got {d}")
    if compressed:
        if latent is None or proj is None or positions is None or cos_table is None or sin_table is None:
            raise ConfigError("compressed mode needs latent, proj, positions and cos/sin tables (or pass keys)")
        if not (_halves_equal(cos_table) and _halves_equal(sin_table)):
            raise ConfigError("the Triton SALS kernel applies RoPE on half tables: cos/sin must repeat their "
                              "halves (rotate_half convention); use sals_decode's tensor path for this model")
    g_pad = max(16, _pow2(group))
    tiles = -(-n // block_n)
    if splits is None:  # enough programs to fill a GPU at batch 1 (flash-decoding), at least one tile each
        splits = max(1, min(tiles, 128 // max(1, b * hkv)))
    tiles_per_split = -(-tiles // splits)
    splits = -(-tiles // tiles_per_split)
    q = q.contiguous()
    idx = idx.contiguous()
    acc = torch.empty(b, hkv, splits, g_pad, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b, hkv, splits, g_pad, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    flag = valid.to(torch.int8).contiguous() if valid is not None else idx  # idx: a pointer the kernel never reads
    dummy = q.new_empty(1)
    k_t = keys if keys is not None else dummy
    z_t = latent if compressed else dummy
    p_t = proj if compressed else dummy
    pos_t = positions if compressed else idx
    cos_t = cos_table if compressed else dummy
    sin_t = sin_table if compressed else dummy
    r = latent.shape[-1] if compressed else 16
    if compressed and (cos_t.stride(-1) != 1 or cos_t.stride() != sin_t.stride()):
        cos_t, sin_t = cos_t.contiguous(), sin_t.contiguous()
    for name, t in (("values", values), ("keys", k_t), ("latent", z_t), ("proj", p_t)):
        if t.dim() > 1 and t.stride(-1) != 1:
            raise ConfigError(f"the Triton SALS kernel reads rows of {name}: its last dim must be contiguous")
    kst = (k_t.stride(0), k_t.stride(1), k_t.stride(2)) if keys is not None else (0, 0, 0)
    zst = (z_t.stride(0), z_t.stride(1)) if compressed else (0, 0)
    pst = (p_t.stride(0), p_t.stride(1), p_t.stride(2)) if compressed else (0, 0, 0)
    _kernel()[(b * hkv, splits)](
        q, idx, flag, k_t, values, z_t, p_t, cos_t, sin_t, pos_t, acc, mx, sm,
        n, tiles_per_split, group, hkv, scaling,
        q.stride(0), q.stride(2), idx.stride(0), idx.stride(1), *kst,
        values.stride(0), values.stride(1), values.stride(2), *zst, *pst,
        cos_t.stride(0) if compressed else 0, pos_t.stride(0), pos_t.stride(1) if pos_t.dim() > 1 else 0,
        acc.stride(0), acc.stride(1), acc.stride(2), mx.stride(0), mx.stride(1),
        G=g_pad, BLOCK_N=block_n, D=d, R=max(16, _pow2(r)), R_TRUE=r,
        COMPRESSED=compressed, HAS_VALID=valid is not None,
        UPCAST=interpreting() or q.dtype == torch.float32,
    )
    # Merge the splits by their softmax statistics (flash-decoding).
    top = mx.amax(2, keepdim=True)
    w = torch.exp(mx - top)  # (B, H_kv, S, G)
    out = (acc * w[..., None]).sum(2) / (sm * w).sum(2)[..., None]
    return out[:, :, :group].to(q.dtype)
