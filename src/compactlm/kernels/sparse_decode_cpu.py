"""Compiled CPU kernels of the sparse decode step: pooled exact top-k, and select-gather-attend in one pass.

The SALS decode step (arXiv 2510.24273, §4) in ``index`` mode reads the latent scoring columns of every
cached token, then only the chosen tokens' keys and values. The tensor path (:mod:`.sparse_decode`) spends
most of its time between those reads, not in them (32K tokens, bf16, 1 thread, 5 Dec 2026): pooling the
scores over each KV head's query heads (0.5 ms), ``topk`` over 8 × 32K scores (1.7-2.2 ms), copying the
chosen keys out before ``q·kᵀ`` (1.0 ms), the fp32 softmax (0.5 ms) and the value gather (1.2 ms). Two small
C++ loops replace them:

- :func:`pooled_topk`: per KV head, the max over its query heads' scores (read straight from the scoring GEMM's
  bf16 output), mapped to order-preserving uint32 keys, then the n-th largest key by a search on its bits (two
  bits per vectorised counting pass) and one pass that emits every slot above it plus the first slots equal to
  it. The same set as ``topk`` up to ties at the n-th value, in ascending slot order (which also makes the
  gathers that follow read the cache front to back).
- :func:`scored_topk`: the scoring GEMM, the pooling and the keys in one pass, then :func:`pooled_topk`'s
  selection (bf16 latent keys, AVX512-BF16, H_kv dividing 16, from 16 query columns). Lanes hold 16 query columns;
  one ``vdpbf16ps`` adds a broadcast latent pair's products for them, six tokens share each column load, the
  max over a KV head's query columns is taken in registers, and no score matrix is written. At ATTN-decode shapes
  (32 columns, r* 128, 32K tokens, 1 thread, after a dense step) 2.26 ms against 2.59 ms for oneDNN's GEMM and
  :func:`pooled_topk` (``benchmarks/results/attn_decode/scoring_and_gather_check.py``).
  Scores are rounded to bf16 as the GEMM's output is, but summed in another order: the selection is the
  GEMM path's up to near-ties.
- :func:`latent_queries`: the query side of the scoring, undo RoPE on each query head and project it on its KV
  head's r* latent columns, in one call instead of the eight small tensor ops (and a batched matmul) it replaces,
  which cost 0.35–0.44 ms per step at ATTN-decode shapes — about 5 % of the whole step at 32K, a quarter of it at
  4K. Computed in fp32 and rounded once, where the tensor path rounds bf16 after every op: scores can differ by a
  bf16 step, so the selection equals the tensor path's only up to near-ties.
- :func:`attend_chosen`: for each KV head, ``q·k`` over the chosen key rows read in place from the cache (rows
  prefetched 32 ahead into L2 and 4 ahead into L1), softmax, and ``p·V`` over the chosen value rows, in fp32
  (fp64 for fp64 inputs), without copying a row out.

The C++ is built on first use with ``torch.utils.cpp_extension.load_inline`` (g++, ninja; ``-O3 -march=native``:
it is compiled on the machine that runs it). Nothing falls back silently: ``impl="cpu"`` of
:func:`compactlm.kernels.sparse_decode.sals_decode` asks for these kernels, and a failed build raises
:class:`CpuKernelBuildError` with the compiler's message; ``impl="torch"`` is the tensor path. References:
``topk_tokens`` (:mod:`compactlm.attention.selection`), ``torch.mm`` then :func:`pooled_topk` for
:func:`scored_topk`,
:func:`compactlm.kernels.sparse_decode.latent_queries` after ``unrope`` and
:func:`compactlm.kernels.reference.masked_attention_reference`.
"""

from __future__ import annotations

import hashlib
import platform
import threading
from typing import Any

import torch

from ..errors import CompactLMError, ConfigError
from .sparse_decode_cpu_src import CPP, DECLS


class CpuKernelBuildError(CompactLMError):
    """The compiled CPU decode kernels could not be built (no compiler or ninja, or a compile error)."""


_LOCK = threading.Lock()
_MODULE: Any = None


def _build() -> Any:
    """Compile (or load from torch's extension cache) the C++ of sparse_decode_cpu_src; raise CpuKernelBuildError."""
    global _MODULE
    with _LOCK:
        if _MODULE is not None:
            return _MODULE
        from torch.utils.cpp_extension import load_inline

        # The name carries the source and the CPU: -march=native code must not be reused on another CPU model.
        tag = hashlib.sha1((CPP + platform.machine() + platform.processor() + _cpu_model()).encode()).hexdigest()[:12]
        try:
            _MODULE = load_inline(name=f"compactlm_decode_cpu_{tag}", cpp_sources=[DECLS, CPP],
                                  functions=["attend_chosen", "fused_scoring_available", "latent_queries",
                                             "pooled_topk", "scored_topk"],
                                  extra_cflags=["-O3", "-march=native", "-fno-math-errno"], verbose=False)
        except Exception as e:  # a compiler, ninja or link failure: say so, never fall back silently
            raise CpuKernelBuildError(
                f"building the compiled CPU decode kernels failed ({type(e).__name__}: {str(e)[-800:]}); "
                "install g++ and ninja, or use impl='torch'") from e
        return _MODULE


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def available() -> bool:
    """Whether the kernels build here (builds them once; a failure is remembered only as this False)."""
    try:
        _build()
    except CpuKernelBuildError:
        return False
    return True


def pooled_topk(scores: torch.Tensor, kv_heads: int, n: int, forced: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, sink_slots: int = 0, recent_slots: int = 0) -> torch.Tensor:
    """Slots (B, H_kv, n), ascending, of the n best max-pooled scores per KV head.

    scores (B, L, G·H_kv) token-major with columns ordered (G, H_kv) (as
    :func:`compactlm.kernels.sparse_decode.latent_scores` returns them); forced (B, L) bool slots always taken
    (sink and recent), valid (B, L) bool real tokens (others rank last); ``sink_slots``/``recent_slots`` force
    the first/last slots without a mask tensor (what ``forced_mask`` gives when nothing is padded). The same set
    as ``topk_tokens(pooled, k, sink, recent, positions, valid)`` up to ties at the n-th value.
    """
    b, length = scores.shape[:2]
    slots = _slot_args("pooled_topk", b, length, forced, valid, sink_slots, recent_slots)
    return _build().pooled_topk(scores.reshape(b, length, -1).contiguous(), kv_heads, n, *slots)


def _slot_args(name: str, b: int, length: int, forced: torch.Tensor | None, valid: torch.Tensor | None,
               sink_slots: int, recent_slots: int) -> tuple:
    """The C++ selections' slot arguments: (B, L) contiguous forced/valid flags (or None), checked slot counts."""
    if sink_slots < 0 or recent_slots < 0:
        raise ConfigError(f"{name}: sink_slots/recent_slots must be >= 0, got {sink_slots}, {recent_slots}")

    def flag(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.expand(b, length).contiguous()

    return flag(forced), flag(valid), int(sink_slots), int(recent_slots)


_FUSED: bool | None = None  # whether this build has scored_topk (AVX512-BF16), asked once


def fused_scoring_applies(z_score: torch.Tensor, kv_heads: int, columns: int) -> bool:
    """Whether :func:`sals_select_cpu` scores with :func:`scored_topk` rather than the GEMM and :func:`pooled_topk`.

    It takes bf16 latent keys in whole pairs of dims (even r* and strides, 4-byte aligned), H_kv dividing 16, and a
    build with AVX512-BF16; and it is used from 16 query columns (G·H_kv) up: with fewer, half of each 16-lane tile
    is padding, and at 8 columns it ran level with the GEMM path in a development run (32K tokens, r* 128, 1
    thread: 2.44 vs 2.41 ms; at 32 columns 2.26 vs 2.59 ms in scoring_and_gather_check.py). Both give the same
    selection up to near-ties.
    """
    global _FUSED
    if _FUSED is None:
        _FUSED = bool(_build().fused_scoring_available())
    return (_FUSED and columns >= 16 and z_score.dtype == torch.bfloat16 and z_score.dim() == 3
            and z_score.stride(-1) == 1 and z_score.shape[-1] % 2 == 0 and z_score.stride(1) % 2 == 0
            and z_score.stride(0) % 2 == 0 and z_score.data_ptr() % 4 == 0 and 16 % kv_heads == 0)


def scored_topk(z_score: torch.Tensor, cols: torch.Tensor, kv_heads: int, n: int, forced: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, sink_slots: int = 0, recent_slots: int = 0) -> torch.Tensor:
    """Slots (B, H_kv, n), ascending, of the n best scores z·c max-pooled over each KV head's query columns.

    z_score (B, L, r*) bf16 latent keys (rows contiguous, any row stride), cols (B, G·H_kv, r*) latent queries with
    rows ordered (G, H_kv); forced/valid/sink_slots/recent_slots as in :func:`pooled_topk`. The same slots as
    ``pooled_topk(z @ colsᵀ, ...)`` up to ties at the n-th value (the scores are rounded to bf16 as the GEMM's
    output is, but summed in another order, so a score can differ by a bf16 step). Needs
    :func:`fused_scoring_applies`.
    """
    b, length = z_score.shape[:2]
    slots = _slot_args("scored_topk", b, length, forced, valid, sink_slots, recent_slots)
    if not fused_scoring_applies(z_score, kv_heads, cols.shape[1]):
        raise ConfigError("scored_topk: needs bf16 latent keys in whole pairs, H_kv dividing 16 and at least 16 "
                          "query columns, on a CPU with AVX512-BF16 (see fused_scoring_applies); use pooled_topk on "
                          "the GEMM's scores")
    return _build().scored_topk(z_score, cols.contiguous(), kv_heads, n, *slots)


def attend_chosen(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, scaling: float,
                  valid: torch.Tensor | None = None, prefetch: int = 4, prefetch_l2: int = 32) -> torch.Tensor:
    """Exact attention of grouped queries q (B, H_kv, G, D) over slots idx (B, H_kv, n) -> (B, H_kv, G, D).

    keys/values (B, H_kv, L, D) are read in place (any strides with contiguous rows, e.g. a cache's
    ``[:, :, :length]`` slice); valid (B, H_kv, n) bool masks chosen slots out. Softmax in fp32 (fp64 for fp64).
    """
    if q.dtype != keys.dtype or q.dtype != values.dtype:
        raise ConfigError(f"attend_chosen: q, keys and values must share a dtype, got {q.dtype}, {keys.dtype}, "
                          f"{values.dtype}")
    if prefetch < 0 or prefetch_l2 < 0:
        raise ConfigError(f"attend_chosen: prefetch distances are rows ahead (>= 0), got {prefetch}, {prefetch_l2}")
    mask = None if valid is None else valid.contiguous()
    return _build().attend_chosen(q.contiguous(), keys, values, idx.long().contiguous(), mask, float(scaling),
                                  int(prefetch), int(prefetch_l2))


def latent_queries(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, proj_score: torch.Tensor,
                   mean_over_group: bool = False) -> torch.Tensor:
    """Latent queries of post-RoPE q (B, H_kv, G, D) -> (B, G'·H_kv, r*), rows ordered (G', H_kv) (G' = 1: mean).

    cos/sin (B, D) (or (B, 1, D)) the query's RoPE rows, proj_score (H_kv, D, r*). The same numbers as
    ``latent_queries(unrope(q, cos, sin), proj_score, mean_over_group)`` of :mod:`.sparse_decode`, computed in
    fp32 (fp64 for fp64) and rounded once to q's dtype.
    """
    b, hkv, _, d = q.shape
    if proj_score.shape[:2] != (hkv, d) or cos.numel() != b * d or sin.numel() != b * d:
        raise ConfigError(f"latent_queries: q {tuple(q.shape)} needs proj (H_kv={hkv}, D={d}, r*) and cos/sin of "
                          f"{b}x{d} values; got proj {tuple(proj_score.shape)}, cos {tuple(cos.shape)}")
    dt = q.dtype
    return _build().latent_queries(q.contiguous(), cos.to(dt).reshape(b, d).contiguous(),
                                   sin.to(dt).reshape(b, d).contiguous(), proj_score.to(dt).contiguous(),
                                   bool(mean_over_group))


def sals_select_cpu(q: torch.Tensor, q_cos: torch.Tensor, q_sin: torch.Tensor, proj_score: torch.Tensor,
                    z_score: torch.Tensor, params: Any, positions: torch.Tensor | None, valid: torch.Tensor | None,
                    buffers: Any) -> torch.Tensor:
    """SALS token selection (latent scores, head pooling, top-k + sink + recent) -> slots (B, H_kv, n), ascending.

    q (B, H_kv, G, D) post-RoPE with its RoPE rows q_cos/q_sin (B, 1, D). The same selection as
    ``select(pooled_latent_scores(unrope(q, ...), ...), params, ...)`` of :mod:`.sparse_decode` up to ties at the
    n-th score (and near-ties: :func:`latent_queries` rounds once), for token selection (``block == 1``) with
    ``pool`` "max" or "mean". Where :func:`fused_scoring_applies`, :func:`scored_topk` scores, pools and selects in
    one pass. Otherwise the scoring GEMM writes into a reused buffer (a fresh 2 MB output per step cost page
    faults), the max over each KV head's query heads is folded into :func:`pooled_topk` (bf16) or a chain of
    elementwise maxima, and :func:`pooled_topk` does the rest.
    """
    from ..attention.selection import forced_mask

    if params.block != 1 or params.pool not in ("max", "mean"):
        raise ConfigError(f"impl='cpu' selects single tokens pooled by 'max' or 'mean' (got block={params.block}, "
                          f"pool={params.pool!r}); use impl='torch' for block or softmax selection")
    b, length = z_score.shape[:2]
    hkv = q.shape[1]
    cols = latent_queries(q, q_cos, q_sin, proj_score, params.pool == "mean")  # (B, G'·H_kv, r*), rows (G', H_kv)
    n = min(length, params.k + params.sink + params.recent)
    if fused_scoring_applies(z_score, hkv, cols.shape[1]):  # scoring, pooling and top-k in one pass, no score matrix
        forced = None if valid is None else forced_mask(length, params.sink, params.recent, positions, valid)
        return scored_topk(z_score, cols.to(z_score.dtype), hkv, n, forced, valid,
                           sink_slots=0 if valid is not None else params.sink,
                           recent_slots=0 if valid is not None else params.recent)
    gq = cols.shape[1] // hkv
    scores = buffers.get("cpu_scores", (b, length, gq * hkv), z_score.dtype, z_score.device)
    for i in range(b):
        torch.mm(z_score[i], cols[i].to(z_score.dtype).t(), out=scores[i])
    pooled = scores
    # The C++ pools bf16 scores itself when 16 % H_kv == 0 and G <= 4 (one AVX-512 pass); otherwise a chain of
    # torch maxima is faster than its scalar loop (which is also what a CPU without AVX-512 runs for those shapes).
    if gq > 1 and not (scores.dtype == torch.bfloat16 and 16 % hkv == 0 and gq <= 4):
        s4 = scores.view(b, length, gq, hkv)
        pooled = buffers.get("cpu_pooled", (b, length, hkv), scores.dtype, scores.device)
        torch.maximum(s4[:, :, 0], s4[:, :, 1], out=pooled)
        for j in range(2, gq):
            torch.maximum(pooled, s4[:, :, j], out=pooled)
    if valid is None:  # no padding: sinks are the first slots (forced_mask's rule), no mask tensor needed
        return pooled_topk(pooled, hkv, n, sink_slots=params.sink, recent_slots=params.recent)
    return pooled_topk(pooled, hkv, n, forced_mask(length, params.sink, params.recent, positions, valid), valid)
