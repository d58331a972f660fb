"""Plain references of the fast kernels: slow, obvious, and used by tests to check the fast paths.

``sals_decode_reference`` rebuilds *every* cached key from the latent cache, applies RoPE with the model
family's own ``apply_rotary_pos_emb``, scores each query head in a Python loop, and runs dense attention with
a boolean mask of the chosen tokens: nothing gathered, nothing preallocated.
"""

from __future__ import annotations

import torch

from ..attention.selection import pool_heads
from .sparse_decode import SelectParams, select


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    if not inverse:
        return x * cos + _rotate_half(x) * sin
    return (x * cos - _rotate_half(x) * sin) / (cos**2 + sin**2)


def masked_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                               scaling: float) -> torch.Tensor:
    """Dense attention with the GQA repeat materialised: q (B, H, 1, D), keys/values (B, H_kv, L, D),
    keep (B, H_kv, L) bool -> (B, 1, H, D)."""
    b, h, _, d = q.shape
    hkv = keys.shape[1]
    g = h // hkv
    k = keys.repeat_interleave(g, dim=1).double()
    v = values.repeat_interleave(g, dim=1).double()
    s = (q.double() @ k.transpose(-1, -2)) * scaling  # (B, H, 1, L)
    s = s.masked_fill(~keep.repeat_interleave(g, dim=1)[:, :, None, :], float("-inf"))
    out = torch.softmax(s, dim=-1) @ v
    return out.transpose(1, 2).to(q.dtype)


def sals_decode_reference(q: torch.Tensor, q_cos: torch.Tensor, q_sin: torch.Tensor, latent: torch.Tensor,
                          values: torch.Tensor, positions: torch.Tensor, proj: torch.Tensor, r_star: int,
                          cos_table: torch.Tensor, sin_table: torch.Tensor, params: SelectParams, scaling: float,
                          valid: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                          exact=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`compactlm.kernels.sparse_decode.sals_decode`, computed the slow way."""
    b, h, _, d = q.shape
    hkv = values.shape[1]
    g = h // hkv
    length = values.shape[2]
    q_pre = rope_reference(q[:, :, 0], q_cos, q_sin, inverse=True)  # (B, H, D)
    scores = torch.empty(b, hkv, g, length, dtype=torch.float64)
    for head in range(h):
        kv = head // g
        q_lat = q_pre[:, head].double() @ proj[kv, :, :r_star].double()  # (B, r*)
        scores[:, kv, head % g] = torch.einsum("br,blr->bl", q_lat, latent[:, :, :r_star].double())
    pooled = pool_heads(scores, params.pool, scaling).to(torch.float64)
    idx, _ = select(pooled, params, positions, valid)
    keep = torch.zeros(b, hkv, length, dtype=torch.bool)
    keep.scatter_(2, idx, True)
    if valid is not None:
        keep &= valid[:, None, :]
    if keys is None:
        k_pre = torch.einsum("blr,hdr->bhld", latent.double(), proj.double())  # rebuild all keys
        cos = cos_table[positions][:, None].double()
        sin = sin_table[positions][:, None].double()
        keys = rope_reference(k_pre, cos, sin)
        if exact is not None:  # slots whose exact keys the cache keeps: sinks by slot, the last R by ring row
            sinks = exact.sink_slot.shape[-1]
            for row in range(b):
                for j in range(sinks):
                    slot = int(exact.sink_slot[row, j])
                    if slot >= 0:
                        keys[row, :, slot] = exact.keys[row, :, j].double()
                for slot in range(max(0, length - exact.recent), length):
                    keys[row, :, slot] = exact.keys[row, :, sinks + slot % exact.recent].double()
    return masked_attention_reference(q, keys.to(q.dtype), values, keep, scaling), idx
