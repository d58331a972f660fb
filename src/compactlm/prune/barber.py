"""LLM-Barber: rebuild a pruning mask block by block with a weight × gradient importance, no weight update.

Based on Su et al., "LLM-Barber: Block-Aware Rebuilder for Sparsity Mask in One-Shot for Large Language
Models" (arXiv 2408.10631), §3, checked against the authors' code (github.com/YupengSu/LLM-Barber,
``lib/llama.py`` ``prune_barber`` / ``mask_rebuild`` and ``lib/blockgpt.py``). Starting from any initial mask
(Wanda, SparseGPT, magnitude), for each decoder layer rebuild the mask of the self-attention block and then of
the MLP block:

* §3.2 block-aware loss: the block's inputs are the *sparse* model's (errors of earlier blocks count); the
  loss is the MSE between the dense block's output and the sparse block's output on those inputs. The
  gradient g is taken with respect to the **dense** weights (the authors run a dense copy of the block
  against the sparse block's output), one sequence at a time.
* §3.3 importance S = |W_dense| · sqrt(E[g²]), E over calibration sequences.
* §3.4 mask rebuild: inside each comparison group (output row, matrix, or the whole block) sort the pruned
  weights by S descending and the kept ones ascending; the i-th pair is *profitable* when the i-th pruned
  beats the i-th kept. Swap the first ``floor(rebuild_ratio · #profitable)`` pairs (the code's
  ``threshold``; its defaults: 0.01 per output row after Wanda, 0.1 per matrix after SparseGPT, 0.1 per
  block after magnitude). Sparsity never changes. For N:M every swap stays inside one group of M inputs:
  each group's candidate is its best pruned against its worst kept weight, and the top
  ``floor(rebuild_ratio · #profitable groups)`` candidates of the comparison group swap.

No weight update (§3): a revived weight takes its dense value. Deliberate deviations, both recorded:
a weight the initial method updated (SparseGPT's reconstruction) keeps its update, where the authors'
default restores dense weights everywhere (their ``--retain_reconstruction`` keeps them, as here); and
``guard`` keeps a block's initial mask when the rebuilt one has a larger block error on the calibration data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BaseConfig
from ..errors import ConfigError
from ..layerwise import run_batches
from ..registry import register
from .common import PruneConfig, PruneRun, execute, parse_pattern
from .wanda import Wanda

GROUPS = ("row", "layer", "block")
CRITERIA = ("gradient", "taylor")
OBJECTIVES = ("block", "lm")
# objective="lm"'s default step ladder: the quick runs' (1e-4 … 3e-3, where every setting measured chose a step, two of
# them the smallest) plus 3e-5 below it, and 1e-2 above it since 30 % chose the largest step, 3e-3, at both protocols
# with the held-out loss still falling (docs/pruning.md, "End-to-end objective" and "The full protocol at 30 %").
LM_SEARCH_RATIOS = (0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01)


@dataclasses.dataclass(frozen=True)
class Barber(BaseConfig):
    """LLM-Barber on top of ``init`` (whose sparsity / pattern / targets it inherits). Fields:

    init: the initial pruning config (Wanda, SparseGPT or Magnitude), e.g. ``Wanda(sparsity=0.5)``.
    rebuild_ratio: fraction of each comparison group's *profitable* swaps that are made (§3.4; the reference
        code's ``threshold``, default 0.01).
    group: comparison group of a swap: ``"row"`` (output row; the code's ``output1``), ``"layer"`` (matrix) or
        ``"block"`` (all linears of the attention or MLP block together; per-matrix sparsity may then move while
        the block's stays exact).
    guard: keep the initial mask of a block when the rebuilt one has a larger block error on the calibration
        data (not in the paper; costs one block forward; the report lists reverted blocks).
    criterion: how a swap is scored. ``"gradient"``: the paper's S = |W_dense|·sqrt(E[g²]) (§3.3), pruned and
        kept weights ranked as two independent lists. ``"taylor"``: the predicted change of the block loss,
        first-order G·Δw plus the diagonal Gauss-Newton term ½·D·Δw², at the sparse weights
        (:func:`taylor_scores`; a deviation from the paper, see there). Measured on the default model at Wanda
        50 %: it lowers the block error of every rebuilt block on held-out data far more than the paper's rule
        (−17.9 % vs −0.0 %), yet PPL-wiki-512-q rose to 59.36 (paper's rule 54.78, Wanda 54.37): the block loss
        itself does not track perplexity there (docs/pruning.md), so the paper's rule stays the default.
    search_ratios: when given, each of these ratios replaces ``rebuild_ratio`` in turn and the block keeps the
        rebuilt mask whose block error on the calibration data is lowest (with ``guard``: or its initial mask
        when none is lower). A backtracking line search on the step length (Nocedal & Wright, Numerical
        Optimization, §3.1): the swap scores come from a local model of the block loss, which many simultaneous
        swaps leave, so how many to make is decided by the loss itself. Costs one block forward per ratio.
        ``None`` (the default) resolves per objective: ``LM_SEARCH_RATIOS`` for ``"lm"``, ``()`` for ``"block"``;
        ``()`` means the single ``rebuild_ratio`` with either objective.
    objective: ``"lm"`` (the default; a deviation from §3.2: the whole model's next-token loss; the initial mask
        of the whole model is rebuilt at once by the second-order Taylor model of that loss, each ratio of
        ``search_ratios`` — or ``rebuild_ratio`` — then meaning the fraction of *all* the model's profitable
        swaps, chosen on held-out sequences; :mod:`compactlm.prune.barber_lm`) or ``"block"`` (§3.2, the paper:
        each block's output MSE, block by block, as above; needs about half the memory). ``criterion`` and
        ``guard`` apply to ``"block"`` only. Why "lm" is the default — measured on the default model
        (PPL-wiki-512-q, CALIB-pg-512-q; docs/pruning.md): it beats its initial mask at every setting run (init
        Wanda: 50 % 54.37 → 50.12, 4:8 98.93 → 80.41, 2:4 206.44 → 134.22, 30 % 26.78 → 26.08; init SparseGPT:
        50 % 53.83 → 49.63, 2:4 124.11 → 100.54), where "block" loses to Wanda at 50 % (54.78) and 4:8 (99.60).
        Its cost: 13 bytes per pruned weight in fp32 (dense copy, mask, two fp32 sums) plus a whole-model
        backward (3.4 GiB peak RSS against Wanda's 2.3 GiB on the 135M model, 1.50×); it refuses to start,
        naming its estimate, when that clearly exceeds the free memory
        (:func:`compactlm.prune.barber_lm.check_lm_memory`).
    heldout: ``"lm"`` only: the last ``heldout`` calibration sequences are kept out of the initial method and the
        gradients and only choose the step (ratio 0, the initial mask, among the candidates).
    rounds: ``"lm"`` only: rebuilds at most this many times, each from fresh gradients at the current mask;
        stops early when no ratio lowers the held-out loss.
    margin: ``"lm"`` only: a revive's first-order gain is taken this many standard errors (of the mean gradient
        over the calibration sequences) against it, so that the top of millions of candidates is not chosen for
        its noise (0 = the plain Taylor estimate). 2 measured better than 0 on held-out sequences.
    """

    init: PruneConfig = dataclasses.field(default_factory=Wanda)
    rebuild_ratio: float = 0.01
    group: str = "row"
    guard: bool = True
    criterion: str = "gradient"
    search_ratios: tuple[float, ...] | None = None
    objective: str = "lm"
    heldout: int = 8
    rounds: int = 1
    margin: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.init, Barber) or not isinstance(self.init, PruneConfig):
            raise ConfigError(f"Barber.init must be Wanda(...), SparseGPT(...) or Magnitude(...), got "
                              f"{type(self.init).__name__}")
        if isinstance(self.rebuild_ratio, bool) or not isinstance(self.rebuild_ratio, int | float) \
                or not 0.0 < float(self.rebuild_ratio) <= 1.0:
            raise ConfigError(f"rebuild_ratio must be in (0, 1]: the fraction of the profitable swaps to make, e.g. "
                              f"0.01 (the paper's code); got {self.rebuild_ratio!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES} ('lm' = the model's next-token loss, the "
                              f"default; 'block' = §3.2's block-output MSE, the paper's), got {self.objective!r}")
        if self.search_ratios is None:  # the default ladder of the chosen objective (class docstring)
            object.__setattr__(self, "search_ratios", LM_SEARCH_RATIOS if self.objective == "lm" else ())
        if isinstance(self.search_ratios, str) or not isinstance(self.search_ratios, tuple | list) or any(
                isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 < float(r) <= 1.0
                for r in self.search_ratios):
            raise ConfigError(f"search_ratios must be a tuple of fractions in (0, 1], e.g. (0.001, 0.01, 0.1), () "
                              f"for the single rebuild_ratio, or None for the objective's default; got "
                              f"{self.search_ratios!r}")
        object.__setattr__(self, "search_ratios", tuple(float(r) for r in self.search_ratios))
        if not isinstance(self.guard, bool):
            raise ConfigError(f"guard must be True or False, got {self.guard!r}")
        if self.group not in GROUPS:
            raise ConfigError(f"group must be one of {GROUPS}, got {self.group!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int | float) or not self.margin >= 0:
            raise ConfigError(f"margin must be a number ≥ 0 (standard errors), e.g. 2.0; got {self.margin!r}")
        for field, low in (("heldout", 1), ("rounds", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{field} must be an integer ≥ {low}, got {value!r}")
        if self.objective == "lm" and self.group == "block":
            raise ConfigError("objective='lm' (the default) swaps inside an output row (group='row') or a matrix "
                              "(group='layer'); group='block' needs objective='block'")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"criterion must be one of {CRITERIA} ('gradient' = the paper's |W|·sqrt(E[g²]), "
                              f"'taylor' = second-order block-loss change), got {self.criterion!r}")

    # Barber prunes to exactly what its init asks for: these mirror PruneConfig.
    @property
    def pattern(self) -> str | None:
        return self.init.pattern

    @property
    def nm(self) -> tuple[int, int] | None:
        return self.init.nm

    @property
    def target_sparsity(self) -> float:
        return self.init.target_sparsity

    def describe(self) -> str:
        return self.init.describe()

    def selects(self, name: str) -> bool:
        return self.init.selects(name)

    def make_run(self, keep_dense: bool = True) -> BarberRun:
        return BarberRun(self)


# --- the mask rebuild (§3.4): pure tensor math ----------------------------------------------------------------------
def _swap_rows(keep: torch.Tensor, score: torch.Tensor, ratio: float) -> tuple[torch.Tensor, int]:
    """Unstructured swaps inside each row of (G, L) ``keep`` / ``score``: ``floor(ratio · #profitable)`` per row."""
    pruned_s, pruned_i = score.masked_fill(keep, float("-inf")).sort(dim=1, descending=True)  # best pruned first
    kept_s, kept_i = score.masked_fill(~keep, float("inf")).sort(dim=1)  # worst kept first
    # Pair i (i-th best pruned vs i-th worst kept) gains when the pruned one scores higher; the gains fall with i,
    # so the profitable pairs are a prefix. Padding (±inf) never counts: -inf - x and y - inf are -inf.
    profitable = (pruned_s - kept_s > 0).sum(1)  # (G,)
    k = torch.floor(profitable.double() * ratio).long()  # the code's int(recons_num * threshold)
    take = torch.arange(keep.shape[1], device=keep.device).unsqueeze(0) < k.unsqueeze(1)  # (G, L)
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(take)
    new = keep.clone()
    new[rows[take], pruned_i[take]] = True
    new[rows[take], kept_i[take]] = False
    return new, int(take.sum())


def _nm_candidates(keep: torch.Tensor, score: torch.Tensor, m: int):
    """Per group of M inputs: the gain of swapping its best pruned with its worst kept weight, and where."""
    rows, cols = keep.shape
    k3, s3 = keep.view(rows, cols // m, m), score.view(rows, cols // m, m)
    best_pruned, ip = s3.masked_fill(k3, float("-inf")).max(dim=2)  # (rows, cols/M)
    worst_kept, ik = s3.masked_fill(~k3, float("inf")).min(dim=2)
    return best_pruned - worst_kept, ip, ik  # gain is -inf where a group has nothing to swap


def _top_profitable(gain: torch.Tensor, ratio: float) -> torch.Tensor:
    """(G, L) bool: in each row, the ``floor(ratio · #positive)`` largest positive gains."""
    order = gain.argsort(dim=1, descending=True)
    k = torch.floor((gain > 0).sum(1).double() * ratio).long()
    take = torch.arange(gain.shape[1], device=gain.device).unsqueeze(0) < k.unsqueeze(1)
    return torch.zeros_like(gain, dtype=torch.bool).scatter_(1, order, take)


def rebuild_masks(keeps: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], ratio: float, group: str,
                  nm: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Swap pruned/kept weights by importance ``scores`` inside each comparison group; sparsity is unchanged.

    ``keeps`` and ``scores`` map names to (out, in) tensors; ``group`` is row | layer | block; ``ratio`` is the
    fraction of each group's profitable swaps to make (§3.4). With ``nm`` every swap stays inside one group of
    M inputs. Returns the new keep-masks and the number of swaps.
    """
    names = list(keeps)
    if nm is None:
        if group == "block":
            flat_k = torch.cat([keeps[n].reshape(1, -1) for n in names], 1)
            flat_s = torch.cat([scores[n].float().reshape(1, -1) for n in names], 1)
            new, swaps = _swap_rows(flat_k, flat_s, ratio)
            parts = new.split([keeps[n].numel() for n in names], 1)
            return {n: p.view_as(keeps[n]) for n, p in zip(names, parts, strict=True)}, swaps
        out, total = {}, 0
        for n in names:
            k2 = keeps[n] if group == "row" else keeps[n].reshape(1, -1)
            new, swaps = _swap_rows(k2, scores[n].float().reshape(k2.shape), ratio)
            out[n], total = new.view_as(keeps[n]), total + swaps
        return out, total
    m = nm[1]
    cands = {n: _nm_candidates(keeps[n], scores[n].float(), m) for n in names}
    if group == "block":
        chosen = _top_profitable(torch.cat([cands[n][0].reshape(1, -1) for n in names], 1), ratio)
        do = {n: part.view_as(cands[n][0])
              for n, part in zip(names, chosen.split([cands[n][0].numel() for n in names], 1), strict=True)}
    else:
        do = {n: _top_profitable(cands[n][0] if group == "row" else cands[n][0].reshape(1, -1), ratio)
              .view_as(cands[n][0]) for n in names}
    out, total = {}, 0
    for n in names:
        _, ip, ik = cands[n]
        rows, cols = keeps[n].shape
        k3 = keeps[n].clone().view(rows, cols // m, m)
        r, g = torch.nonzero(do[n], as_tuple=True)
        k3[r, g, ip[r, g]] = True
        k3[r, g, ik[r, g]] = False
        out[n], total = k3.view(rows, cols), total + int(r.numel())
    return out, total


def barber_scores(dense_weight: torch.Tensor, grad_sq_mean: torch.Tensor) -> torch.Tensor:
    """S = |W_dense| · sqrt(E[g²]) (§3.3): a first-order estimate of what each weight is worth to the block."""
    return dense_weight.abs().float() * grad_sq_mean.float().sqrt()


def taylor_scores(keep: torch.Tensor, sparse_weight: torch.Tensor, dense_weight: torch.Tensor, grad: torch.Tensor,
                  curvature: torch.Tensor, drop_gradient: bool = False) -> torch.Tensor:
    """Swap scores from a second-order Taylor model of the block loss L around the current sparse weights.

    With G = ∂L/∂W and D ≈ diag(∂²L/∂W²) at the sparse weights (both (out, in)), reviving a pruned weight p
    (0 -> w_p, its dense value) changes L by ΔL_p = G_p·w_p + ½·D_p·w_p². Dropping a kept weight k (s_k -> 0)
    costs its OBD saliency ΔL_k = ½·D_k·s_k² (LeCun et al. 1990; SparseGPT §3.1's w²/[H⁻¹]_kk with a diagonal
    H), i.e. a drop is never predicted to help. With ``drop_gradient`` the drop also gets its first-order term
    −G_k·s_k. Why it is off by default: each single-drop prediction is accurate, but at the sparse point every
    kept weight of a row that carries the pruned weights' residual claims the same first-order credit for
    shrinking it; the diagonal model adds those credits up, and swapping several at once overshoots (measured on
    the default model, Wanda 50 %: layer 0's attention block error grew 93× at ratio 0.01, and a line search found
    no ratio that lowered it in 12 of 16 blocks; benchmarks/results/prune/barber_variants_wanda_50pct.json).
    Returned: −ΔL_p on pruned and ΔL_k on kept positions, so :func:`rebuild_masks` (best pruned vs worst kept)
    pairs the largest predicted loss drops with the cheapest drops, and a pair is profitable exactly when
    ΔL_p + ΔL_k < 0 (diagonal model: cross terms ignored).
    """
    w, s = dense_weight.float(), sparse_weight.float()
    g, d = grad.float(), curvature.float()
    revive = g * w + 0.5 * d * w * w  # ΔL of bringing back a pruned weight at its dense value
    drop = 0.5 * d * s * s - (g * s if drop_gradient else 0.0)  # ΔL of zeroing a kept weight
    return torch.where(keep, drop, -revive)


# --- plugging into the layer-wise driver ---------------------------------------------------------------------------
class _StopAfterBlock(Exception):
    pass


@dataclasses.dataclass
class BlockCalls:
    """One block's captured calls on the calibration data: per batch the (args, kwargs) it was called with."""

    calls: list[tuple[tuple, dict[str, Any]]]
    outputs: list[torch.Tensor]  # the block's outputs in those calls, detached

    @staticmethod
    def hidden_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def with_hidden(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def samples(self):
        """Yield (args, kwargs, output) one calibration sequence at a time (the per-sequence E[g²] of §3.3)."""
        for (args, kwargs), out in zip(self.calls, self.outputs, strict=True):
            hidden = self.hidden_of(args, kwargs)
            for j in range(hidden.shape[0]):
                a, kw = self.with_hidden(args, kwargs, hidden[j:j + 1])
                yield a, kw, out[j:j + 1]


def capture_block(ctx, block: nn.Module) -> BlockCalls:
    """Run the (sparse) decoder layer on every calibration batch up to ``block``; record the block's calls."""
    calls: list[tuple[tuple, dict[str, Any]]] = []
    outputs: list[torch.Tensor] = []

    def pre(_module, args, kwargs):
        hidden = BlockCalls.hidden_of(args, kwargs).detach()
        calls.append(BlockCalls.with_hidden(args, kwargs, hidden))

    def post(_module, _args, _kwargs, output):
        outputs.append(_first(output).detach())
        raise _StopAfterBlock  # the rest of the layer is not needed

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True),
               block.register_forward_hook(post, with_kwargs=True)]
    with torch.no_grad():
        run_batches(ctx, handles, _StopAfterBlock)
    if len(outputs) != len(ctx.inputs):
        raise RuntimeError(f"{ctx.prefix}: the block {type(block).__name__} did not run once per calibration batch "
                           "in the layer's forward")
    return BlockCalls(calls, outputs)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class InitDelegatingRun(PruneRun):
    """A run whose statistics and solve are the initial method's (``self.init``, built with kept dense weights);
    subclasses add what happens after each layer in ``refine_layer``."""

    init: PruneRun

    def new_stats(self, name, module):
        return self.init.new_stats(name, module)

    def add_batch(self, stats, name, module, inp, out):
        self.init.add_batch(stats, name, module, inp, out)

    def solve(self, name, module, stats, ctx):
        return self.init.solve(name, module, stats, ctx)


class BarberRun(InitDelegatingRun):
    """The initial method's run (kept dense weights on) plus the block-wise mask rebuild in ``refine_layer``."""

    # Barber's targets are block outputs on the sparse model's inputs (§3.2), which it records itself per block;
    # the driver's whole-layer reference outputs would cost a forward pass for nothing.
    needs_reference_outputs = False

    def __init__(self, config: Barber):
        self.config = config
        self.init = config.init.make_run(keep_dense=True)
        self.true_sequential = self.init.true_sequential
        self.swaps_total = 0
        self.last_ratio = float(config.rebuild_ratio)  # the ratio the last rebuilt block kept (search_ratios)

    def refine_layer(self, ctx, targets, reference_outputs):
        i, adapter = ctx.index, ctx.adapter
        record: dict[str, Any] = {"swaps": {}}
        blocks = [("attention", adapter.attention(i), adapter.attention_linears(i)),
                  ("mlp", adapter.mlp(i), adapter.mlp_linears(i))]
        for label, block, linears in blocks:  # attention first: the MLP's inputs then see its rebuilt mask
            mods = {n: targets[n] for n in linears if n in targets and n in self.init.masks}
            if mods:
                swaps, before, after, reverted = self._rebuild_block(ctx, block, mods)
                record["swaps"][label] = swaps
                if self.config.search_ratios:
                    record.setdefault("ratio", {})[label] = self.last_ratio
                record[f"{label}_block_mse"] = [before, after]
                if reverted:
                    record.setdefault("reverted", []).append(label)
                self.swaps_total += swaps
        self.init.refine_layer(ctx, targets, reference_outputs)  # frees the dense copies and masks
        return record

    def _rebuild_block(self, ctx, block: nn.Module, mods: dict[str, nn.Linear]) -> tuple[int, float, float, bool]:
        dense, keeps = self.init.dense, self.init.masks
        captured = capture_block(ctx, block)  # sparse inputs and the sparse block's outputs (§3.2)
        sparse = {n: m.weight.detach().clone() for n, m in mods.items()}
        if self.config.criterion == "gradient":
            grad_sq, seen, before, dense_out = self._dense_gradients(block, mods, captured)
            scores = {n: barber_scores(dense[n], grad_sq[n] / max(seen, 1)) for n in mods}
        else:
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(dense[n])
                dense_out = block_outputs(block, captured)  # §3.2 targets: the dense block on the sparse inputs
                for n, m in mods.items():
                    m.weight.copy_(sparse[n])
            grad, curv, _, before = block_taylor_statistics(block, mods, captured, dense_out)
            scores = {n: taylor_scores(keeps[n], sparse[n], dense[n], grad[n], curv[n]) for n in mods}
        best: tuple[float, dict[str, torch.Tensor], int, float] | None = None
        with torch.no_grad():
            for ratio in self.config.search_ratios or (float(self.config.rebuild_ratio),):
                new_keeps, swaps = rebuild_masks({n: keeps[n] for n in mods}, scores, ratio, self.config.group,
                                                 self.config.nm)
                for n, m in mods.items():
                    # Kept weights stay as the initial method left them, revived ones take their dense value (§3).
                    w = torch.where(keeps[n], sparse[n], dense[n])
                    m.weight.copy_(w * new_keeps[n].to(w.dtype))
                after = _block_mse(block, captured, dense_out)
                if best is None or after < best[0]:
                    best = (after, new_keeps, swaps, ratio)
            after, new_keeps, swaps, ratio = best
            self.last_ratio = ratio
            for n, m in mods.items():
                w = torch.where(keeps[n], sparse[n], dense[n])
                m.weight.copy_(w * new_keeps[n].to(w.dtype))
            if self.config.guard and after > before:
                # Deviation from §3 (recorded): a first-order swap can overshoot, most of all after SparseGPT's
                # reconstruction, whose kept weights already compensate for the pruned ones. Keep the better mask.
                for n, m in mods.items():
                    m.weight.copy_(sparse[n])
                return 0, before, after, True
            for n in mods:
                keeps[n] = new_keeps[n]
        return swaps, before, after, False

    def _dense_gradients(self, block: nn.Module, mods: dict[str, nn.Linear], captured: BlockCalls):
        """E[g²] of the block loss w.r.t. the dense weights, per sequence (§3.2-3.3, the code's ``add_batch``).

        Returns the summed squared gradients, the number of sequences, the mean initial block MSE and the dense
        block's outputs (the targets the rebuilt mask is judged against).
        """
        dense = self.init.dense
        weights = [m.weight for m in mods.values()]
        flags = [w.requires_grad for w in weights]
        saved = {n: m.weight.detach().clone() for n, m in mods.items()}
        grad_sq = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in mods.items()}
        seen, mse, dense_out = 0, 0.0, []
        try:
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(dense[n])
            for w in weights:
                w.requires_grad_(True)
            with torch.enable_grad():
                for args, kwargs, target in captured.samples():
                    out = _first(block(*args, **kwargs))
                    loss = F.mse_loss(out.float(), target.float())
                    grads = torch.autograd.grad(loss, weights, allow_unused=True)
                    for n, g in zip(mods, grads, strict=True):
                        if g is not None:  # an expert no token reached has no gradient
                            grad_sq[n] += g.float() ** 2
                    dense_out.append(out.detach())
                    seen += 1
                    mse += float(loss.detach())
        finally:
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(saved[n])
            for w, f in zip(weights, flags, strict=True):
                w.requires_grad_(f)
        return grad_sq, seen, mse / max(seen, 1), dense_out


def block_taylor_statistics(block: nn.Module, mods: dict[str, nn.Linear], captured: BlockCalls,
                            targets: list[torch.Tensor], probes: int = 1, seed: int = 0):
    """G = ∂L/∂W and the Gauss-Newton diagonal D of L at the block's *current* (sparse) weights.

    L = mean over sequences of MSE(block(x_s), target_s) (§3.2's block loss; targets: the dense block's outputs on
    the same sparse inputs). Its Gauss-Newton Hessian is mean_s (2/n_s)·J_sᵀJ_s, and diag(JᵀJ) = E_v[(Jᵀv)²] for a
    Rademacher vector v on the block's output (Hutchinson's estimator; the "true Fisher" with sampled targets,
    Martens 2020 arXiv 1412.1193 §9), so ``probes`` backward passes per sequence give an unbiased estimate. The
    squared loss gradients E[g²] that §3.3 uses (the empirical Fisher) are not a curvature estimate when the
    residual is not noise (Kunstner et al. 2019, arXiv 1905.12558 §3); this is. Returns (G, D, sequences, mean L).
    """
    weights = [m.weight for m in mods.values()]
    flags = [w.requires_grad for w in weights]
    grad = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in mods.items()}
    curv = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in mods.items()}
    gen = torch.Generator().manual_seed(seed)
    seen, mse, it = 0, 0.0, iter(targets)
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for args, kwargs, _ in captured.samples():
                out = _first(block(*args, **kwargs)).float()
                loss = F.mse_loss(out, next(it).float())
                for n, g in zip(mods, torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True),
                                strict=True):
                    if g is not None:
                        grad[n] += g.float()
                for _ in range(probes):
                    v = (torch.randint(0, 2, out.shape, generator=gen) * 2 - 1).to(out.device, out.dtype)
                    jv = torch.autograd.grad(out, weights, grad_outputs=v, retain_graph=True, allow_unused=True)
                    for n, h in zip(mods, jv, strict=True):
                        if h is not None:
                            curv[n] += (2.0 / (out.numel() * probes)) * h.float() ** 2
                seen += 1
                mse += float(loss.detach())
    finally:
        for w, f in zip(weights, flags, strict=True):
            w.requires_grad_(f)
    n = max(seen, 1)
    return {k: v / n for k, v in grad.items()}, {k: v / n for k, v in curv.items()}, seen, mse / n


@torch.no_grad()
def block_outputs(block: nn.Module, captured: BlockCalls) -> list[torch.Tensor]:
    """The block's outputs at its current weights, one (1, T, hidden) tensor per calibration sequence."""
    outs = []
    for args, kwargs in captured.calls:
        out = _first(block(*args, **kwargs))
        outs.extend(out[j:j + 1].detach() for j in range(out.shape[0]))
    return outs


@torch.no_grad()
def _block_mse(block: nn.Module, captured: BlockCalls, targets: list[torch.Tensor]) -> float:
    """Mean per-sequence MSE of ``block`` (current weights) against ``targets`` on the captured calls."""
    total, seen = 0.0, 0
    it = iter(targets)
    for args, kwargs in captured.calls:
        out = _first(block(*args, **kwargs)).float()
        for j in range(out.shape[0]):
            total += float(F.mse_loss(out[j:j + 1], next(it).float()))
            seen += 1
    return total / max(seen, 1)


@register(Barber)
def apply_barber(model: nn.Module, config: Barber, calib=None, filter_fn=None, **options: Any) -> nn.Module:
    if config.objective == "lm":
        from .barber_lm import rebuild_lm

        rebuild_lm(model, config, calib, filter_fn, **options)
        return model
    execute(model, config, config.make_run(), calib, filter_fn, **options)
    return model


__all__ = ["Barber", "BarberRun", "rebuild_masks", "barber_scores", "taylor_scores", "block_taylor_statistics",
           "block_outputs", "capture_block", "parse_pattern", "LM_SEARCH_RATIOS"]
