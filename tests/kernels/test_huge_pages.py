"""kernels.huge_pages: cache buffers on 2 MB pages — same tensor contract as torch.empty, advice that takes effect."""

import pytest
import torch

from compactlm.kernels import huge_pages

BIG = (4, 1024, 1024)  # 8 MiB of bf16 = MIN_BYTES
needs_thp = pytest.mark.skipif(not huge_pages.huge_pages_available(), reason="no transparent huge pages here")


def test_big_buffer_is_a_plain_contiguous_tensor_on_aligned_memory():
    t = huge_pages.empty(BIG, torch.bfloat16)
    assert t.shape == BIG and t.dtype == torch.bfloat16 and t.is_contiguous()
    src = torch.randn(BIG).bfloat16()
    t.copy_(src)
    assert torch.equal(t, src)
    if huge_pages.huge_pages_available():
        assert t.data_ptr() % huge_pages.HUGE_PAGE == 0


@needs_thp
def test_advice_is_on_the_buffer_and_not_on_plain_ones():
    """The buffer's own mapping is advised (THPeligible); whether 2 MB pages are then granted depends on free
    memory blocks at fault time, so that is recorded by the bench (on_huge_pages), not asserted here."""
    t = huge_pages.empty(BIG, torch.bfloat16)
    t.fill_(1.0)
    assert huge_pages.huge_page_eligible(t)
    assert 0 <= huge_pages.on_huge_pages(t) <= t.nbytes
    if huge_pages.thp_mode() == "madvise":
        plain = huge_pages.empty(BIG, torch.bfloat16, enabled=False)
        plain.fill_(1.0)
        assert not huge_pages.huge_page_eligible(plain)


@pytest.mark.parametrize("shape, kwargs", [((1024,), {}), (BIG, {"enabled": False}), (BIG, {"device": "meta"})])
def test_small_disabled_or_non_cpu_buffers_are_torch_empty(shape, kwargs):
    t = huge_pages.empty(shape, torch.float32, **kwargs)
    assert t.shape == shape and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes


def test_refused_advice_warns_once_and_keeps_the_buffer(monkeypatch):
    if not huge_pages.huge_pages_available():
        pytest.skip("no transparent huge pages here")

    def refuse(region, offset, length):  # as a kernel that refuses the advice
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(huge_pages, "_advise", refuse)
    monkeypatch.setattr(huge_pages, "_WARNED", False)
    with pytest.warns(UserWarning, match="MADV_HUGEPAGE"):
        t = huge_pages.empty(BIG, torch.float16)
    t.fill_(2.0)
    assert bool((t == 2.0).all())


@pytest.mark.parametrize("flag", [True, False])
def test_sals_cache_grows_onto_huge_pages_unless_disabled(flag):
    """SALSLayer's key and value buffers of ≥ 8 MB come from huge_pages.empty; huge_pages=False keeps torch.empty."""
    from compactlm.attention.sals_cache import SALSLayer

    layer = SALSLayer(torch.randn(8, 128, 64).bfloat16(), rope_table=None, layer_idx=0, mode="index",
                      score_dims=32, huge_pages=flag)
    like = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    layer._grow(1, 4096, like, like)  # 8 heads x 4096 tokens x 128 x 2 B = 8 MiB each for keys and values
    for buf in (layer._keys, layer._values):
        assert buf.shape == (1, 8, 4096, 128) and buf.is_contiguous()
        if flag and huge_pages.huge_pages_available():
            assert buf.data_ptr() % huge_pages.HUGE_PAGE == 0 and huge_pages.huge_page_eligible(buf)
        elif huge_pages.thp_mode() == "madvise":
            assert not huge_pages.huge_page_eligible(buf)
