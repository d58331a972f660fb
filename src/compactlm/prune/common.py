"""What every pruning method shares: the sparsity spec (:class:`PruneConfig`), exact-count masks, N:M masks,
the run state that plugs a method into the layer-wise driver, and the per-layer sparsity report.

Mask convention everywhere: ``keep`` is a bool tensor shaped like the weight, ``True`` = the weight stays.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import BaseConfig
from ..errors import ConfigError

SCOPES = ("row", "layer")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): keep N weights in every group of M consecutive inputs."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ConfigError(f"pattern must look like 'N:M' (e.g. '2:4' or '4:8'), got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ConfigError(f"pattern {pattern!r}: N:M keeps N of every M weights, so it needs 0 < N < M "
                          "(e.g. '2:4' or '4:8')")
    return n, mm


@dataclasses.dataclass(frozen=True)
class PruneConfig(BaseConfig):
    """Which weights to prune and how many; the base of every pruning method's config.

    Fields:
        sparsity: fraction of weights to zero in each comparison group (0 <= s < 1); exclusive with ``pattern``.
        pattern: ``"N:M"`` semi-structured sparsity (keep N of every M consecutive inputs), e.g. ``"2:4"``.
        scope: comparison group of unstructured sparsity: ``"row"`` (each output row pruned to exactly the
            ratio, as Wanda §3 does) or ``"layer"`` (the whole matrix ranked at once).
        targets: regexes (``re.search``) on full linear names; only matching linears are pruned (empty = all
            linears of the decoder layers). ``lm_head`` and the embeddings are never in the decoder layers, so
            they are skipped unless listed here.
        ignore: regexes on full linear names that are never pruned (applied after ``targets``).
    """

    sparsity: float | None = None  # 0.5 when neither sparsity nor pattern is given
    pattern: str | None = None
    scope: str = "row"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pattern is not None:
            if self.sparsity is not None:
                raise ConfigError(f"set either sparsity or pattern, not both (got sparsity={self.sparsity!r}, "
                                  f"pattern={self.pattern!r}); N:M fixes the sparsity at 1 - N/M")
            parse_pattern(self.pattern)
        else:
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", 0.5)  # the papers' headline setting
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float) \
                    or not 0.0 <= float(self.sparsity) < 1.0:
                raise ConfigError(f"sparsity must be a fraction in [0, 1), e.g. 0.5 for 50 %; got {self.sparsity!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        for field in ("targets", "ignore"):
            value = getattr(self, field)
            if isinstance(value, str) or not isinstance(value, tuple | list):
                raise ConfigError(f"{field} must be a tuple of regexes, e.g. ('mlp',), got {value!r}")
            object.__setattr__(self, field, tuple(value))
            for pat in value:
                try:
                    re.compile(pat)
                except re.error as exc:
                    raise ConfigError(f"{field} entry {pat!r} is not a valid regex: {exc}") from None

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern is not None else None

    @property
    def target_sparsity(self) -> float:
        """The fraction of zeros the method aims at (1 - N/M for a pattern)."""
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            return 1.0 - n / m
        return float(self.sparsity)

    def describe(self) -> str:
        return self.pattern if self.pattern is not None else f"{100 * float(self.sparsity):g}%"

    def selects(self, name: str) -> bool:
        """Whether the linear with full name ``name`` is pruned under ``targets`` / ``ignore``."""
        if self.targets and not any(re.search(p, name) for p in self.targets):
            return False
        return not any(re.search(p, name) for p in self.ignore)


# --- masks ---------------------------------------------------------------------------------------------------------
def n_pruned(size: int, sparsity: float) -> int:
    """How many of ``size`` weights an exact ``sparsity`` zeroes (round half to even, like ``round``)."""
    return int(round(size * sparsity))


def topk_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Keep-mask that zeroes exactly ``n_pruned`` lowest-score weights per row (``scope='row'``) or per matrix."""
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    flat = scores.reshape(1, -1) if scope == "layer" else scores.reshape(scores.shape[0], -1)
    k = n_pruned(flat.shape[1], sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(flat.float(), k, dim=1, largest=False).indices
        keep.scatter_(1, idx, False)
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly ``n`` kept weights in every group of ``m`` consecutive inputs (columns)."""
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"N:M sparsity with M={m} needs the input width to be a multiple of {m}; this layer has "
                          f"{cols} inputs: exclude it with ignore=(...) or use unstructured sparsity")
    groups = scores.float().reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return keep.view(rows, cols)


def mask_from_scores(scores: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """The keep-mask ``config`` asks for, from importance ``scores`` (higher = more important)."""
    if config.nm is not None:
        return nm_mask(scores, *config.nm)
    return topk_mask(scores, float(config.sparsity), config.scope)


def is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``keep`` has exactly ``n`` kept weights in every group of ``m`` consecutive inputs."""
    rows, cols = keep.shape
    return cols % m == 0 and bool((keep.reshape(rows, cols // m, m).sum(-1) == n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def check_prunable(name: str, module: nn.Linear, config: PruneConfig) -> None:
    if config.nm is not None and module.in_features % config.nm[1]:
        raise ConfigError(f"{name} has {module.in_features} inputs, not a multiple of M={config.nm[1]} for "
                          f"pattern {config.pattern!r}: exclude it with ignore=({name!r},) or use unstructured "
                          "sparsity")


# --- run state: how a method plugs into compactlm.layerwise ----------------------------------------------------------
class PruneRun:
    """Per-run state of a pruning method inside :func:`compactlm.layerwise.run` (configs stay immutable).

    Subclasses set ``new_stats`` / ``add_batch`` and implement ``prune(name, module, stats) -> (keep, record)``;
    this class applies the mask, keeps the dense weights of the current layer (LLM-Barber needs them) and
    records per-linear sparsity.
    """

    true_sequential = True
    needs_reference_outputs = False

    def __init__(self, config: PruneConfig, keep_dense: bool = False):
        self.config = config
        self.keep_dense = keep_dense
        self.dense: dict[str, torch.Tensor] = {}  # current layer's dense weights (only with keep_dense)
        self.masks: dict[str, torch.Tensor] = {}  # current layer's keep-masks

    def new_stats(self, name: str, module: nn.Linear) -> Any:
        return None

    def add_batch(self, stats: Any, name: str, module: nn.Linear, inp: torch.Tensor, out: torch.Tensor) -> None:
        pass

    def prune(self, name: str, module: nn.Linear, stats: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    @torch.no_grad()
    def solve(self, name: str, module: nn.Linear, stats: Any, ctx: Any) -> dict[str, Any]:
        start = time.perf_counter()
        check_prunable(f"{ctx.prefix}.{name}", module, self.config)
        if self.keep_dense:
            self.dense[name] = module.weight.detach().clone()
        keep, record = self.prune(name, module, stats)
        module.weight.mul_(keep.to(module.weight.dtype))  # exact zeros, whatever the solver left there
        self.masks[name] = keep
        return {"sparsity": sparsity_of(module.weight), "seconds": time.perf_counter() - start, **record}

    def refine_layer(self, ctx: Any, targets: dict[str, nn.Linear],
                     reference_outputs: list[torch.Tensor] | None) -> dict[str, Any] | None:
        self.dense.clear()
        self.masks.clear()
        return None


def linear_filter(config: PruneConfig,
                  filter_fn: Callable[[str, nn.Module], bool] | None) -> Callable[[str, nn.Module], bool]:
    """The driver's ``filter_fn``: the user's filter and the config's ``targets`` / ``ignore`` together."""
    def keep(name: str, module: nn.Module) -> bool:
        return config.selects(name) and (filter_fn is None or filter_fn(name, module))
    return keep


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in every linear of the decoder layers, by full name."""
    from ..models import get_adapter

    return {name: sparsity_of(module.weight) for name, module in get_adapter(model).named_linears().items()}


def layer_sizes(model: nn.Module) -> dict[str, int]:
    """Number of weights of every linear of the decoder layers, by full name (``overall_sparsity``'s weights)."""
    from ..models import get_adapter

    return {name: module.weight.numel() for name, module in get_adapter(model).named_linears().items()}


@dataclasses.dataclass
class PruneReport:
    """What a pruning run did: per-linear records (sparsity, loss, seconds), per-layer records, totals."""

    method: dict[str, Any]
    records: list[dict[str, Any]]
    layer_records: list[dict[str, Any]]
    sparsity: dict[str, float]  # full linear name -> fraction of zeros
    sizes: dict[str, int]  # full linear name -> number of weights
    seconds: float

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zeros over all the pruned linears' weights (weighted by size: a 1536-input down_proj
        counts 2.67x a 576-input q_proj; before 6 Dec 2026 this was the unweighted mean over linears)."""
        total = sum(self.sizes[n] for n in self.sparsity)
        return sum(s * self.sizes[n] for n, s in self.sparsity.items()) / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "overall_sparsity": self.overall_sparsity}


def execute(model: nn.Module, config: PruneConfig, run: PruneRun, calib: Any,
            filter_fn: Callable[[str, nn.Module], bool] | None, **options: Any) -> PruneReport:
    """Drive ``run`` over ``model`` with the shared layer-wise driver (:func:`compactlm.layerwise.run`)."""
    from .. import layerwise

    start = time.perf_counter()
    before = layer_sparsity(model)
    report = layerwise.run(model, calib, run, device=options.get("device"), batch_size=options.get("batch_size", 8),
                           filter_fn=linear_filter(config, filter_fn), desc=f"pruning ({type(config).__name__})")
    after = layer_sparsity(model)
    touched = {r["name"] for r in report.records}
    sparsity = {n: s for n, s in after.items() if n in touched or s != before[n]}
    return PruneReport(config.to_dict(), report.records, report.layer_records, sparsity, layer_sizes(model),
                       time.perf_counter() - start)
