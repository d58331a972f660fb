"""The layer Hessian ``H = 2/n * sum x x^T`` of the reconstruction objective ``||W X - W' X||^2``.

Based on GPTQ (Frantar et al., arXiv 2210.17323), §3 and §4 step 3 ("Cholesky reformulation"):
accumulate the input second moment, zero the columns of dead inputs, damp the diagonal, and take the
upper Cholesky factor of ``H^{-1}``. A Hessian that is not positive definite even after damping is
not a crash: the damping grows tenfold per retry, each retry is warned about and recorded (STYLE 14).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import CalibrationError


class HessianAccumulator:
    """Running ``2/n * sum x x^T`` over batches of inputs ``(..., in)``, kept in fp32 (fp64 on request)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H)  # (tokens, in)
        m = x.shape[0]
        if m == 0:
            return
        # Running mean so that H never holds a sum over millions of tokens (fp32 rounding).
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


@dataclass
class InverseResult:
    Hinv_upper: torch.Tensor  # upper Cholesky factor of (H + damp I)^{-1}
    damp: float  # absolute damping added to the diagonal
    retries: int  # how many times the damping was raised
    dead: int  # input columns with no signal (zero diagonal)


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Boolean mask of inputs that never fired: their column carries no information."""
    return torch.diag(H) == 0


def prepare(H: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
    """Handle dead inputs in place (H diagonal set to 1, the weight column zeroed, as GPTQ does); return the mask.

    ``W=None`` fixes only ``H``: SparseGPT keeps the weights of dead inputs, since zeroing them would change
    the sparsity it was asked for.
    """
    dead = dead_columns(H)
    H[dead, dead] = 1.0
    if W is not None:
        W[:, dead] = 0.0
    return dead


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, max_retries: int = 6,
                            name: str = "this layer") -> InverseResult:
    """Upper Cholesky factor of ``(H + d I)^{-1}`` with ``d = percdamp * mean(diag H)``, raising ``d`` on failure."""
    if not torch.isfinite(H).all():
        raise CalibrationError(f"the Hessian of {name} has NaN/inf entries: the calibration activations reaching "
                               "it are not finite (try --dtype fp32, or check the calibration data)")
    dead = int(dead_columns(H).sum())
    mean_diag = float(torch.diag(H).mean())
    if mean_diag <= 0:
        mean_diag = 1.0
    damp = percdamp * mean_diag
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(max_retries + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(U).all():
                return InverseResult(U, damp, attempt, dead)
        warnings.warn(f"Hessian of {name} is not positive definite with damping {damp:.3g}; "
                      f"retrying with {damp * 10:.3g}", RuntimeWarning, stacklevel=2)
        damp *= 10
    raise CalibrationError(f"the Hessian of {name} stayed singular after {max_retries} damping increases "
                           f"(last damping {damp / 10:.3g}); the calibration set is probably degenerate for it: "
                           "use more or more varied calibration samples")
