"""SparseGPT: one-shot pruning with second-order (OBS) weight reconstruction.

Based on Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(arXiv 2301.00774): §3.2 the column-by-column OBS update with one shared inverse Hessian
H⁻¹ = (2XXᵀ + λI)⁻¹ through its upper Cholesky factor, §3.3 adaptive mask selection per block of
``blocksize`` columns by w²/[H⁻¹]²_jj, §3.4 N:M by selecting within each group of M columns.

Deliberate deviations: the pruned count is allocated exactly per row (``scope='row'``) or per matrix
(``scope='layer'``) by cumulative rounding over the blocks, so sparsity is exact rather than per-block
rounded; inputs that never fire (a zero Hessian diagonal) are not zeroed, because that would change
the sparsity — their weights just carry no calibration signal.

The Hessian helpers (damping, Cholesky with retry) live here until ``primitives/hessian.py`` lands.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError
from ..registry import register
from .common import PruneConfig, PruneRun, execute, n_pruned


@dataclasses.dataclass(frozen=True)
class SparseGPT(PruneConfig):
    """SparseGPT (sparsity or N:M). Fields beyond :class:`PruneConfig`:

    blocksize: columns per lazy-update block and per adaptive-mask block (paper: 128).
    dampening: λ as a fraction of the mean Hessian diagonal (paper: 0.01).
    """

    blocksize: int = 128
    dampening: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError(f"blocksize must be a positive int (paper: 128), got {self.blocksize!r}")
        if self.nm is not None and self.blocksize % self.nm[1]:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of M={self.nm[1]} for pattern "
                              f"{self.pattern!r}, e.g. 128")
        if not 0.0 < float(self.dampening) < 1.0:
            raise ConfigError(f"dampening must be in (0, 1), e.g. 0.01 (1 % of the mean Hessian diagonal); "
                              f"got {self.dampening!r}")

    def make_run(self, keep_dense: bool = False) -> SparseGPTRun:
        return SparseGPTRun(self, keep_dense)


# --- Hessian helpers (to be deduplicated with primitives/hessian.py) ------------------------------------------------
def damped_upper_inverse_cholesky(h: torch.Tensor, dampening: float,
                                  retries: int = 4) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so H⁻¹ = UᵀU); λ grows ×10 per failed try.

    Returns (U, relative damping used, number of retries). Raises CalibrationError if all tries fail.
    """
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # an input that never fired: any positive curvature keeps H invertible
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = dampening
    for attempt in range(retries + 1):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, damp, attempt
        damp *= 10.0
    raise CalibrationError(f"the Hessian is not positive definite even with {damp / 10:g} × its mean diagonal "
                           "added; use more calibration samples or raise dampening")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, config: SparseGPT
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Prune ``weight`` (out, in) given the layer Hessian (in, in) = 2/N·XXᵀ.

    Returns (updated weight with exact zeros, keep-mask, record with loss / damping).
    """
    w = weight.detach().float().clone()  # (out, in)
    rows, cols = w.shape
    u, damp, retries = damped_upper_inverse_cholesky(hessian.float(), float(config.dampening))
    prune = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    losses = torch.zeros(rows, dtype=torch.float32, device=w.device)
    nm, bs = config.nm, config.blocksize
    s = config.target_sparsity
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()  # (out, B)
        u1 = u[i1:i2, i1:i2]  # (B, B)
        err1 = torch.zeros_like(w1)
        p1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            # §3.3 adaptive mask selection: rank w²/[H⁻¹]_jj² inside the block; exact counts by cumulative rounding.
            score = w1 ** 2 / torch.diag(u1).reshape(1, -1) ** 2
            if config.scope == "row":
                k = n_pruned(i2, s) - n_pruned(i1, s)
                if k:
                    p1.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
            else:
                k = n_pruned(rows * i2, s) - n_pruned(rows * i1, s)
                if k:
                    p1.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = True
        for i in range(i2 - i1):
            col = w1[:, i]
            d = u1[i, i]
            if nm is not None and i % nm[1] == 0:  # §3.4: choose the (M−N) pruned inputs of this group now
                n, m = nm
                score = w1[:, i:i + m] ** 2 / torch.diag(u1)[i:i + m].reshape(1, -1) ** 2
                idx = torch.topk(score, m - n, dim=1, largest=False).indices
                p1[:, i:i + m].scatter_(1, idx, True)
            q = torch.where(p1[:, i], torch.zeros_like(col), col)
            losses += (col - q) ** 2 / d ** 2 / 2
            e = (col - q) / d  # (out,)
            w1[:, i:] -= e.unsqueeze(1) @ u1[i, i:].unsqueeze(0)  # OBS update of the block's later columns
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        prune[:, i1:i2] = p1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # lazy batch update of everything right of the block
    w[prune] = 0.0
    return w.to(weight.dtype), ~prune, {"loss": float(losses.sum()), "damping": damp, "damping_retries": retries}


@dataclasses.dataclass
class Hessian:
    h: torch.Tensor  # (in, in) fp32 running mean of 2·x xᵀ
    tokens: int = 0


class SparseGPTRun(PruneRun):
    true_sequential = True  # §3.5: each group sees the outputs of the groups already pruned

    def new_stats(self, name: str, module: nn.Linear) -> Hessian:
        n = module.in_features
        return Hessian(torch.zeros(n, n, dtype=torch.float32, device=module.weight.device))

    def add_batch(self, stats: Hessian, name: str, module: nn.Linear, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()  # (tokens, in)
        t = x.shape[0]
        if t == 0:
            return
        stats.h *= stats.tokens / (stats.tokens + t)
        stats.tokens += t
        x = x * (2.0 / stats.tokens) ** 0.5
        stats.h += x.t() @ x

    def prune(self, name: str, module: nn.Linear, stats: Hessian) -> tuple[torch.Tensor, dict[str, Any]]:
        new_w, keep, record = sparsegpt_prune(module.weight, stats.h, self.config)
        module.weight.copy_(new_w)
        return keep, record


@register(SparseGPT)
def apply_sparsegpt(model: nn.Module, config: SparseGPT, calib=None, filter_fn=None, **options: Any) -> nn.Module:
    execute(model, config, config.make_run(), calib, filter_fn, **options)
    return model
