"""Position-averaged RoPE for SALS's latent scores (a compactlm extension of arXiv 2510.24273, §4.2).

SALS scores cached tokens "RoPE-free": q_pre·k_pre, as if every key sat at the query's own position. The real
logit is q_pre·R(−Δ)·k_pre, Δ = query position − key position, where R rotates channel pair j by Δ·θ_j. For
pairs that turn fast (θ_j·Δ ≫ 1 over the context) the RoPE-free term is not the logit's value at any typical
distance: it counts as a fixed vote what really oscillates with Δ. On SmolLM2-135M (θ base 1e5, head dim 64)
only the slowest 5 of 32 pairs stay within 0.3 rad over 4K tokens.

``score_rope="averaged"`` scores with the expected logit over the candidates' distances instead: with Δ uniform on
the integers [a, b] (a = ``recent``, the nearest slot the score must choose among; b = the oldest),
E[R(−Δ)] is, per pair, a scaled rotation ρ_j·R(−φ_j) with ρ_j·e^{iφ_j} = E[e^{iΔθ_j}] (a geometric series).
So the score query q̃ = ρ·R(φ)·q_pre costs one extra rotation of the *query* per step: latent keys and the
scoring GEMM are unchanged. Slow pairs keep ρ ≈ 1 (the RoPE-free score), fast pairs fade towards 0.

The SALS decode kernel rotates the post-RoPE query back with ``unrope(q, cos, sin)`` = (1/s)·R(−ψ)·q, s² =
cos² + sin². Handing it angle ψ = p_q·θ − φ and amplitude s/ρ yields ρ·R(φ)·q_pre exactly, so the kernel needs no
second code path: :func:`averaged_query_rope` only rewrites the query's cos/sin.
"""

from __future__ import annotations

import torch


def mean_rotation(theta: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ, φ) with ρ·e^{iφ} = mean of e^{iΔθ} over integer Δ in [lo, hi], per element of ``theta`` (float64)."""
    n = hi - lo + 1
    t = theta.double()
    z = torch.polar(torch.ones_like(t), t)  # e^{iθ}
    start = torch.polar(torch.ones_like(t), lo * t)
    tiny = t.abs() < 1e-12
    # Geometric series e^{i·lo·θ}·(1 − e^{inθ}) / (n·(1 − e^{iθ})); θ = 0 gives exactly 1.
    denom = torch.where(tiny, torch.ones_like(z), n * (1 - z))
    mean = torch.where(tiny, torch.ones_like(z), start * (1 - torch.polar(torch.ones_like(t), n * t)) / denom)
    return mean.abs(), mean.angle()


def rope_frequencies(cos_table: torch.Tensor, sin_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel angle per position θ (D,) and RoPE amplitude s (D,) from the table rows at positions 0 and 1."""
    scale = torch.sqrt(cos_table[0].double() ** 2 + sin_table[0].double() ** 2)
    theta = torch.atan2(sin_table[1].double(), cos_table[1].double())
    return theta, scale


def averaged_query_rope(q_cos: torch.Tensor, q_sin: torch.Tensor, theta: torch.Tensor, lo: int, hi: int,
                        min_rho: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The query's cos/sin (B, 1, D) rewritten so that ``unrope`` gives ρ·R(φ)·q_pre (see the module docstring).

    Falls back to the given cos/sin (RoPE-free) when [lo, hi] is empty. ``min_rho`` bounds the amplitude 1/ρ
    (a pair averaged to ρ < min_rho is kept at weight min_rho instead of dividing by ~0).
    """
    if hi < lo:
        return q_cos, q_sin
    rho, phi = mean_rotation(theta, lo, hi)
    angle = torch.atan2(q_sin.double(), q_cos.double()) - phi  # ψ = p_q·θ − φ
    amp = torch.sqrt(q_cos.double() ** 2 + q_sin.double() ** 2) / rho.clamp(min=min_rho)
    return (amp * torch.cos(angle)).to(q_cos.dtype), (amp * torch.sin(angle)).to(q_sin.dtype)
