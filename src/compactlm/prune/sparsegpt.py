"""SparseGPT: one-shot pruning with second-order (OBS) weight reconstruction.

Based on Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(arXiv 2301.00774): §3.2 the column-by-column OBS update with one shared inverse Hessian
H⁻¹ = (2XXᵀ + λI)⁻¹ through its upper Cholesky factor, §3.3 adaptive mask selection per block of
``blocksize`` columns by w²/[H⁻¹]²_jj, §3.4 N:M by selecting within each group of M columns.

Deliberate deviations: the pruned count is allocated exactly per row (``scope='row'``) or per matrix
(``scope='layer'``) by cumulative rounding over the blocks, so sparsity is exact rather than per-block
rounded; inputs that never fire (a zero Hessian diagonal) are not zeroed, because that would change
the sparsity — their weights just carry no calibration signal.

The Hessian (accumulation, dead inputs, damping with retries, inverse Cholesky) comes from
:mod:`compactlm.primitives.hessian`, shared with GPTQ.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError
from ..primitives.hessian import HessianAccumulator, InverseResult, damped_inverse_cholesky, prepare
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


def inverse_hessian(hessian: torch.Tensor, config: SparseGPT, name: str = "this layer") -> InverseResult:
    """Upper Cholesky factor of the damped H⁻¹ (§3.2); dead inputs get H_jj = 1 and keep their weights."""
    h = hessian.detach().float().clone()
    prepare(h, None)  # dead inputs: H_jj = 1 keeps H invertible; their weights stay (see the module docstring)
    return damped_inverse_cholesky(h, float(config.dampening), max_retries=4, name=name)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, config: SparseGPT, name: str = "this layer",
                    inverse: InverseResult | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Prune ``weight`` (out, in) given the layer Hessian (in, in) = 2/N·XXᵀ.

    ``inverse`` (from :func:`inverse_hessian` of the same Hessian) skips the factorisation, e.g. for q/k/v,
    which share their input. Returns (updated weight with exact zeros, keep-mask, record with loss / damping).
    ``damping`` in the record is relative to the mean Hessian diagonal (``config.dampening``, ×10 per retry).
    """
    w = weight.detach().float().clone()  # (out, in)
    rows, cols = w.shape
    inv = inverse if inverse is not None else inverse_hessian(hessian, config, name)
    u, retries = inv.Hinv_upper, inv.retries  # H⁻¹ = UᵀU
    damp = float(config.dampening) * 10.0 ** retries
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
class SharedHessian:
    """A linear's Hessian statistics; linears fed the very same input tensor (q/k/v, gate/up) share one."""

    in_features: int
    device: torch.device
    acc: HessianAccumulator | None = None
    batches: int = 0


class SparseGPTRun(PruneRun):
    true_sequential = True  # §3.5: each group sees the outputs of the groups already pruned

    def __init__(self, config: SparseGPT, keep_dense: bool = False):
        super().__init__(config, keep_dense)
        self._last: tuple[torch.Tensor, HessianAccumulator, int] | None = None  # last input added, its Hessian
        self._inverses: dict[int, tuple[HessianAccumulator, InverseResult]] = {}

    def new_stats(self, name: str, module: nn.Linear) -> SharedHessian:
        return SharedHessian(module.in_features, module.weight.device)

    def add_batch(self, stats: SharedHessian, name: str, module: nn.Linear, inp: torch.Tensor,
                  out: torch.Tensor) -> None:
        # q/k/v (and gate/up) see the same input tensor in the same batch: accumulate XXᵀ and factor H once.
        # Holding the last input keeps its storage alive, so a matching pointer means the same tensor.
        last = self._last
        if last is not None and stats.batches == last[2] and stats.acc in (None, last[1]) \
                and inp.data_ptr() == last[0].data_ptr() and inp.shape == last[0].shape \
                and inp.stride() == last[0].stride():
            stats.acc = last[1]
        else:
            if stats.acc is None:
                stats.acc = HessianAccumulator(stats.in_features, device=stats.device)
            stats.acc.add(inp)
            self._last = (inp, stats.acc, stats.batches)
        stats.batches += 1

    def prune(self, name: str, module: nn.Linear, stats: SharedHessian) -> tuple[torch.Tensor, dict[str, Any]]:
        self._last = None
        acc = stats.acc
        if acc is None:
            raise CalibrationError(f"{name} saw no calibration batch, so SparseGPT has no Hessian for it")
        if id(acc) not in self._inverses:
            self._inverses[id(acc)] = (acc, inverse_hessian(acc.H, self.config, name))
        new_w, keep, record = sparsegpt_prune(module.weight, acc.H, self.config, name=name,
                                              inverse=self._inverses[id(acc)][1])
        module.weight.copy_(new_w)
        return keep, record

    def refine_layer(self, ctx: Any, targets: dict[str, nn.Linear],
                     reference_outputs: list[torch.Tensor] | None) -> dict[str, Any] | None:
        self._inverses.clear()
        return super().refine_layer(ctx, targets, reference_outputs)


@register(SparseGPT)
def apply_sparsegpt(model: nn.Module, config: SparseGPT, calib=None, filter_fn=None, **options: Any) -> nn.Module:
    execute(model, config, config.make_run(), calib, filter_fn, **options)
    return model
