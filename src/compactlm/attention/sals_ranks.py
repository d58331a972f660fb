"""Per-layer SALS latent ranks from calibration energy.

SALS (arXiv 2510.24273, §3, Fig. 2 and §4.1) motivates its rank by the spectrum of the pre-RoPE keys: a few
directions carry almost all of ‖K‖². That spectrum differs by layer (on SmolLM2-135M, 25 % of the 192 key
dims keeps 0.94 of the energy in some layers and 0.999 in others), so one rank for every layer starves some
layers and wastes latent dims on others. ``rank="energy:τ"`` gives each layer the smallest r whose leading
eigenvalues of KᵀK hold at least a fraction τ of the layer's key energy; an optional average-rank budget then
caps the total. These are the pure-tensor rules; :class:`~.sals.SALSConfig` applies them to the sparse layers.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def energy_fractions(eigvals: torch.Tensor) -> torch.Tensor:
    """Each layer's eigenvalues (L, W), sorted descending, as fractions of that layer's total (rows sum to 1)."""
    ev = eigvals.double().clamp(min=0)
    return ev / ev.sum(-1, keepdim=True).clamp(min=1e-300)


def threshold_ranks(eigvals: torch.Tensor, threshold: float) -> torch.Tensor:
    """(L,) smallest r per layer whose first r eigenvalues hold ≥ ``threshold`` of the layer's energy.

    ``threshold`` 1.0 means every direction (r = W): that is the exact, lossless rebuild, even where the
    calibration keys happen to span fewer dims than the keys met later.
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"energy threshold must be in (0, 1], got {threshold!r}")
    width = eigvals.shape[-1]
    if threshold >= 1.0:
        return torch.full((eigvals.shape[0],), width, dtype=torch.long)
    cum = energy_fractions(eigvals).cumsum(-1)
    # Count of prefixes still short of the threshold, + 1; the small slack absorbs float rounding of cumsum.
    ranks = (cum < threshold - 1e-12).sum(-1) + 1
    return ranks.clamp(1, width)


def budget_ranks(eigvals: torch.Tensor, cap: torch.Tensor, total: int) -> torch.Tensor:
    """(L,) ranks, each ≤ ``cap`` (L,) and ≥ 1, summing to at most ``total``: the greedy energy allocation.

    Takes the ``total`` largest *normalised* eigenvalues over all layers (each layer's eigenvalues divided by its
    own energy), which minimises Σ_layers (1 − energy kept): every dim goes where it removes the largest share
    of a layer's remaining relative error. Eigenvalues are sorted per layer, so the chosen ones form a prefix
    of each layer's basis: the count per layer is its rank.
    """
    layers, width = eigvals.shape
    if total < layers:
        raise ConfigError(f"a rank budget of {total} latent dims in all cannot give each of {layers} layers ≥ 1 dim")
    cap = cap.clamp(1, width)
    if int(cap.sum()) <= total:
        return cap.clone()
    frac = energy_fractions(eigvals)
    cols = torch.arange(width)[None, :]
    frac = frac.masked_fill(cols >= cap[:, None], float("-inf"))
    frac[:, 0] = float("inf")  # every layer keeps at least its first direction
    chosen = frac.flatten().topk(total).indices
    return torch.bincount(chosen // width, minlength=layers)


def energy_ranks(eigvals: torch.Tensor, threshold: float, total: int | None = None) -> torch.Tensor:
    """(L,) per-layer ranks: the threshold ranks, reduced greedily to ``total`` dims in all when they exceed it."""
    ranks = threshold_ranks(eigvals, threshold)
    return ranks if total is None else budget_ranks(eigvals, ranks, total)


def parse_energy(rank: object) -> float | None:
    """The τ of ``"energy:τ"``; None for a numeric rank; ConfigError for any other string."""
    if not isinstance(rank, str):
        return None
    head, _, value = rank.partition(":")
    try:
        tau = float(value)
    except ValueError:
        tau = None
    if head.strip() != "energy" or tau is None:
        raise ConfigError(f"SALSConfig.rank={rank!r}: give a fraction of n_kv·head_dim (0.25), a count (48) or "
                          "'energy:τ' with τ in (0, 1] (per layer, the smallest rank keeping τ of the key energy)")
    if not 0.0 < tau <= 1.0:
        raise ConfigError(f"SALSConfig.rank={rank!r}: the energy fraction must be in (0, 1], e.g. 'energy:0.99'")
    return tau
