"""Compiled CPU decode kernels (impl="cpu") vs the tensor path and the plain references, on random inputs."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_sparse_decode import _err, _inputs

from compactlm.attention.selection import forced_mask, sortable_keys, topk_tokens
from compactlm.kernels import sparse_decode_cpu as cpu
from compactlm.kernels.reference import masked_attention_reference, sals_decode_reference
from compactlm.kernels.sparse_decode import SelectParams, gather_heads, grouped_attention, sals_decode

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("ninja") is None,
                                reason="impl='cpu' builds C++ with g++ and ninja; neither fallback nor build here")


def _masked_keys(pooled, sink, recent, positions, valid):
    """The int32 keys topk_tokens ranks by: padding -inf, sink and recent +inf, in the float order."""
    s = pooled.clone()
    if valid is not None:
        s.masked_fill_(~valid[:, None, :], float("-inf"))
    forced = forced_mask(pooled.shape[-1], sink, recent, positions, valid)
    if forced is not None:
        s.masked_fill_(forced[:, None, :], float("inf"))
    return sortable_keys(s)


def _assert_same_up_to_ties(keys, got, ref):
    """Same multiset of keys chosen, and every slot strictly above the n-th key chosen by both."""
    assert got.shape == ref.shape
    assert bool((got.diff(dim=-1) > 0).all()), "slots must be unique and ascending"
    kg, kr = keys.gather(-1, got), keys.gather(-1, ref)
    assert torch.equal(kg.sort(-1).values, kr.sort(-1).values)
    kth = kr.amin(-1, keepdim=True)
    above = keys > kth
    assert torch.equal(above.sum(-1), (kg > kth).sum(-1))
    chosen = torch.zeros_like(above).scatter_(-1, got, True)
    assert bool((chosen | ~above).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,g", [(2, 4), (3, 3), (8, 3), (8, 4), (8, 5), (16, 1)])
@pytest.mark.parametrize("length", [301, 1027])
def test_pooled_topk_same_set_as_topk(dtype, hkv, g, length):
    """Both pooling paths (G > 1 in C++, G = 1 pre-pooled), the vector path (16 % H_kv == 0) and the scalar one."""
    gen = torch.Generator().manual_seed(length + hkv)
    b, sink, recent, k = 2, 4, 8, length // 7
    scores = torch.randn(b, length, g * hkv, generator=gen, dtype=torch.float64).to(dtype)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :37] = False  # left padding on row 1
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    pooled = scores.view(b, length, g, hkv).amax(2).transpose(1, 2)  # (B, H_kv, L)
    ref = topk_tokens(pooled, k, sink, recent, positions, valid)
    n = ref.shape[-1]
    got = cpu.pooled_topk(scores, hkv, n, forced_mask(length, sink, recent, positions, valid), valid)
    _assert_same_up_to_ties(_masked_keys(pooled, sink, recent, positions, valid), got, ref)
    pre = cpu.pooled_topk(pooled.transpose(1, 2).contiguous(), hkv, n, forced_mask(length, sink, recent, positions,
                                                                                   valid), valid)
    assert torch.equal(pre, got)
    unpadded = cpu.pooled_topk(scores, hkv, n, sink_slots=sink, recent_slots=recent)  # slot ranges, no mask tensor
    ref_unpadded = topk_tokens(pooled, k, sink, recent)
    _assert_same_up_to_ties(_masked_keys(pooled, sink, recent, None, None), unpadded, ref_unpadded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_topk_many_ties_and_negative_scores(dtype):
    """Coarse scores (few distinct values, most negative): ties at the n-th value are split exactly."""
    gen = torch.Generator().manual_seed(7)
    scores = (torch.randint(-40, 3, (1, 999, 8), generator=gen).double() / 4).to(dtype)
    pooled = scores.transpose(1, 2)
    for k in (1, 100, 500, 990):
        ref = topk_tokens(pooled, k, 0, 0)
        got = cpu.pooled_topk(scores, 8, ref.shape[-1])
        _assert_same_up_to_ties(sortable_keys(pooled), got, ref)


def test_pooled_topk_fp32_keys_need_all_32_bits():
    """fp32 scores that agree in their top 16 bits: the bisection must resolve the low bits."""
    base = torch.full((1, 500, 2), 1.0)
    noise = torch.arange(1000, dtype=torch.float32).view(1, 500, 2) * 1e-7
    scores = (base + noise)[:, torch.randperm(500, generator=torch.Generator().manual_seed(1))]
    ref = topk_tokens(scores.transpose(1, 2), 37)
    got = cpu.pooled_topk(scores.contiguous(), 2, 37)
    assert torch.equal(got, ref.sort(-1).values)


def _attend_case(dtype, g, hkv=3, d=64, length=257, n=61, seed=0, cap=300):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hkv, g, d, generator=gen, dtype=torch.float64).to(dtype)
    big_k = torch.randn(2, hkv, cap, d, generator=gen, dtype=torch.float64).to(dtype)
    big_v = torch.randn(2, hkv, cap, d, generator=gen, dtype=torch.float64).to(dtype)
    keys, values = big_k[:, :, :length], big_v[:, :, :length]  # a cache's capacity slice, read in place
    idx = torch.stack([torch.randperm(length, generator=gen)[:n] for _ in range(2 * hkv)]).view(2, hkv, n)
    ok = torch.rand(2, hkv, n, generator=gen) > 0.25
    return q, keys, values, idx, ok


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("g", [3, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_chosen_matches_reference(dtype, atol, g, masked):
    """GQA groups 3 and 4, odd counts, a validity mask, strided cache slices; fp64 runs the generic C++ loop."""
    q, keys, values, idx, ok = _attend_case(dtype, g)
    ok = ok if masked else None
    got = cpu.attend_chosen(q, keys, values, idx, 0.125, ok)
    keep = torch.zeros(2, 3, keys.shape[2], dtype=torch.bool)
    for b in range(2):
        for h in range(3):
            sel = idx[b, h] if ok is None else idx[b, h][ok[b, h]]
            keep[b, h, sel] = True
    ref = masked_attention_reference(q.reshape(2, 3 * g, 1, 64), keys, values, keep, 0.125)  # (B, 1, H, D)
    ref = ref.view(2, 3, g, 64)
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.allclose(got.double(), ref.double(), atol=atol, rtol=0), _err(got, ref)
    tensor_path = grouped_attention(q, gather_heads(keys, idx), gather_heads(values, idx), 0.125, ok)
    assert torch.allclose(got.double(), tensor_path.double(), atol=2 * atol, rtol=0), _err(got, tensor_path)


def test_attend_chosen_checks_its_inputs():
    q, keys, values, idx, _ = _attend_case(torch.float32, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.attend_chosen(q, keys, values, idx + keys.shape[2], 0.1)
    with pytest.raises(ValueError, match="share a dtype"):
        cpu.attend_chosen(q, keys.double(), values, idx, 0.1)


@pytest.mark.parametrize("shape", [(1, 4, 2, 16, 97, 8), (2, 8, 2, 32, 300, 16), (2, 9, 3, 64, 257, 48)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("mode", ["index", "compressed"])
def test_sals_decode_cpu_matches_reference(shape, dtype, pool, mode):
    """impl='cpu' end to end: the reference's selection exactly (fp32/fp64 have no ties) and its output."""
    b, h, hkv, d, length, r = shape
    q, qc, qs, latent, values, pos, proj, ct, st, valid = _inputs(b, h, hkv, d, length, r, dtype, padded=b > 1)
    keys = torch.randn(b, hkv, length, d, dtype=torch.float64).to(dtype) if mode == "index" else None
    p = SelectParams(k=length // 8, sink=4, recent=8, pool=pool)
    args = (q, qc, qs, latent, values, pos, proj, r // 2, ct, st, p, 0.125)
    out, idx = sals_decode(*args, valid=valid, keys=keys, impl="cpu")
    ref, ridx = sals_decode_reference(*args, valid=valid, keys=keys)
    assert torch.equal(idx, ridx.sort(-1).values)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(out, ref, atol=tol, rtol=0), _err(out, ref)


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("shape,seed", [((2, 9, 3, 64, 257, 48), 2), ((2, 16, 4, 64, 517, 64), 4)])
def test_sals_decode_cpu_bf16_same_selection_up_to_ties(pool, shape, seed):
    """bf16 scores tie often: the selection is the one the C++ latent queries' scores give, up to ties, and the output
    the reference on it. 3 KV heads: the scoring GEMM and pooled_topk; 4 KV heads x 4 with max pooling (16 query
    columns): scored_topk (where the CPU has AVX512-BF16)."""
    b, h, hkv, d, length, r = shape
    q, qc, qs, latent, values, pos, proj, ct, st, valid = _inputs(b, h, hkv, d, length, r, torch.bfloat16, seed=seed,
                                                                  padded=True)
    keys = torch.randn(b, hkv, length, d, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    p = SelectParams(k=length // 8, sink=4, recent=8, pool=pool)
    args = (q, qc, qs, latent, values, pos, proj, r // 2, ct, st, p, 64 ** -0.5)
    columns = h if pool == "max" else hkv
    if hkv == 3 or pool == "mean":
        assert not cpu.fused_scoring_applies(latent[:, :, : r // 2], hkv, columns)
    elif not cpu.fused_scoring_applies(latent[:, :, : r // 2], hkv, columns):
        pytest.skip("scored_topk needs a CPU with AVX512-BF16")
    out, idx = sals_decode(*args, valid=valid, keys=keys, impl="cpu")
    # Ranked by the scores of the C++ latent queries (rounded once; the tensor path rounds every op, which can
    # move a score by a bf16 step): the tensor path's pooling and topk_tokens on them give the same set up to ties.
    cols = cpu.latent_queries(q.view(b, hkv, h // hkv, d), qc, qs, proj[:, :, : r // 2].contiguous(), pool == "mean")
    s = torch.stack([torch.mm(latent[i, :, : r // 2], cols[i].t()) for i in range(b)]).view(b, length, -1, hkv)
    pooled = s.amax(2).transpose(1, 2)
    tidx = topk_tokens(pooled, p.k, p.sink, p.recent, pos, valid)
    _assert_same_up_to_ties(_masked_keys(pooled, 4, 8, pos, valid), idx, tidx.sort(-1).values)
    keep = torch.zeros(b, hkv, length, dtype=torch.bool).scatter_(2, idx, True) & valid[:, None]
    ref = masked_attention_reference(q.double(), keys.double(), values.double(), keep, 64 ** -0.5)
    assert torch.allclose(out.double(), ref, atol=2e-2), _err(out, ref)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_latent_queries_match_unrope_then_project(dtype, tol, mean, scaled):
    """The C++ query side equals unrope + latent_queries of the tensor path (fp64 reference), rows (G', H_kv)."""
    from compactlm.kernels.sparse_decode import latent_queries, unrope

    gen = torch.Generator().manual_seed(5)
    b, hkv, g, d, rs = 2, 3, 3, 64, 24
    q = torch.randn(b, hkv, g, d, generator=gen, dtype=torch.float64)
    ang = torch.rand(b, 1, d // 2, generator=gen, dtype=torch.float64) * 6.3
    ang = torch.cat([ang, ang], -1)
    s = 1.3 if scaled else 1.0  # families that fold an attention scale into cos/sin (unrope divides it out)
    cos, sin = s * ang.cos(), s * ang.sin()
    proj = torch.randn(hkv, d, rs, generator=gen, dtype=torch.float64)
    ref = latent_queries(unrope(q, cos[:, None], sin[:, None]), proj, mean)
    got = cpu.latent_queries(q.to(dtype), cos.to(dtype), sin.to(dtype), proj.to(dtype), mean)
    assert got.dtype == dtype and got.shape == (b, (1 if mean else g) * hkv, rs)
    assert torch.allclose(got.double(), ref, atol=tol * ref.abs().max().item(), rtol=0), _err(got.double(), ref)
    with pytest.raises(ValueError, match="needs proj"):
        cpu.latent_queries(q, cos, sin, proj[:, :-1])


@pytest.fixture
def needs_fused_scoring():
    """Skip where the build has no scored_topk (asked when the test runs: no C++ build at collection)."""
    if not cpu.fused_scoring_applies(torch.zeros(1, 2, 32, dtype=torch.bfloat16), 8, 16):
        pytest.skip("scored_topk needs a CPU with AVX512-BF16")


_FUSED = pytest.mark.usefixtures("needs_fused_scoring")


@_FUSED
@pytest.mark.parametrize("b,length,r,g,hkv", [(1, 4099, 128, 4, 8), (2, 301, 64, 4, 4), (1, 17, 96, 8, 2),
                                              (2, 33, 24, 16, 1), (1, 300, 256, 2, 16), (1, 99, 8, 9, 4),
                                              (1, 50, 32, 12, 4)])
@pytest.mark.parametrize("padded", [False, True])
def test_scored_topk_same_set_as_gemm_then_pooled_topk(b, length, r, g, hkv, padded):
    """Fused scoring + pooling + selection = GEMM scores (bf16) then pooled_topk, up to ties; partial tiles (12, 36,
    40 columns), token tails, strided rows (a compressed-mode slice), padding and forced slots included."""
    gen = torch.Generator().manual_seed(length + r)
    wide = torch.randn(b, length, r + 16, generator=gen).bfloat16()
    z = wide[:, :, :r]  # rows contiguous, row stride r + 16
    cols = torch.randn(b, g * hkv, r, generator=gen).bfloat16()
    n = max(1, length // 8) + 12
    scores = torch.stack([torch.mm(z[i], cols[i].t()) for i in range(b)])
    if padded:
        valid = torch.ones(b, length, dtype=torch.bool)
        valid[0, : length // 5] = False
        pos = (valid.cumsum(-1) - 1).clamp(min=0)
        forced = forced_mask(length, 4, 8, pos, valid)
        got = cpu.scored_topk(z, cols, hkv, n, forced, valid)
        ref = cpu.pooled_topk(scores, hkv, n, forced, valid)
    else:
        valid = pos = None
        got = cpu.scored_topk(z, cols, hkv, n, sink_slots=4, recent_slots=8)
        ref = cpu.pooled_topk(scores, hkv, n, sink_slots=4, recent_slots=8)
    pooled = scores.view(b, length, g, hkv).amax(2).transpose(1, 2)
    _assert_same_up_to_ties(_masked_keys(pooled, 4, 8, pos, valid), got, ref)


@_FUSED
def test_scored_topk_refuses_what_it_does_not_take():
    z, cols = torch.randn(1, 64, 32).bfloat16(), torch.randn(1, 9, 32).bfloat16()
    with pytest.raises(ValueError, match="H_kv dividing 16"):
        cpu.scored_topk(z, cols, 3, 8)  # 3 KV heads: sals_select_cpu runs the GEMM path
    with pytest.raises(ValueError, match="at least 16"):
        cpu.scored_topk(z, cols[:, :8], 8, 8)
    with pytest.raises(ValueError, match="H_kv dividing 16"):
        cpu.scored_topk(z.float(), cols.float(), 8, 8)
    with pytest.raises(ValueError, match=">= 0"):
        cpu.scored_topk(z, torch.randn(1, 16, 32).bfloat16(), 8, 8, sink_slots=-1)


def test_cpu_impl_refuses_what_it_does_not_do():
    from compactlm.errors import ConfigError

    q, qc, qs, latent, values, pos, proj, ct, st, _ = _inputs(1, 4, 2, 32, 64, 16, torch.float32)
    for params in (SelectParams(k=8, sink=2, recent=4, block=8), SelectParams(k=8, sink=2, recent=4, pool="softmax")):
        with pytest.raises(ConfigError, match="impl='cpu'"):
            sals_decode(q, qc, qs, latent, values, pos, proj, 8, ct, st, params, 0.2, impl="cpu")


def test_build_failure_raises_instead_of_falling_back(monkeypatch):
    """A failed build is an error that names the fix; impl='cpu' never drops to the tensor path by itself."""
    import torch.utils.cpp_extension as ext

    def broken(*a, **k):
        raise RuntimeError("g++: fatal error: no input files")

    monkeypatch.setattr(cpu, "_MODULE", None)
    monkeypatch.setattr(ext, "load_inline", broken)
    q, qc, qs, latent, values, pos, proj, ct, st, _ = _inputs(1, 4, 2, 32, 64, 16, torch.float32)
    params = SelectParams(k=8, sink=2, recent=4)
    with pytest.raises(cpu.CpuKernelBuildError, match="impl='torch'"):
        sals_decode(q, qc, qs, latent, values, pos, proj, 8, ct, st, params, 0.2, impl="cpu")
    assert not cpu.available()


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_cached_projection_follows_in_place_changes(impl):
    """sals_decode keeps the projection's contiguous scoring columns per buffers object: reused while the tensor is
    the same and unmodified, rebuilt after an in-place change or for another r*."""
    from compactlm.kernels.sparse_decode import DecodeBuffers

    q, qc, qs, latent, values, pos, proj, ct, st, _ = _inputs(1, 4, 2, 32, 120, 16, torch.float64)
    keys = torch.randn(1, 2, 120, 32, dtype=torch.float64)
    p = SelectParams(k=15, sink=2, recent=4)
    bufs = DecodeBuffers()
    step = dict(keys=keys, buffers=bufs, impl=impl)
    first, _ = sals_decode(q, qc, qs, latent, values, pos, proj, 8, ct, st, p, 0.2, **step)
    cached = bufs.derived_store["proj_score"][3]
    again, _ = sals_decode(q, qc, qs, latent, values, pos, proj, 8, ct, st, p, 0.2, **step)
    assert torch.equal(first, again) and bufs.derived_store["proj_score"][3] is cached
    proj.mul_(-1.0)  # in place: the scores flip sign, so the selection must change
    flipped, idx = sals_decode(q, qc, qs, latent, values, pos, proj, 8, ct, st, p, 0.2, **step)
    ref, ridx = sals_decode_reference(q, qc, qs, latent, values, pos, proj, 8, ct, st, p, 0.2, keys=keys)
    assert torch.equal(idx.sort(-1).values, ridx.sort(-1).values)
    assert torch.allclose(flipped, ref, atol=1e-10) and not torch.allclose(flipped, first)
    sals_decode(q, qc, qs, latent, values, pos, proj, 4, ct, st, p, 0.2, **step)
    assert bufs.derived_store["proj_score"][3].shape[-1] == 4


def test_bench_rows_for_the_compiled_methods():
    """The bench's -cpu and -wide-cpu methods run and report the same ideal ratio as their tensor-path twins."""
    from compactlm.cli.bench_decode import run_bench

    methods = ["sals-index", "sals-index-cpu", "sals-index-wide-cpu", "sals-index-mean-cpu", "sals-cpu"]
    rows = run_bench([512], methods, torch.bfloat16, repeats=2, threads=[1])
    by = {r["method"]: r for r in rows}
    assert set(by) == set(methods)
    assert by["sals-index-cpu"]["ideal_ratio"] == by["sals-index"]["ideal_ratio"] == by["sals-index-wide-cpu"][
        "ideal_ratio"]
    assert all(r["cpu_ms"] > 0 and r["ratio_cpu"] > 0 for r in rows)


def test_bench_records_the_huge_page_state(monkeypatch):
    """ATTN-decode results depend on huge pages (TLB misses of the gathers): the JSON says which were in force."""
    from compactlm.cli.bench_decode import huge_page_state

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert huge_page_state()["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert huge_page_state()["THP_MEM_ALLOC_ENABLE"] is None


def test_bench_cache_pages_option_is_what_the_rows_report():
    """ATTN-decode's cache buffers follow --cache-pages, and each row says how much of K/V the kernel put on 2 MB
    pages (8K tokens: 16 MiB each for K and V, above huge_pages.MIN_BYTES). The grant depends on free 2 MB blocks,
    so it is bounded here; that 4 KB pages get none is certain in THP mode madvise."""
    from compactlm.cli.bench_decode import run_bench
    from compactlm.kernels.huge_pages import huge_pages_available, thp_mode

    huge = run_bench([8192], ["sals-index"], torch.bfloat16, repeats=2, threads=[1], huge_pages=True)
    small = run_bench([8192], ["sals-index"], torch.bfloat16, repeats=2, threads=[1], huge_pages=False)
    assert 0 <= huge[0]["kv_on_huge_pages"] <= 1
    if thp_mode() == "madvise" or not huge_pages_available():
        assert small[0]["kv_on_huge_pages"] == 0
