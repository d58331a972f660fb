"""Hessian accumulation, dead columns, and damping retries on a non-PD Hessian."""

import warnings

import pytest
import torch

from compactlm.errors import CalibrationError
from compactlm.primitives.hessian import HessianAccumulator, damped_inverse_cholesky, prepare


def test_accumulator_equals_2xtx_over_n():
    torch.manual_seed(0)
    xs = [torch.randn(3, 7, 16) for _ in range(4)]
    acc = HessianAccumulator(16)
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 16) for x in xs])
    torch.testing.assert_close(acc.H, 2 * X.t() @ X / X.shape[0], rtol=1e-5, atol=1e-5)
    assert acc.n == 84


def test_dead_columns_are_zeroed():
    H = torch.eye(4)
    H[2, 2] = 0
    W = torch.ones(3, 4)
    dead = prepare(H, W)
    assert dead.tolist() == [False, False, True, False]
    assert bool((W[:, 2] == 0).all()) and float(H[2, 2]) == 1.0


def test_prepare_without_weights_fixes_only_the_hessian():
    H = torch.eye(4)
    H[1, 1] = 0
    assert prepare(H, None).tolist() == [False, True, False, False]
    assert torch.equal(H, torch.eye(4))


def test_non_pd_hessian_gets_more_damping_with_a_warning():
    v = torch.randn(8, 1)
    H = v @ v.t() - 0.5 * torch.eye(8)  # indefinite: 1% damping cannot fix it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = damped_inverse_cholesky(H, 0.01, name="layer.x")
    assert res.retries >= 1 and any("not positive definite" in str(w.message) for w in caught)
    assert torch.isfinite(res.Hinv_upper).all()


def test_nan_hessian_is_a_clear_error():
    H = torch.eye(4)
    H[0, 1] = float("nan")
    with pytest.raises(CalibrationError, match="layer.q.*NaN"):
        damped_inverse_cholesky(H, name="layer.q")
