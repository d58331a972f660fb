"""LLM-Barber with an end-to-end objective: rebuild the whole model's mask by the next-token loss, not block MSE.

Used by :class:`~compactlm.prune.barber.Barber` with ``objective="lm"``. A deviation from LLM-Barber
(arXiv 2408.10631) §3.2, whose objective is each block's output MSE against the dense block. Why: on the
default model the block objective does not track perplexity — a rule that lowered every block's held-out
block error by 17.9 % raised PPL-wiki-512-q from 54.37 to 59.36 (docs/pruning.md, "Why Barber loses at 50 %").
Here the loss is the model's own: L = mean next-token cross-entropy of the calibration sequences.

1. The initial method (Wanda, SparseGPT, magnitude) prunes the whole model on the first ``N - heldout``
   calibration sequences; its masks and the dense weights of every pruned linear are kept.
2. At the sparse weights, two passes over the sequences (a forward and a backward of the whole model per sequence
   each) give G = E[∂L/∂W] (true next tokens) and D, the diagonal of the loss's Gauss-Newton matrix (= the Fisher for
   softmax cross-entropy), from targets *sampled* from the model's own prediction: with h = ∇ Σ_t −log p(ỹ_t),
   E[h²] = Σ_t diag(F_t), since the tokens' cross terms vanish in expectation (Martens 2020, arXiv 1412.1193
   §9; Kunstner et al. 2019, arXiv 1905.12558 §3: squared true-label gradients E[g²] are no curvature
   estimate where the model is not at a minimum, and a sequence's g² is dominated by G² there).
3. Each swap is scored by the second-order Taylor model of L (:func:`~compactlm.prune.barber.taylor_scores`):
   reviving a pruned weight (0 → its dense value w) ΔL = G·w + ½·D·w², dropping a kept one (s → 0) ½·D·s²
   (OBD; the first-order drop term overshoots when many swaps are made at once). With ``margin`` the revive's
   first-order term is taken that many standard errors of G against it: picked from millions of candidates, the
   largest estimated gains are partly the noise of an N-sequence mean. Inside each comparison group (output row,
   matrix, or one group of M inputs for N:M) the i-th best revive pairs with the i-th cheapest drop, so sparsity
   and N:M stay exact; a pair is profitable when its summed ΔL is negative.
4. Step length by measurement: the best ``ratio`` fraction of all profitable pairs of the model (one global
   threshold on the predicted gain) is tried for each ratio, and the one with the lowest loss on the last
   ``heldout`` calibration sequences (which fed no statistic) is kept — ratio 0, the current mask, included,
   so a round never raises that held-out loss. The diagonal model is right one swap at a time but its summed
   credits run away after a few thousand swaps on the default model (docs/pruning.md), hence small ratios and
   the measurement. ``rounds`` repeats 2-4 at the new mask until ratio 0 wins.

Cost (default model, fp32, 106 M pruned weights): the dense copies and masks (5 bytes per weight) and two fp32
sums at a time (G with the margin's squared-gradient sums, then G with D: 8 bytes), ≈ 1.4 GB beside the model,
plus one sequence's whole-model backward; per round 2 forwards + 2 backwards per training sequence and
(1 + #ratios) forwards of the held-out sequences. Gradients are summed as the backward makes them
(:func:`streamed_gradients`), the margin is folded into G before D is allocated (:func:`fold_margin`), and the
curvature pass recomputes the forward rather than keep a third sum: the same masks, bit for bit, as the one-pass
layout that held G, D, SE, every gradient at once and a shifted copy of G (peak RSS 4.4–5.1 GiB in the quick runs;
docs/pruning.md). :func:`lm_memory_estimate` counts it before anything is
allocated, and :func:`check_lm_memory` refuses to start (pointing at ``objective="block"``) when it clearly
exceeds the free memory of the model's device, rather than swapping or being killed an hour in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError, DataError
from ..utils import progress
from .barber import InitDelegatingRun, _nm_candidates, taylor_scores
from .common import PruneReport, execute
from .lm_statistics import fold_margin, lm_curvature, lm_gradient, lm_loss, release_freed_memory


class RecordRun(InitDelegatingRun):
    """The initial method's run, keeping every layer's masks and dense weights by full linear name."""

    def __init__(self, init_config, home: torch.device | None = None):
        self.config = init_config
        self.init = init_config.make_run(keep_dense=True)
        self.true_sequential = self.init.true_sequential
        self.needs_reference_outputs = self.init.needs_reference_outputs
        self.home = home
        self.all_dense: dict[str, torch.Tensor] = {}
        self.all_masks: dict[str, torch.Tensor] = {}

    def refine_layer(self, ctx, targets, reference_outputs):
        # The driver solves on its compute device; the rebuild runs where the model lives (the layer goes home).
        for n, keep in self.init.masks.items():
            self.all_masks[f"{ctx.prefix}.{n}"] = keep if self.home is None else keep.to(self.home)
            dense = self.init.dense[n]
            self.all_dense[f"{ctx.prefix}.{n}"] = dense if self.home is None else dense.to(self.home)
        return self.init.refine_layer(ctx, targets, reference_outputs)  # clears the init's per-layer copies


def lm_memory_estimate(model: nn.Module, config, seqlen: int, filter_fn=None) -> dict[str, int]:
    """Bytes the lm rebuild holds beside the model at its peak, counted from the shapes before anything is allocated.

    Per pruned weight (element size e of the model's dtype): its dense copy (e) and keep-mask (1 byte), and two
    fp32 sums at a time (8 bytes): G with the margin's squared-gradient sums in the gradient pass, G (the margin
    folded in) with D in the curvature pass and while scoring; gradients are summed as the backward makes them, so
    none is held for every weight at once (:func:`streamed_gradients`). The margin costs no memory. Plus one
    sequence's whole-model backward: the logits, their log-softmax and two logit-sized gradients, 4 × T × vocab × 4
    bytes, and what autograd saves in each decoder layer, ≈ (8·hidden + 3.5·intermediate) values of size e per
    token (measured with saved-tensor hooks on two Llama shapes, the default model's and the tests' tiny one).
    On the default model (fp32, 106.2 M pruned weights, 30 layers, T = 512): 1.29 GiB + 0.37 GiB logits + 0.57 GiB
    layers = 2.23 GiB (the layout before issue 4: 2.08 + 0.37 GiB, the layers left out).
    Returns {"pruned_weights", "weights_bytes", "activation_bytes", "total_bytes"}.
    """
    from ..models import get_adapter

    adapter = get_adapter(model)
    count, elem = 0, 4
    for i in range(adapter.num_layers):
        prefix = adapter.layer_prefix(i)
        for n, m in {**adapter.attention_linears(i), **adapter.mlp_linears(i)}.items():
            full = f"{prefix}.{n}"
            if config.init.selects(full) and (filter_fn is None or filter_fn(full, m)):
                count, elem = count + m.weight.numel(), m.weight.element_size()
    per_weight = elem + 1 + 2 * 4
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else int(model.config.vocab_size)
    cfg = getattr(model.config, "text_config", model.config)
    hidden = int(getattr(cfg, "hidden_size", 0))
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    layers = adapter.num_layers * seqlen * int(8 * hidden + 3.5 * inter) * elem
    activation = 4 * max(seqlen, 1) * vocab * 4 + layers
    return {"pruned_weights": count, "weights_bytes": count * per_weight, "activation_bytes": activation,
            "total_bytes": count * per_weight + activation}


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory where ``device``'s tensors live: the CUDA device's free bytes, else the host's available
    memory (psutil, else /proc/meminfo's MemAvailable); None where neither can be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_lm_memory(estimate: dict[str, int], device: torch.device, free: int | None = None) -> None:
    """Raise a :class:`ConfigError` when the estimate exceeds the free memory of ``device`` — never a silent
    fallback to the block objective, whose masks differ (it loses to Wanda at 50 % on the default model)."""
    free = free_memory_bytes(device) if free is None else free
    if free is None or estimate["total_bytes"] <= free:
        return
    gib = 2.0 ** 30
    raise ConfigError(
        f"Barber(objective='lm') needs about {estimate['total_bytes'] / gib:.1f} GiB beside the model on {device} "
        f"(dense copies, gradient, curvature and noise of {estimate['pruned_weights']:,} pruned weights "
        f"{estimate['weights_bytes'] / gib:.1f} GiB, whole-model backward {estimate['activation_bytes'] / gib:.1f} "
        f"GiB), but only {free / gib:.1f} GiB is free: pass objective='block' (the paper's block-wise rebuild, "
        "2.2–2.4 GiB peak RSS on the default model against this objective's 3.4 GiB; CLI --objective block), "
        "prune fewer linears (targets/ignore), or free memory")


@dataclasses.dataclass
class Candidates:
    """One linear's candidate swaps: where the revived and the dropped weight sit, and the predicted gain."""

    grow: tuple[torch.Tensor, torch.Tensor]  # (rows, columns) of the revived weights
    drop: tuple[torch.Tensor, torch.Tensor]  # (rows, columns) of the dropped weights
    gain: torch.Tensor  # −(ΔL_revive + ΔL_drop) > 0


def pair_gains(keep: torch.Tensor, score: torch.Tensor, group: str, nm: tuple[int, int] | None,
               floor: float = 0.0) -> Candidates:
    """The swaps of one (out, in) linear whose predicted gain is above ``floor`` (≥ 0: profitable ones only).

    ``score``: :func:`taylor_scores` (−ΔL on pruned, ΔL on kept positions). Unstructured: per output row
    (``group="row"``) or over the whole matrix (``"layer"``), the i-th best pruned pairs with the i-th cheapest
    kept weight; the gains fall with i, so any threshold selects a prefix of each group and every group keeps its
    count. N:M: one candidate per group of M inputs (its best pruned vs its worst kept weight), so a swap never
    leaves its group.
    """
    rows, cols = keep.shape
    if nm is not None:
        m = nm[1]
        gain, ip, ik = _nm_candidates(keep, score, m)  # (rows, cols/M)
        r, g = torch.nonzero(gain > floor, as_tuple=True)
        return Candidates((r, g * m + ip[r, g]), (r, g * m + ik[r, g]), gain[r, g])
    k2, s2 = (keep, score) if group == "row" else (keep.reshape(1, -1), score.reshape(1, -1))
    pruned = (~k2).sum(1)
    width = int(torch.minimum(pruned, k2.shape[1] - pruned).max())
    if width == 0:
        empty = torch.zeros(0, dtype=torch.long, device=keep.device)
        return Candidates((empty, empty), (empty, empty), torch.zeros(0, device=keep.device))
    pruned_s, pruned_i = s2.masked_fill(k2, float("-inf")).topk(width, dim=1)  # best revives first
    kept_s, kept_i = s2.masked_fill(~k2, float("inf")).topk(width, dim=1, largest=False)  # cheapest drops first
    gain = pruned_s - kept_s  # (G, width), non-increasing along dim 1; ±inf padding gives -inf, never chosen
    r, i = torch.nonzero(gain > floor, as_tuple=True)
    grow, drop = pruned_i[r, i], kept_i[r, i]
    if group == "row":
        return Candidates((r, grow), (r, drop), gain[r, i])
    return Candidates((grow // cols, grow % cols), (drop // cols, drop % cols), gain[r, i])


class LMRebuild:
    """Applies and undoes a global fraction of the candidate swaps on the model's weights, in place."""

    def __init__(self, modules: dict[str, nn.Linear], dense: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]):
        self.modules, self.dense, self.masks = modules, dense, masks
        self.cands: dict[str, Candidates] = {}

    def score(self, grad, curv, group: str, nm, max_ratio: float, noise=None, z: float = 0.0) -> int:
        """Find every linear's profitable pairs, keep those the largest ratio can use; return #profitable.

        With ``noise`` (the standard error of G) a revive's first-order term is taken ``z`` standard errors
        against it, G·w + z·SE·|w|: among millions of candidates the largest estimated gains are partly noise of
        the N-sequence mean (the winner's curse), and a pessimistic estimate ranks them by what is likely real.

        Memory: the shift is folded into ``grad`` in place by :func:`fold_margin` (``noise`` is emptied), never as
        a shifted copy beside G, D and SE.
        """
        if noise is not None and z:
            fold_margin(grad, noise, self.dense, z)
        gains = []
        for n, m in self.modules.items():
            s = taylor_scores(self.masks[n], m.weight.detach(), self.dense[n], grad[n], curv[n])
            gains.append(pair_gains(self.masks[n], s, group, nm).gain)
        allg = torch.cat(gains)
        self.profitable = int(allg.numel())
        k = int(max_ratio * self.profitable)
        self.best = allg.topk(k).values if k else allg[:0]  # the k_max largest predicted gains, best first
        del gains, allg
        floor = self.threshold(max_ratio)
        for n, m in self.modules.items():  # second pass: keep only the pairs the largest ratio can use
            s = taylor_scores(self.masks[n], m.weight.detach(), self.dense[n], grad[n], curv[n])
            self.cands[n] = pair_gains(self.masks[n], s, group, nm,
                                       floor=float(torch.nextafter(torch.tensor(floor), torch.tensor(-1.0))))
        return self.profitable

    def threshold(self, ratio: float) -> float:
        """The smallest gain among the best ``floor(ratio · #profitable)`` pairs (inf when that is none)."""
        k = int(ratio * self.profitable)
        return float("inf") if k == 0 else float(self.best[k - 1])

    @torch.no_grad()
    def apply(self, ratio: float) -> tuple[int, list]:
        """Make the swaps of ``ratio``; returns (#swaps, undo log)."""
        t, undo, swaps = self.threshold(ratio), [], 0
        if t == float("inf"):
            return 0, undo
        for n, c in self.cands.items():
            sel = c.gain >= t
            if not bool(sel.any()):
                continue
            g = (c.grow[0][sel], c.grow[1][sel])
            d = (c.drop[0][sel], c.drop[1][sel])
            w = self.modules[n].weight
            undo.append((n, g, d, w[d].clone()))
            w[g] = self.dense[n][g].to(w.dtype)  # a revived weight takes its dense value (§3)
            w[d] = 0.0  # kept weights keep the initial method's value (SparseGPT's update)
            swaps += int(g[0].numel())
        return swaps, undo

    @torch.no_grad()
    def undo(self, log: list) -> None:
        for n, g, d, old in log:
            w = self.modules[n].weight
            w[g] = 0.0
            w[d] = old

    def commit(self, log: list) -> None:
        for n, g, d, _ in log:
            self.masks[n][g] = True
            self.masks[n][d] = False


def rebuild_lm(model: nn.Module, config, calib: Any, filter_fn=None, **options: Any) -> PruneReport:
    """Barber(objective="lm"): the initial method on the training sequences, then ``config.rounds`` global
    rebuilds of the mask by the next-token loss (module docstring). Returns the run's :class:`PruneReport`."""
    import time

    from ..models import get_adapter
    from .common import layer_sizes, layer_sparsity

    start = time.perf_counter()
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2:
        raise DataError("Barber(objective='lm') needs calibration data: pass calib=(N, T) token ids, e.g. "
                        "compactlm.data.calibration_set(tokenizer)")
    if calib.shape[0] <= config.heldout:
        raise DataError(f"Barber(objective='lm') holds out the last heldout={config.heldout} calibration sequences "
                        f"to choose the step; calib has only {calib.shape[0]}: pass more sequences or lower heldout")
    train, heldout = calib[:-config.heldout], calib[-config.heldout:]
    home = next(model.parameters()).device
    memory = lm_memory_estimate(model, config, int(calib.shape[1]), filter_fn)
    check_lm_memory(memory, home)  # before the initial method allocates the dense copies
    run = RecordRun(config.init, home)
    init_report = execute(model, config.init, run, train, filter_fn, **options)
    release_freed_memory()  # the initial method's freed per-layer buffers, before the sums are allocated
    modules = {}
    adapter = get_adapter(model)
    block_of = {}
    for i in range(adapter.num_layers):
        prefix = adapter.layer_prefix(i)
        for label, linears in (("attention", adapter.attention_linears(i)), ("mlp", adapter.mlp_linears(i))):
            for n, m in linears.items():
                if f"{prefix}.{n}" in run.all_masks:
                    modules[f"{prefix}.{n}"] = m
                    block_of[f"{prefix}.{n}"] = (i, label)
    missing = set(run.all_masks) - set(modules)
    if missing:
        raise CalibrationError(f"Barber(objective='lm') found no attention/MLP block for {sorted(missing)[:3]}")
    rebuild = LMRebuild(modules, run.all_dense, run.all_masks)
    ratios = config.search_ratios or (float(config.rebuild_ratio),)
    was_training = model.training
    model.eval()
    rounds, swaps_by = [], {}
    try:
        for r in range(config.rounds):
            t0 = time.process_time()
            weights = {n: m.weight for n, m in modules.items()}
            grad, train_loss, noise = lm_gradient(model, weights, train, f"Barber lm round {r + 1}: gradients",
                                                  with_noise=config.margin > 0)
            if noise is not None and config.margin:
                fold_margin(grad, noise, rebuild.dense, float(config.margin))  # SE freed before D is allocated
            del noise
            curv = lm_curvature(model, weights, train, seed=r, desc=f"Barber lm round {r + 1}: curvature")
            profitable = rebuild.score(grad, curv, config.group, config.nm, max(ratios))
            del grad, curv, weights
            release_freed_memory()  # G and D: back to the OS before the held-out forwards' logits
            losses = {0.0: lm_loss(model, heldout)}
            for ratio in progress(ratios, desc=f"Barber lm round {r + 1}: step"):
                _, log = rebuild.apply(ratio)
                losses[ratio] = lm_loss(model, heldout)
                rebuild.undo(log)
            best = min(losses, key=lambda k: (losses[k], k))  # ties: fewer swaps
            swaps, log = rebuild.apply(best)
            rebuild.commit(log)
            for n, _, d, _ in log:
                swaps_by[block_of[n]] = swaps_by.get(block_of[n], 0) + int(d[0].numel())
            rounds.append({"round": r + 1, "train_loss": train_loss, "profitable_pairs": profitable,
                           "heldout_loss": {str(k): v for k, v in losses.items()}, "ratio": best, "swaps": swaps,
                           "cpu_seconds": time.process_time() - t0})
            rebuild.cands.clear()
            if best == 0.0:
                break  # no step helps on the held-out sequences: the mask is final
    finally:
        model.train(was_training)
    layer_records = [{"layer": i, "swaps": {label: swaps_by.get((i, label), 0) for label in ("attention", "mlp")}}
                     for i in range(adapter.num_layers)]
    layer_records.append({"lm_rounds": rounds, "swaps": {}, "heldout_sequences": int(heldout.shape[0]),
                          "train_sequences": int(train.shape[0]), "memory_estimate": memory})
    sparsity = {n: s for n, s in layer_sparsity(model).items() if n in init_report.sparsity}
    return PruneReport(config.to_dict(), init_report.records, layer_records, sparsity, layer_sizes(model),
                       time.perf_counter() - start)
