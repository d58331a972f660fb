import math

import pytest
import torch

from compactlm.inspector import metrics as M


@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 5, 64)])
def test_identical_tensors(shape):
    x = torch.randn(*shape)
    assert M.cosine(x, x.clone()) == pytest.approx(1.0)
    assert M.sqnr_db(x, x.clone()) == math.inf
    assert M.noise_to_signal(x, x.clone()) == 0.0
    assert M.max_abs(x, x.clone()) == 0.0
    assert M.relative_frobenius(x, x.clone()) == 0.0
    assert M.kl_from_logits(x, x.clone()).abs().max() < 1e-12
    p = torch.softmax(x, -1)
    assert M.kl_from_probs(p, p.clone()).abs().max() < 1e-12
    s = M.ErrorStats()
    s.update(x, x.clone())
    s.update_kl(M.kl_from_logits(x, x))
    out = s.summary()
    assert out["cosine"] == pytest.approx(1.0) and out["sqnr_db"] == math.inf and out["kl"] == pytest.approx(0.0)
    assert not s.differs


def test_sqnr_matches_torch_ao():
    utils = pytest.importorskip("torch.ao.ns.fx.utils")
    g = torch.Generator().manual_seed(0)
    for shape in [(16,), (8, 128), (3, 4, 50)]:
        x = torch.randn(*shape, generator=g)
        y = x + 0.05 * torch.randn(*shape, generator=g)
        expected = float(utils.compute_sqnr(x, y))
        assert M.sqnr_db(x, y) == pytest.approx(expected, rel=1e-5)
        stats = M.ErrorStats()
        stats.update(x, y)
        assert stats.summary()["sqnr_db"] == pytest.approx(expected, rel=1e-5)
        nsr = M.noise_to_signal(x, y)
        assert nsr == pytest.approx(10 ** (-expected / 10), rel=1e-4)
        assert M.relative_frobenius(x, y) == pytest.approx(math.sqrt(nsr))


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(6, 40, generator=g)
    cand = ref + 0.1 * torch.randn(6, 40, generator=g)
    s = M.ErrorStats()
    for a, b in zip(ref.split(2), cand.split(2), strict=True):
        part = M.ErrorStats()
        part.update(a, b)
        s.merge(part)
    out = s.summary()
    assert out["sqnr_db"] == pytest.approx(M.sqnr_db(ref, cand), rel=1e-6)  # fp32 reductions per batch
    assert out["cosine"] == pytest.approx(M.cosine(ref, cand), rel=1e-6)
    assert out["max_abs"] == pytest.approx(M.max_abs(ref, cand))
    assert sum(s.hist) == ref.numel()  # small batches: every nonzero error lands in one bin
    big = M.ErrorStats()
    big.update(torch.zeros(1 << 20), torch.full((1 << 20,), 1e-3))
    assert 0 < sum(big.hist) <= 2 * M.HIST_SAMPLE  # large ones are sampled, so the cost stays flat


def test_kl_known_values():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.75, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(M.kl_from_probs(p, q)) == pytest.approx(expected)
    assert float(M.kl_from_logits(p.clamp_min(1e-30).log(), q.clamp_min(1e-30).log())) == pytest.approx(expected,
                                                                                                        rel=1e-4)
    dropped = torch.tensor([[1.0, 0.0, 0.0]])  # a sparse candidate dropped mass the reference kept
    kl = float(M.kl_from_probs(p, dropped))
    assert math.isfinite(kl) and kl > 5


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape mismatch"):
        M.sqnr_db(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="shape mismatch"):
        M.ErrorStats().update(torch.zeros(3), torch.zeros(4))
