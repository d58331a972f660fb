"""GPTQ: layer-wise weight quantization with second-order error compensation.

Based on Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv 2210.17323): §3 (OBQ objective ``||WX - ŴX||²``, Hessian ``H = 2XXᵀ``), §4 step 1
(arbitrary, here act-order, column order), step 2 (lazy batch updates in blocks of ``block_size``
columns), step 3 (Cholesky form of ``H⁻¹`` with dampening). Act-order uses *static groups* (group
parameters computed from the full weight before any update), so the packed weight needs no ``g_idx``
and runs on every kernel; without act-order, a group's parameters are chosen when the sweep reaches
it, from the already-updated weight (the reference implementation's behaviour).

Sparsity: with ``respect_sparsity`` (default), weights that are exactly 0 before quantization (a
pruned layer) are forced to the code that dequantizes to exactly 0 and stay 0; their rounding error
is compensated by the remaining weights like any other (SparseGPT's joint update, arXiv 2301.00774 §3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..layerwise import LayerContext
from ..layerwise import run as layerwise_run
from ..primitives.hessian import HessianAccumulator, damped_inverse_cholesky, prepare
from ..primitives.quant import QuantSpec, choose_qparams
from ..registry import register
from .common import WeightQuantConfig, layer_filter, pack_into, quant_targets


@dataclasses.dataclass(frozen=True)
class GPTQ(WeightQuantConfig):
    """GPTQ (arXiv 2210.17323). Fields beyond :class:`WeightQuantConfig`:

    - ``block_size``: columns per lazy batch update (§4 step 2; 128 as in the paper).
    - ``damp``: dampening as a fraction of the mean Hessian diagonal (§4 step 3; 0.01).
    - ``act_order``: process columns by decreasing Hessian diagonal, with static groups.
    - ``respect_sparsity``: keep weights that are exactly zero at exactly zero (prune-then-quantize).
    - ``true_sequential``: re-collect inputs after each group of linears (q/k/v, o, gate/up, down).
    - ``batch_size``: calibration sequences per forward.

    ``clip_search`` defaults to True here (RTN keeps plain min-max): each group's range is shrunk to the
    ratio that minimises its reconstruction error before the column loop, as GPTQModel's ``mse`` option and
    AWQ's clipping do. On the default model (PPL-wiki-512-q, g64) it took W4 from 28.30 to 27.62 and W3
    from 51.36 to 43.85, for ≈ 2 % more calibration CPU time (docs/quantization.md). Set it False to
    match llm-compressor's min-max observer.
    """

    clip_search: bool = True
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    respect_sparsity: bool = True
    true_sequential: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1 column, got {self.block_size}")
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"damp is a fraction of the mean Hessian diagonal in (0, 1), got {self.damp}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class GPTQResult:
    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, groups)
    zero: torch.Tensor  # (out, groups)
    weight: torch.Tensor | None  # (out, in) fp32, the dequantized weight (dropped once copied into the module)
    loss: float  # GPTQ's accumulated objective sum_i (w_i - q_i)^2 / [H^-1]_ii / 2
    damp: float
    retries: int
    dead: int


def gptq_solve(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, block_size: int = 128, percdamp: float = 0.01,
               act_order: bool = True, keep_zero: torch.Tensor | None = None, name: str = "this layer") -> GPTQResult:
    """Quantize ``W`` (out, in) against Hessian ``H`` (in, in); math only, no modules (STYLE 4)."""
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    rows, cols = W.shape
    dead = prepare(H, W)
    if keep_zero is not None:
        keep_zero = keep_zero | dead.unsqueeze(0)
    gw = spec.group_width(cols)
    static = act_order or spec.group_size == -1
    if static:
        scale, zero = choose_qparams(W, spec)  # (out, groups), from the whole weight before any update
    else:
        scale = torch.zeros(rows, cols // gw, device=W.device)
        zero = torch.zeros_like(scale)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    H = H[perm][:, perm]
    # Transposed layout, (permuted columns, rows): each column of W is a contiguous row here, and the per-column
    # rank-1 update then runs on a contiguous block (about 2x faster than on strided column views).
    WT = W[:, perm].t().contiguous()
    kzT = keep_zero[:, perm].t().contiguous() if keep_zero is not None else None
    inv = damped_inverse_cholesky(H, percdamp, name=name)
    Hinv = inv.Hinv_upper
    codesT = torch.zeros(cols, rows, dtype=torch.uint8, device=W.device)
    QT = torch.zeros_like(WT)
    loss = torch.zeros(rows, device=W.device)
    maxq = spec.maxq
    group_of = perm // gw  # the group of each permuted column
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = WT[i1:i2].clone()
        C1 = torch.empty_like(W1)  # this block's codes, as floats
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # The column loop runs ~150K times per model: per-column work is kept to a few in-place ops, and the
        # per-column group parameters, pivots, codes, dequantized values and loss are gathered or computed once
        # per block instead (the same arithmetic as the textbook loop in tests/quant/test_gptq.py, which checks
        # that the codes agree).
        pivots = torch.diagonal(Hinv1).tolist()
        if static:
            S1, Z1 = scale.t()[group_of[i1:i2]], zero.t()[group_of[i1:i2]]
        for i in range(i2 - i1):
            if static:
                s, z = S1[i], Z1[i]
            else:
                col = int(perm[i1 + i])
                g = col // gw
                if col % gw == 0:
                    # Dynamic groups: parameters from the group's current (already error-compensated) weights.
                    window = torch.cat([W1[i:], WT[i2:]], dim=0)[:gw].t()
                    s, z = choose_qparams(window, dataclasses.replace(spec, group_size=-1))
                    scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                s, z = scale[:, g], zero[:, g]
            w = W1[i]
            q = w.div(s).round_().add_(z).clamp_(0, maxq)
            if kzT is not None:
                q = torch.where(kzT[i1 + i], z, q)  # the code of exactly 0
            C1[i] = q
            err = w.sub(q.sub(z).mul_(s)).div_(pivots[i])
            # Only the columns after i are still to be quantized (column i itself would become dq).
            W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1.0)
            Err1[i] = err
        if not static:
            S1, Z1 = scale.t()[group_of[i1:i2]], zero.t()[group_of[i1:i2]]
        codesT[i1:i2] = C1.to(torch.uint8)
        QT[i1:i2] = (C1 - Z1) * S1
        loss += Err1.square().sum(dim=0) / 2  # sum_i (w_i - q_i)^2 / [H^-1]_ii^2 / 2
        WT[i2:] -= Hinv[i1:i2, i2:].t() @ Err1
    inv_perm = torch.argsort(perm)
    return GPTQResult(codesT[inv_perm].t().contiguous(), scale, zero, QT[inv_perm].t().contiguous(), float(loss.sum()),
                      inv.damp, inv.retries, int(dead.sum()))


class GPTQRun:
    """Per-run state for :func:`compactlm.layerwise.run` (Hessians, results): dropped after the run (STYLE 8)."""

    needs_reference_outputs = False
    needs_linear_outputs = False  # the Hessian needs only each linear's inputs (the driver then skips the outputs)
    shares_input_stats = True  # q/k/v (and gate/up) see one input: one Hessian for them (solve never writes it)

    def __init__(self, cfg: GPTQ, bits_for: dict[str, int] | None = None):
        self.cfg = cfg
        self.true_sequential = cfg.true_sequential
        self.bits_for = bits_for or {}
        self.results: dict[str, tuple[GPTQResult, QuantSpec]] = {}
        # (model, targets) once run_and_pack asks for packing layer by layer; a tuple, not a dict, so that the
        # layer checkpoints (which save dict entries keyed by module name) never pick up the modules.
        self.pack_target: tuple[nn.Module, dict[str, nn.Linear]] | None = None

    def new_stats(self, name: str, module: nn.Linear) -> Any:
        return HessianAccumulator(module.in_features, device=module.weight.device)

    def add_batch(self, stats: HessianAccumulator, name: str, module: nn.Linear, inp: torch.Tensor,
                  out: torch.Tensor) -> None:
        stats.add(inp)

    def hessian(self, name: str, module: nn.Linear, stats: Any, ctx: LayerContext) -> torch.Tensor:
        return stats.H

    def solve(self, name: str, module: nn.Linear, stats: Any, ctx: LayerContext) -> dict[str, Any]:
        full = f"{ctx.prefix}.{name}"
        spec = self.cfg.spec(self.bits_for.get(full))
        keep_zero = (module.weight == 0) if self.cfg.respect_sparsity else None
        if keep_zero is not None and not keep_zero.any():
            keep_zero = None
        res = solve_rows(module.weight, self.hessian(name, module, stats, ctx), spec, self.cfg, keep_zero, full)
        # Later groups see the quantized layer. Swap the storage rather than copy_ into it: the weight usually
        # lives in the checkpoint's private mmap, where an in-place write turns every page into anonymous
        # memory that stays resident until the whole file is unmapped (15 MiB per layer of the default model,
        # +450 MiB by the last layer); a fresh tensor is freed once the layer is packed, and the clean mapped
        # pages are released by the driver.
        module.weight.data = res.weight.to(module.weight.dtype)
        # Keep only what packing needs: the fp32 dequantized copy would hold a second full-precision model
        # until the run ends (the module weight already holds it).
        self.results[full] = (dataclasses.replace(res, weight=None), spec)
        return {"bits": spec.bits, "loss": res.loss, "damp": res.damp, "damp_retries": res.retries,
                "dead_columns": res.dead, "kept_zeros": int(keep_zero.sum()) if keep_zero is not None else 0}

    def refine_layer(self, ctx, targets, reference_outputs) -> None:
        return None

    def finish_layer(self, ctx: LayerContext) -> None:
        """Pack this layer's linears now that the driver is done with it (its outputs are computed).

        Packing as each layer finishes, instead of after the whole run, means the uint8 codes of the finished
        layers are never all held at once (≈ one byte per weight, 106 MiB on the default model); the packed
        modules are bit-identical either way (same codes, scales and zeros).
        """
        if self.pack_target is None:
            return
        model, targets = self.pack_target
        for name in [n for n in self.results if n.startswith(ctx.prefix + ".")]:
            res, spec = self.results.pop(name)
            # pop: the replaced nn.Linear (and its fp32 weight) must not outlive its packing in `targets`
            pack_into(model, name, targets.pop(name), res.codes, res.scale, res.zero, spec)


def solve_rows(weight: torch.Tensor, H: torch.Tensor | list[torch.Tensor], spec: QuantSpec, cfg: GPTQ,
               keep_zero: torch.Tensor | None, name: str) -> GPTQResult:
    """One Hessian for the whole weight, or one per equal block of rows (APTQ's per-head Hessians)."""
    if isinstance(H, torch.Tensor):
        return gptq_solve(weight, H, spec, block_size=cfg.block_size, percdamp=cfg.damp, act_order=cfg.act_order,
                          keep_zero=keep_zero, name=name)
    step = weight.shape[0] // len(H)
    parts = [gptq_solve(weight[k * step:(k + 1) * step], h, spec, block_size=cfg.block_size, percdamp=cfg.damp,
                        act_order=cfg.act_order, name=f"{name} rows {k * step}:{(k + 1) * step}",
                        keep_zero=None if keep_zero is None else keep_zero[k * step:(k + 1) * step])
             for k, h in enumerate(H)]
    cat = lambda f: torch.cat([getattr(p, f) for p in parts], dim=0)  # noqa: E731
    return GPTQResult(cat("codes"), cat("scale"), cat("zero"), cat("weight"), sum(p.loss for p in parts),
                      max(p.damp for p in parts), max(p.retries for p in parts), max(p.dead for p in parts))


def run_and_pack(model: nn.Module, cfg: GPTQ, runner: GPTQRun, targets: dict[str, nn.Linear], calib,
                 report: dict | None, desc: str, device=None) -> nn.Module:
    runner.pack_target = (model, targets)  # each layer is packed as soon as it is done (finish_layer)
    try:
        lw = layerwise_run(model, calib, runner, device=device, batch_size=cfg.batch_size,
                           filter_fn=layer_filter(targets), desc=desc)
    finally:
        runner.pack_target = None
    # Layers restored from a checkpoint by a resumed run come back dense with their results: pack them here.
    for name, (res, spec) in runner.results.items():
        pack_into(model, name, targets[name], res.codes, res.scale, res.zero, spec)
    runner.results.clear()
    if report is not None:
        report.setdefault("layers", []).extend(lw.records)
    return model


@register(GPTQ)
def apply_gptq(model: nn.Module, cfg: GPTQ, calib=None, filter_fn=None, report: dict | None = None,
               device=None, **_options) -> nn.Module:
    targets = quant_targets(model, cfg, filter_fn)
    return run_and_pack(model, cfg, GPTQRun(cfg), targets, calib, report, "GPTQ", device)
