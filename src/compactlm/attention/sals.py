"""SALS: sparse attention in a calibrated low-rank latent space of the pre-RoPE keys.

Based on "SALS: Sparse Attention in Latent Space for KV cache Compression" (arXiv 2510.24273):

- §3 / §4.1 calibration: per layer, the pre-RoPE keys of all KV heads are concatenated (one n_kv·d vector
  per token) and projected on the top-r eigenvectors of KᵀK (PCA without centring) measured on CALIB-pg-512.
  Pre-RoPE keys have much lower rank than post-RoPE keys, so r = 25 % or 12.5 % keeps most of their energy.
- §4.2 decode: the cache holds the latent keys (r numbers per token, shared by the KV heads) and the values.
  Each step scores every cached token with the query in the same latent space on the first r* dims, keeps
  the top-k plus ``sink`` first and ``recent`` last tokens, rebuilds only the chosen keys from the latent,
  applies RoPE at their positions and attends exactly.

RoPE and the projection do not commute (RoPE rotates pairs of channels by a position-dependent angle), so the
latent space is that of the *pre-RoPE* keys, and the query is scored pre-RoPE as well: the post-RoPE query the
attention function receives is rotated back by its own position (:func:`~compactlm.kernels.sparse_decode.unrope`),
then projected with the rows of the joint projection that belong to its KV head. The score q·U_h·z is then a
RoPE-free estimate of q·k: it ignores the relative-position term RoPE adds. That is the paper's choice (scoring
with "RoPE-free query-key interactions"); the exact attention over the chosen tokens uses the real RoPE.

Deviations, each on purpose: selection is per KV head (pooled over its query heads) rather than per query head,
so a GQA group reads one set of tokens; projections are stored as the full eigenbasis so one calibration serves
every rank; keys are recovered from the post-RoPE keys the cache receives by the inverse rotation (exact up to
rounding) instead of a second hook on ``k_proj``.

Fields of :class:`SALSConfig`: ``rank`` (fraction of n_kv·d, a count, or ``"energy:τ"``: per layer the smallest
rank keeping τ of that layer's calibration key energy, :mod:`.sals_ranks`), ``rank_budget`` (with energy ranks: cap
on their average over the sparse layers, a fraction of n_kv·d or a count), ``score_dims`` r* (fraction of r or a
count; default r/2), ``keep`` (fraction of the context or a count), ``sink``, ``recent``, ``dense_first`` /
``dense_last`` (or an explicit ``dense_layers`` list), ``score_rope`` (``free``: the paper's RoPE-free latent
score; ``averaged``: the logit expected over the candidates' distances, :mod:`.sals_scoring`), ``mode``
(``compressed``: the cache holds only latent keys + values; ``index``: full keys kept, the latent only selects),
``pool`` (how a GQA group's query heads vote), ``block`` / ``block_reduce`` (select contiguous blocks instead of
tokens), ``projections`` (a calibration file or a folder holding ``sals_projections.safetensors``), ``value_bits``
/ ``value_group`` (values stored as per-token KIVI codes from :mod:`compactlm.kv.quantizer`, dequantized only for
the chosen tokens; None = full precision), ``impl`` (``auto`` / ``torch`` / ``triton`` / ``cpu``), ``huge_pages``
(CPU cache buffers of ≥ 8 MB on 2 MB pages, :mod:`compactlm.kernels.huge_pages`; default True).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..config import config_from_options as _typed_config
from ..errors import ConfigError
from ..evaluation.methods import RuntimeMethod, register_method
from ..kernels.sparse_decode import DECODE_IMPLS, DecodeBuffers, SelectParams, sals_decode
from .decode_common import CacheCapture, DecodeBudget, RopeTable, decode_inputs, resolve_count, validate_budget
from .runtime import PhaseHandlers, register_runtime, sparse_attention
from .sals_cache import SALSLayer, convert_cache
from .sals_calib import SALSProjections, projections_for
from .sals_ranks import energy_ranks, parse_energy
from .sals_scoring import averaged_query_rope, rope_frequencies

MODES = ("compressed", "index")
POOLS = ("max", "mean", "softmax")
SCORE_ROPE = ("free", "averaged")
REDUCES = ("max", "mean", "logsumexp")


@dataclasses.dataclass(frozen=True)
class SALSConfig(DecodeBudget):
    """SALS decode sparse attention (arXiv 2510.24273, §4). See the module docstring for the fields.

    ``keep``, ``sink``, ``recent``, ``dense_first``, ``dense_last`` and ``dense_layers`` (and their checks)
    come from :class:`~.decode_common.DecodeBudget`, shared with the baselines.
    """

    FRACTIONS: ClassVar[tuple[str, ...]] = ("score_dims", "keep")

    rank: float | int | str = 0.25
    rank_budget: float | int | None = None
    score_dims: float | int = 0.5
    mode: str = "compressed"
    score_rope: str = "free"
    pool: str = "max"
    block: int = 1
    block_reduce: str = "max"
    projections: str | None = None
    value_bits: int | None = None
    value_group: int = 32
    exact_sink: int = 0
    exact_recent: int = 0
    # "auto": Triton on CUDA where it applies, else the tensor path; "cpu": the compiled CPU kernels
    # (kernels.sparse_decode_cpu; 1.4-2.3x the tensor path in ATTN-decode at 32K-64K, docs/sals.md), opt-in
    # because they are built with g++/ninja on first use and a failed build raises rather than falling back.
    impl: str = "auto"
    # CPU cache buffers of ≥ 8 MB on 2 MB transparent huge pages (kernels.huge_pages): the chosen-row gathers are
    # TLB-bound on 4 KB pages. No effect on values; False keeps 4 KB pages (≤ 2 MB less resident per buffer).
    huge_pages: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.huge_pages, bool):
            raise ConfigError(f"SALSConfig.huge_pages must be True or False, got {self.huge_pages!r}")
        tau = parse_energy(self.rank)
        if tau is None:
            validate_budget(self, ("rank",))
        if self.rank_budget is not None:
            if tau is None:
                raise ConfigError(f"SALSConfig.rank_budget={self.rank_budget!r} needs rank='energy:τ' (it caps the "
                                  f"average of per-layer energy ranks); with rank={self.rank!r} drop rank_budget")
            validate_budget(self, ("rank_budget",))
        if self.mode not in MODES:
            raise ConfigError(f"SALSConfig.mode={self.mode!r}; use 'compressed' (latent keys only) or 'index'")
        if self.score_rope not in SCORE_ROPE:
            raise ConfigError(f"SALSConfig.score_rope={self.score_rope!r}; use 'free' (the paper's RoPE-free latent "
                              "score) or 'averaged' (expected logit over the candidates' distances)")
        if self.pool not in POOLS:
            raise ConfigError(f"SALSConfig.pool={self.pool!r}; use one of {', '.join(POOLS)}")
        if not isinstance(self.block, int) or self.block < 1:
            raise ConfigError(f"SALSConfig.block must be an int ≥ 1 (1 = token-level top-k), got {self.block!r}")
        if self.block_reduce not in REDUCES:
            raise ConfigError(f"SALSConfig.block_reduce={self.block_reduce!r}; use one of {', '.join(REDUCES)}")
        for name in ("exact_sink", "exact_recent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"SALSConfig.{name} must be an int ≥ 0 (tokens whose exact keys are kept), got {v!r}")
            if v and self.mode != "compressed":
                raise ConfigError(f"SALSConfig.{name}={v} only applies to mode='compressed' (index mode keeps every "
                                  "key exactly); set it to 0")
        if self.value_bits not in (None, 2, 4, 8):
            raise ConfigError(f"SALSConfig.value_bits={self.value_bits!r}; use None (full precision), 2, 4 or 8")
        if not isinstance(self.value_group, int) or self.value_group < 1:
            raise ConfigError(f"SALSConfig.value_group must be an int ≥ 1 (channels per scale), got "
                              f"{self.value_group!r}")
        if self.impl not in DECODE_IMPLS:
            raise ConfigError(f"SALSConfig.impl={self.impl!r}; use one of {', '.join(DECODE_IMPLS)}")
        if self.impl == "cpu" and (self.pool == "softmax" or self.block != 1):
            raise ConfigError(f"SALSConfig.impl='cpu' selects tokens with max or mean GQA pooling (got pool="
                              f"{self.pool!r}, block={self.block}); use impl='auto' for softmax pooling or blocks")

    @property
    def energy(self) -> float | None:
        """τ of ``rank='energy:τ'`` (per-layer ranks from calibration energy), else None."""
        return parse_energy(self.rank)

    def ranks(self, width: int) -> tuple[int, int]:
        """(r, r*) for a joint key width n_kv·d, when the rank is one number for every layer."""
        if self.energy is not None:
            raise ConfigError(f"SALSConfig.rank={self.rank!r} gives one rank per layer from calibration energy; "
                              "use layer_ranks(projections, num_layers)")
        r = resolve_count(self.rank, width, "rank")
        return r, min(r, resolve_count(self.score_dims, r, "score_dims"))

    def layer_ranks(self, projections: SALSProjections, num_layers: int) -> dict[int, tuple[int, int]]:
        """(r, r*) for each sparse layer: the fixed rank, or ``energy:τ`` ranks (capped by ``rank_budget``).

        ``rank_budget`` is the average latent rank over the sparse layers (a fraction of n_kv·d or a count);
        when the τ-ranks exceed it, dims are given out greedily by each layer's share of energy
        (:func:`~.sals_ranks.budget_ranks`). r* = ``score_dims`` of each layer's own r.
        """
        width = projections.width
        sparse = self.sparse_layers(num_layers)
        if self.energy is None:
            r = resolve_count(self.rank, width, "rank")
            ranks = {i: r for i in sparse}
        elif sparse:
            total = None
            if self.rank_budget is not None:
                total = resolve_count(self.rank_budget, width, "rank_budget") * len(sparse)
            chosen = energy_ranks(projections.eigvals[sparse], self.energy, total)
            ranks = dict(zip(sparse, (int(r) for r in chosen), strict=True))
        else:
            ranks = {}
        return {i: (r, min(r, resolve_count(self.score_dims, r, "score_dims"))) for i, r in ranks.items()}


SALS = SALSConfig


class SALSRun:
    """Per-run state of one ``sparse_attention(model, SALSConfig(...))`` scope (never stored on the config)."""

    def __init__(self, model: torch.nn.Module, cfg: SALSConfig, projections: SALSProjections):
        from ..models import get_adapter

        self.adapter = get_adapter(model)
        self.cfg = cfg
        a = self.adapter
        self.width = a.num_kv_heads * a.head_dim
        self.ranks = cfg.layer_ranks(projections, a.num_layers)  # {layer: (r, r*)}
        self.sparse = cfg.sparse_layers(a.num_layers)
        self.projections = projections
        self.rope = RopeTable(a)
        self.capture = CacheCapture(self.convert)
        self.buffers: dict[int, DecodeBuffers] = {}
        self._theta: dict[int, torch.Tensor] = {}

    def theta(self, i: int) -> torch.Tensor:
        """RoPE angle per position of each channel of layer ``i`` (D,), float64."""
        if i not in self._theta:
            cos, sin = self.rope.tables(2, i, torch.float32)
            self._theta[i] = rope_frequencies(cos, sin)[0]
        return self._theta[i]

    def convert(self, cache: Any) -> None:
        convert_cache(cache, self.adapter, self.cfg, self.projections, self.rope, self.sparse)

    def handler(self, i: int):
        def decode(module, query, key, value, attention_mask, scaling, fallback, **kwargs):
            layer = self.capture.layer(i)
            if not isinstance(layer, SALSLayer):
                raise ConfigError(f"layer {i}: SALS decode needs the cache converted on entry; got "
                                   f"{type(layer).__name__}. Pass the cache as `cache=`/`past_key_values=`.")
            length = layer.length
            q_cos, q_sin, valid = decode_inputs(self.rope, query, kwargs, attention_mask, length, i)
            if self.cfg.score_rope == "averaged":
                # Score with the logit expected over the candidates' distances [recent, length-1] (sals_scoring).
                q_cos, q_sin = averaged_query_rope(q_cos, q_sin, self.theta(i), self.cfg.recent, length - 1)
            params = SelectParams(k=resolve_count(self.cfg.keep, length, "keep"), sink=self.cfg.sink,
                                  recent=self.cfg.recent, pool=self.cfg.pool, block=self.cfg.block,
                                  block_reduce=self.cfg.block_reduce)
            cos_t, sin_t = self.rope.tables(layer.max_pos + 1, i, layer.proj.dtype)
            out, _ = sals_decode(query, q_cos, q_sin, layer.latent_view(), layer.values_view(),
                                 layer.positions_view(), layer.proj, self.ranks[i][1], cos_t, sin_t, params, scaling,
                                 valid=valid, keys=layer.keys_view(),
                                 buffers=self.buffers.setdefault(i, DecodeBuffers()), exact=layer.exact_view(),
                                 impl=self.cfg.impl)
            return out, None

        return decode


@register_runtime(SALSConfig)
def _build(model: torch.nn.Module, cfg: SALSConfig) -> PhaseHandlers:
    projections = projections_for(model, cfg.projections)
    run = SALSRun(model, cfg, projections)
    hook = run.adapter.decoder.register_forward_pre_hook(run.capture, with_kwargs=True)
    return PhaseHandlers(decode={i: run.handler(i) for i in run.sparse}, close=hook.remove, state=run)


def sals_method(model: torch.nn.Module, cfg: SALSConfig, name: str = "sals") -> RuntimeMethod:
    """A :class:`RuntimeMethod` for the long-context runners: shares the dense prefill, converts its cache."""
    from ..models import get_adapter

    projections = projections_for(model, cfg.projections)
    adapter = get_adapter(model)
    rope = RopeTable(adapter)
    sparse = cfg.sparse_layers(adapter.num_layers)

    def make_cache(model: torch.nn.Module, prefill_cache: Any) -> Any:
        import copy

        from transformers import DynamicCache

        cache = DynamicCache(config=model.config) if prefill_cache is None else copy.deepcopy(prefill_cache)
        convert_cache(cache, adapter, cfg, projections, rope, sparse)
        return cache

    return RuntimeMethod(name, attach=lambda m: sparse_attention(m, cfg), make_cache=make_cache,
                         shares_prefill=True,
                         description=f"SALS {describe_ranks(cfg, projections, adapter.num_layers)} keep={cfg.keep} "
                                     f"sink={cfg.sink} recent={cfg.recent} mode={cfg.mode} score_rope={cfg.score_rope} "
                                     f"exact_sink={cfg.exact_sink} exact_recent={cfg.exact_recent} "
                                     f"dense={sorted(set(range(adapter.num_layers)) - set(sparse))}")


def describe_ranks(cfg: SALSConfig, projections: SALSProjections, num_layers: int) -> str:
    """``r=48 r*=24`` for a fixed rank; the per-layer list and its mean for energy ranks."""
    ranks = cfg.layer_ranks(projections, num_layers)
    if cfg.energy is None:
        r, r_star = next(iter(ranks.values()), (0, 0))
        return f"r={r} r*={r_star}"
    rs = [r for r, _ in ranks.values()]
    mean = sum(rs) / max(1, len(rs))
    budget = "" if cfg.rank_budget is None else f" budget={cfg.rank_budget}"
    per_layer = {i: r for i, (r, _) in ranks.items()}
    return (f"rank=energy:{cfg.energy}{budget} (mean r {mean:.1f} = {mean / projections.width:.1%} of "
            f"{projections.width}) r per layer={per_layer} r*=score_dims {cfg.score_dims}")


def config_from_options(cls: type, options: dict[str, Any]) -> Any:
    """Build a SALS or baseline config from CLI/runner options (``compactlm.config.config_from_options``).

    The runners also pass ``tokenizer`` (for calibrating projections), which is not a config field.
    """
    return _typed_config(cls, {k: v for k, v in options.items() if k != "tokenizer"})


# CLI names: ``--attn sals`` (rank 25 %), ``sals-12.5`` (rank 12.5 %), ``sals-index`` (full keys kept);
# ``sals-avg``: rank 25 % with position-averaged scoring and exact sink/recent keys (see docs/sals.md for why);
# ``sals-tuned``: per-layer energy ranks at a 50 % average budget, all latent dims scored, softmax-weighted GQA
# votes, exact keys for 16 sink + 128 recent slots (PPL-decode-q within 1 point of full on SmolLM2-135M).
AVG = {"score_rope": "averaged", "exact_sink": 16, "exact_recent": 64}
TUNED = {**AVG, "rank": "energy:0.999", "rank_budget": 0.5, "exact_recent": 128, "score_dims": 1.0, "pool": "softmax"}
PRESETS: dict[str, dict[str, Any]] = {"sals": {}, "sals-25": {"rank": 0.25}, "sals-12.5": {"rank": 0.125},
                                      "sals-index": {"mode": "index"},
                                      "sals-v4": {"value_bits": 4},
                                      "sals-avg": AVG, "sals-avg-12.5": {**AVG, "rank": 0.125},
                                      "sals-index-avg": {"mode": "index", "score_rope": "averaged"},
                                      "sals-tuned": TUNED}


def _builder(name: str, preset: dict[str, Any]):
    def build(model: torch.nn.Module, options: dict[str, Any]) -> RuntimeMethod:
        from .sals_calib import ATTR, ensure_projections

        cfg = config_from_options(SALSConfig, {**preset, **options})
        if cfg.projections is None and getattr(model, ATTR, None) is None:
            # The runners pass no tokenizer: calibrate with the model's own (a local folder), cached on disk.
            ensure_projections(model, options.get("tokenizer"))
        return sals_method(model, cfg, name)

    return build


for _name, _preset in PRESETS.items():
    register_method(f"attn:{_name}")(_builder(_name, _preset))
