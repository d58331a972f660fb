"""APTQ: attention-aware, Hessian-trace-guided mixed-precision GPTQ.

Based on Guan et al., "APTQ: Attention-aware Post-Training Mixed-Precision Quantization for Large
Language Models" (arXiv 2402.14866): §3.2 (quantize q/k/v against the error of the *attention output*,
softmax included, with a Levenberg–Marquardt ``JᵀJ`` Hessian), §3.3 (Hessian-trace sensitivity and a
2/4-bit mixed allocation).

How the attention-output objective is approximated (so that GPTQ's column sweep still applies, which
needs a Hessian of the Kronecker form ``I_out ⊗ H_in`` per block of output rows):

- **v_proj** (exact): ``O_t = Σ_j A_tj V_j`` is linear in ``W_v``, so ``ΔO_t = ΔW_v (A X)_t``; each KV
  head gets ``H = 2/n Σ_{h ∈ group} (A_h X)ᵀ(A_h X)``, summed over the query heads sharing it.
- **q_proj** (LM, token-diagonal, head-isotropic): the Jacobian of ``O_t`` with respect to ``Q_t`` is
  ``J_t = s Σ_j A_tj (V_j − O_t) K_jᵀ`` (the softmax derivative). ``J_tᵀJ_t`` is replaced by
  ``(‖J_t‖²_F / D) I`` (RoPE is orthogonal, so the norm is the same in the rotated basis), giving per
  head ``H = 2/n Σ_t (‖J_t‖²_F / D) x_t x_tᵀ``; ``‖J_t‖²_F`` is a Hutchinson estimate with
  ``probes`` Gaussian vectors, each costing one attention-sized matmul.
- **k_proj** (LM, token-diagonal, head-isotropic): ``∂O_t/∂K_j = s A_tj (V_j − O_t) Q_tᵀ``, whose squared
  norm ``s² A_tj² ‖V_j − O_t‖² ‖Q_t‖²`` summed over queries ``t`` is computed exactly in closed form;
  cross-token terms ``j ≠ l`` of ``JᵀJ`` are dropped.
- Every other linear uses GPTQ's ``2XXᵀ``. Deviations from the paper: the token-diagonal/isotropic
  reduction above (the paper's full ``JᵀJ`` does not fit GPTQ's per-column update at this size), q/k
  norms (Qwen3, Gemma 3) are left out of the chain rule, and the allocation is an exact knapsack instead
  of a sorted threshold, so the average meets the target exactly.

Sensitivity of a layer at ``b`` bits (§3.3 ranks layers by the trace of the *loss* Hessian with
respect to their weights, HAWQ-V2 style: trace times the size of the quantization perturbation). Two
estimates, chosen by ``sensitivity``:

- ``"loss"`` (default): the loss Hessian in Kronecker (Fisher/K-FAC) form ``G ⊗ A`` — ``G`` the second
  moment of the loss gradient at the layer's output, from one full-model backward pass per calibration
  batch (:mod:`compactlm.primitives.fisher`), ``A`` the layer's input second moment — so the loss a
  quantized weight adds is ``½ Σ_i G_ii ΔW_i A ΔW_iᵀ``. The softmax of attention is inside ``G`` for
  q/k/v (the gradient flows through it), which is the attention-awareness of §3.2 for the allocation.
  ``ΔW`` is the error GPTQ itself leaves at that width (``sensitivity_quantizer="gptq"``) or RTN's.
- ``"layer"``: the local estimate ``Σ_blocks tr(H_block)/d_in · ‖W_block − RTN_b(W_block)‖²`` with the
  layer's own (attention-aware for q/k/v) Hessian. Cheaper (no backward pass), but blind to where in the
  network the layer sits; on SmolLM2-135M it sent every late layer to 2 bits and lost badly to uniform
  W3 (PPL-wiki-512-q 291.7 vs 51.4), which is why ``"loss"`` is the default.

The allocation picks one width per item from ``bits_menu`` minimising total sensitivity with
``Σ bits·numel`` exactly ``avg_bits · Σ numel`` (weight-only bits); pinned layers keep their width;
fused groups (q/k/v, gate/up, all routed experts of a layer) form one item when ``share_fused`` (vLLM
fuses them into one matmul and needs one scheme per fused module). The sensitivities do not depend on the target,
so ``sensitivity_cache=PATH`` saves them once and lets other budgets (or a restarted run) skip both passes
(:mod:`compactlm.quant.aptq_cache`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
from torch import nn

from ..attention.runtime import attention_override
from ..errors import ConfigError
from ..layerwise import run as layerwise_run
from ..models.adapter import get_adapter
from ..primitives.fisher import output_gradient_moments
from ..primitives.hessian import HessianAccumulator
from ..primitives.quant import SUPPORTED_BITS, dequantize, rtn
from ..registry import register
from .aptq_cache import cached_sensitivity
from .common import layer_filter, quant_targets
from .gptq import GPTQ, GPTQRun, run_and_pack, solve_rows


@dataclasses.dataclass(frozen=True)
class APTQ(GPTQ):
    """APTQ (arXiv 2402.14866). Fields beyond :class:`GPTQ` (whose ``bits`` is unused: the menu decides):

    - ``avg_bits``: target average weight bits over the quantized layers, met exactly.
    - ``bits_menu``: widths to choose from (default 2/4, as in the paper).
    - ``pin``: ``{regex: bits}`` fixing the width of matching layers (``re.fullmatch`` on full names).
    - ``share_fused``: one width per fused group (q/k/v; gate/up; all experts of a layer).
    - ``attention_aware``: q/k/v Hessians from the attention output (§3.2); False = plain GPTQ Hessians.
    - ``probes``: Hutchinson probes for the q_proj Jacobian norm.
    - ``sensitivity``: ``"loss"`` (loss-gradient-weighted, global) or ``"layer"`` (local Hessian trace).
    - ``sensitivity_quantizer``: whose error enters the ``"loss"`` sensitivity, ``"gptq"`` or ``"rtn"``.
    - ``gradient_dtype``: ``"bf16"`` runs the loss-gradient pass of an fp32 model under bf16 autocast (about
      2x faster on a bf16-capable CPU; per-linear moments within ~1 % of fp32's), ``"fp32"`` in the model's dtype.
    """

    avg_bits: float = 3.0
    bits_menu: tuple[int, ...] = (2, 4)
    pin: dict[str, int] = dataclasses.field(default_factory=dict)
    share_fused: bool = True
    attention_aware: bool = True
    probes: int = 8
    sensitivity: str = "loss"
    sensitivity_quantizer: str = "gptq"
    gradient_dtype: str = "bf16"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "bits_menu", tuple(sorted(set(self.bits_menu))))
        if not self.bits_menu or any(b not in SUPPORTED_BITS for b in self.bits_menu):
            raise ConfigError(f"bits_menu must be a non-empty subset of {SUPPORTED_BITS}, got {self.bits_menu}")
        lo, hi = self.bits_menu[0], self.bits_menu[-1]
        if not lo <= self.avg_bits <= hi:
            raise ConfigError(f"avg_bits={self.avg_bits} is outside the menu's range [{lo}, {hi}]; choose a target "
                              f"between the smallest and largest entries of bits_menu")
        for pattern, bits in self.pin.items():
            if bits not in SUPPORTED_BITS:
                raise ConfigError(f"pin[{pattern!r}] = {bits}: pinned widths must be one of {SUPPORTED_BITS}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"pin pattern {pattern!r} is not a valid regex: {exc}") from None
        if self.probes < 1:
            raise ConfigError(f"probes must be >= 1, got {self.probes}")
        if self.sensitivity not in ("loss", "layer"):
            raise ConfigError(f"sensitivity must be 'loss' (loss-gradient weighted) or 'layer' (local Hessian "
                              f"trace), got {self.sensitivity!r}")
        if self.sensitivity_quantizer not in ("gptq", "rtn"):
            raise ConfigError(f"sensitivity_quantizer must be 'gptq' or 'rtn', got {self.sensitivity_quantizer!r}")
        if self.gradient_dtype not in ("bf16", "fp32"):
            raise ConfigError(f"gradient_dtype must be 'bf16' (autocast) or 'fp32', got {self.gradient_dtype!r}")


# --- attention-aware statistics ----------------------------------------------------------------------
class AttnStats:
    """Per-head Hessian accumulators of one of q/k/v (a list with one entry per head)."""

    def __init__(self, heads: int, in_features: int, device):
        self.heads = [HessianAccumulator(in_features, device=device) for _ in range(heads)]

    @property
    def H(self) -> list[torch.Tensor]:
        return [h.H for h in self.heads]


def _weighted_add(acc: HessianAccumulator, x: torch.Tensor, w: torch.Tensor | None) -> None:
    """Add tokens ``x`` (N, in) with per-token weights ``w`` (N,) (None: plain)."""
    acc.add(x if w is None else x * w.clamp(min=0).sqrt().unsqueeze(-1))


@torch.no_grad()
def attention_stats(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scaling: float,
                    probes: int, gen: torch.Generator) -> tuple[list, list, list]:
    """Per query head: token weights for q; per KV head: token weights for k and mixed inputs for v.

    ``x`` (B, T, in) are the projections' inputs; ``q`` (B, H, T, D), ``k``/``v`` (B, H_kv, T, D) post-RoPE.
    Returns lists of (tokens, ...) tensors: ``wq[h]`` (B·T,), ``wk[g]`` (B·T,), ``xv[g]`` list of (B·T, in).
    """
    B, H, T, D = q.shape
    G = H // k.shape[1]
    kr, vr = k.repeat_interleave(G, dim=1).float(), v.repeat_interleave(G, dim=1).float()
    qf = q.float()
    scores = qf @ kr.transpose(-1, -2) * scaling  # (B, H, T, T)
    if mask is None:
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    A = torch.softmax(scores, dim=-1)  # (B, H, T, T)
    O = A @ vr  # (B, H, T, D)
    # q: Hutchinson estimate of ||J_t||_F^2 with J_t u = s [A (Ku ⊙ V) − (A Ku) O_t].
    wq = torch.zeros(B, H, T, device=q.device)
    for _ in range(probes):
        u = torch.randn(D, device=q.device, generator=gen)
        ku = kr @ u  # (B, H, T)
        ju = A @ (ku.unsqueeze(-1) * vr) - (A @ ku.unsqueeze(-1)) * O
        wq += (scaling**2) * ju.pow(2).sum(-1) / probes
    # k: sum_t s^2 A_tj^2 ||V_j - O_t||^2 ||Q_t||^2, expanded so that it is three (T x T)·(T x ·) products.
    P = A.pow(2).transpose(-1, -2)  # (B, H, T_j, T_t)
    qn = qf.pow(2).sum(-1, keepdim=True)  # (B, H, T, 1)
    t1 = vr.pow(2).sum(-1) * (P @ qn).squeeze(-1)
    t2 = (vr * (P @ (qn * O))).sum(-1)
    t3 = (P @ (qn * O.pow(2).sum(-1, keepdim=True))).squeeze(-1)
    wk_h = (scaling**2) * (t1 - 2 * t2 + t3)  # (B, H, T)
    xf = x.float()
    wq_list = [wq[:, h].reshape(-1) / D for h in range(H)]
    wk_list = [wk_h[:, g * G:(g + 1) * G].sum(1).reshape(-1) / D for g in range(k.shape[1])]
    xv_list = [[(A[:, h] @ xf).reshape(B * T, -1) for h in range(g * G, (g + 1) * G)] for g in range(k.shape[1])]
    return wq_list, wk_list, xv_list


class _AttnAware:
    """Mixin for runners: collect attention-aware q/k/v Hessians through a scoped attention handler."""

    def _init_attn(self, model: nn.Module, cfg: APTQ, attention_aware: bool) -> None:
        self.adapter = get_adapter(model)
        self.cfg = cfg
        self.attention_aware = attention_aware
        f = self.adapter.family
        self.qkv = {f"{f.attn}.{f.q}": "q", f"{f.attn}.{f.k}": "k", f"{f.attn}.{f.v}": "v"}
        self._attn_stats: dict[str, AttnStats] = {}
        self._x: torch.Tensor | None = None
        self._gen: torch.Generator | None = None

    @property
    def needs_full_layer_forward(self) -> bool:
        # The q/k/v statistics are finished inside the attention handler, after the projections ran.
        return self.attention_aware

    def new_stats(self, name: str, module: nn.Linear) -> Any:
        if self.attention_aware and name in self.qkv:
            a = self.adapter
            heads = a.num_heads if self.qkv[name] == "q" else a.num_kv_heads
            self._attn_stats[name] = AttnStats(heads, module.in_features, module.weight.device)
            return self._attn_stats[name]
        return HessianAccumulator(module.in_features, device=module.weight.device)

    def add_batch(self, stats, name, module, inp, out) -> None:
        if isinstance(stats, AttnStats):
            self._x = inp  # consumed by the attention handler of this same forward
        else:
            stats.add(inp)

    def handler(self, module, query, key, value, attention_mask, scaling, fallback, **kwargs):
        if self._x is not None and self._attn_stats:
            if self._gen is None:
                self._gen = torch.Generator(device=query.device).manual_seed(0)
            wq, wk, xv = attention_stats(self._x, query, key, value, attention_mask, scaling, self.cfg.probes,
                                         self._gen)
            x2 = self._x.reshape(-1, self._x.shape[-1])
            for name, stats in self._attn_stats.items():
                kind = self.qkv[name]
                for h, acc in enumerate(stats.heads):
                    if kind == "q":
                        _weighted_add(acc, x2, wq[h])
                    elif kind == "k":
                        _weighted_add(acc, x2, wk[h])
                    else:  # sum (not mean) over the query heads sharing this KV head, like q and k
                        acc.add(torch.cat(xv[h], dim=0) * len(xv[h]) ** 0.5)
            self._x = None
        return fallback(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    def end_group(self, name: str) -> None:
        self._attn_stats.pop(name, None)

    def run(self, model, calib, targets, desc, device=None):
        handlers = {i: self.handler for i in range(self.adapter.num_layers)} if self.attention_aware else {}
        with attention_override(model, handlers):
            return layerwise_run(model, calib, self, device=device, batch_size=self.cfg.batch_size,
                                 filter_fn=layer_filter(targets), desc=desc)


class SensitivityRun(_AttnAware):
    """First pass: per-linear sensitivity at each menu width on the unmodified model; changes nothing.

    With ``grad_moments`` (the ``"loss"`` sensitivity) the q/k/v statistics are plain input moments:
    the loss gradient already carries the attention's effect.
    """

    true_sequential = False
    needs_reference_outputs = False

    def __init__(self, model: nn.Module, cfg: APTQ, grad_moments: dict[str, torch.Tensor] | None = None):
        self._init_attn(model, cfg, attention_aware=cfg.attention_aware and grad_moments is None)
        self.grad_moments = grad_moments
        self.sens: dict[str, dict[int, float]] = {}

    def solve(self, name, module, stats, ctx) -> dict[str, Any]:
        full = f"{ctx.prefix}.{name}"
        W = module.weight.detach().float()
        out: dict[int, float] = {}
        if self.grad_moments is not None:
            A, G = stats.H, self.grad_moments[full].to(W.device)
            keep_zero = (W == 0) if self.cfg.respect_sparsity and bool((W == 0).any()) else None
            for bits in self.cfg.bits_menu:
                spec = self.cfg.spec(bits)
                if self.cfg.sensitivity_quantizer == "gptq":
                    Q = solve_rows(W, A, spec, self.cfg, keep_zero, full).weight
                else:
                    Q = dequantize(*rtn(W, spec))
                dW = W - Q
                out[bits] = 0.5 * float((G * ((dW @ A) * dW).sum(1)).sum())
        else:
            Hs = stats.H if isinstance(stats, AttnStats) else [stats.H]
            step = W.shape[0] // len(Hs)
            for bits in self.cfg.bits_menu:
                total = 0.0
                for b, H in enumerate(Hs):
                    Wb = W[b * step:(b + 1) * step]
                    codes, s, z = rtn(Wb, self.cfg.spec(bits))
                    total += float(torch.diag(H).mean()) * float((Wb - dequantize(codes, s, z)).pow(2).sum())
                out[bits] = total
        self.sens[full] = out
        self.end_group(name)
        return {"sensitivity": out}

    def refine_layer(self, ctx, targets, reference_outputs) -> None:
        return None


class APTQRun(_AttnAware, GPTQRun):
    """Second pass: GPTQ at the allocated widths, with attention-aware q/k/v Hessians."""

    shares_input_stats = False  # q/k/v each hold their own attention-aware statistics

    def __init__(self, model: nn.Module, cfg: APTQ, bits_for: dict[str, int]):
        GPTQRun.__init__(self, cfg, bits_for)
        self._init_attn(model, cfg, attention_aware=cfg.attention_aware)

    def hessian(self, name, module, stats, ctx):
        self.end_group(name)
        return stats.H


# --- allocation ---------------------------------------------------------------------------------------
def allocation_items(model: nn.Module, targets: dict[str, nn.Linear], share_fused: bool) -> list[list[str]]:
    """Groups of full names that must share one width (singletons when ``share_fused`` is False)."""
    if not share_fused:
        return [[n] for n in targets]
    adapter = get_adapter(model)
    items: list[list[str]] = []
    seen: set[str] = set()
    for i in range(adapter.num_layers):
        p = adapter.layer_prefix(i)
        groups = [[f"{p}.{n}" for n in g] for g in adapter.fused_groups(i)]
        experts = [n for n in targets if n.startswith(f"{p}.") and ".experts." in n]
        if experts:  # vLLM's fused-MoE kernels take one scheme for all routed experts of a layer
            groups = [g for g in groups if not any(".experts." in n for n in g)] + [experts]
        for g in groups:
            g = [n for n in g if n in targets and n not in seen]
            if g:
                items.append(g)
                seen.update(g)
    items.extend([n] for n in targets if n not in seen)
    return items


def allocate(items: list[list[str]], numel: dict[str, int], sens: dict[str, dict[int, float]],
             menu: tuple[int, ...], avg_bits: float, pinned: dict[str, int]) -> dict[str, int]:
    """Exact multiple-choice knapsack: minimise Σ sensitivity with Σ bits·numel == avg_bits·Σ numel."""
    total = sum(numel.values())
    unit = 0
    for n in numel.values():
        unit = math.gcd(unit, n)
    budget_f = avg_bits * total / unit
    fixed = sum(pinned[n] * numel[n] for n in pinned) // unit
    free = [it for it in items if not any(n in pinned for n in it)]
    if abs(budget_f - round(budget_f)) > 1e-6:
        raise ConfigError(f"avg_bits={avg_bits} cannot be met exactly: total bits must be a multiple of {unit} "
                          f"weights; the nearest exact targets are {math.floor(budget_f) * unit / total:.4f} and "
                          f"{math.ceil(budget_f) * unit / total:.4f}")
    cap = round(budget_f) - fixed
    if cap < 0 or cap > 20_000_000:
        raise ConfigError(f"avg_bits={avg_bits} is not reachable with the pinned layers (budget {cap} units)")
    inf = float("inf")
    cost = torch.full((cap + 1,), inf, dtype=torch.float64)
    cost[0] = 0.0
    choice = []
    for it in free:
        size = sum(numel[n] for n in it) // unit
        new = torch.full_like(cost, inf)
        pick = torch.full((cap + 1,), -1, dtype=torch.int8)
        for ci, bits in enumerate(menu):
            c = bits * size
            if c > cap:
                continue
            cand = torch.full_like(cost, inf)
            cand[c:] = cost[: cap + 1 - c] + sum(sens[n][bits] for n in it)
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.tensor(ci, dtype=torch.int8), pick)
        cost = new
        choice.append(pick)
    if not math.isfinite(float(cost[cap])):
        reach = [c for c in range(cap + 1) if math.isfinite(float(cost[c]))]
        near = min(reach, key=lambda c: abs(c - cap)) if reach else 0
        raise ConfigError(f"avg_bits={avg_bits} is not reachable exactly with bits_menu={menu}; the nearest "
                          f"reachable average is {(near + fixed) * unit / total:.4f}")
    out = dict(pinned)
    c = cap
    for it, pick in zip(reversed(free), reversed(choice), strict=True):
        bits = menu[int(pick[c])]
        for n in it:
            out[n] = bits
        c -= bits * (sum(numel[n] for n in it) // unit)
    return out


def compute_sensitivity(model: nn.Module, cfg: APTQ, calib, targets: dict[str, nn.Linear],
                        device=None) -> dict[str, dict[int, float]]:
    """``{linear: {bits: cost}}``: the loss-gradient pass (``"loss"`` only), then the sensitivity pass."""
    grads = None
    if cfg.sensitivity == "loss":
        autocast = torch.bfloat16 if cfg.gradient_dtype == "bf16" else None
        grads = output_gradient_moments(model, calib, targets, batch_size=min(cfg.batch_size, 4),
                                        desc="APTQ loss gradients", autocast_dtype=autocast)
    probe = SensitivityRun(model, cfg, grads)
    probe.run(model, calib, targets, "APTQ sensitivity", device)
    return probe.sens


@register(APTQ)
def apply_aptq(model: nn.Module, cfg: APTQ, calib=None, filter_fn=None, report: dict | None = None,
               device=None, sensitivity_cache=None, **_options) -> nn.Module:
    """Quantize ``model`` with APTQ. ``sensitivity_cache`` (a JSON file path): reuse the sensitivities saved there
    for this same model, calibration and sensitivity settings, or compute and save them (:mod:`.aptq_cache`)."""
    targets = quant_targets(model, cfg, filter_fn)
    pinned = {n: b for n in targets for p, b in cfg.pin.items() if re.fullmatch(p, n)}
    numel = {n: m.weight.numel() for n, m in targets.items()}
    items = allocation_items(model, targets, cfg.share_fused)
    for it in items:  # a fused group is pinned as a whole
        widths = {pinned[n] for n in it if n in pinned}
        if len(widths) > 1:
            raise ConfigError(f"pin gives different widths {sorted(widths)} to the fused group {it}; pin them alike "
                              "or set share_fused=False")
        if widths:
            pinned.update({n: widths.pop() for n in it})
    sens, source = cached_sensitivity(model, cfg, calib, targets, sensitivity_cache,
                                      lambda: compute_sensitivity(model, cfg, calib, targets, device), device)
    bits_for = allocate(items, numel, sens, cfg.bits_menu, cfg.avg_bits, pinned)
    if report is not None:
        report["sensitivity"] = sens
        report["sensitivity_source"] = source  # computed or loaded (from which cache), and its CPU seconds
        report["allocation"] = bits_for
        # The allocation's estimated cost beside every uniform width of the menu (same estimate, same units).
        report["estimated_cost"] = {"allocation": sum(sens[n][b] for n, b in bits_for.items() if n in sens),
                                    **{f"uniform_{b}": sum(s[b] for s in sens.values()) for b in cfg.bits_menu}}
    runner = APTQRun(model, cfg, bits_for)
    with attention_override(model, {i: runner.handler for i in range(runner.adapter.num_layers)}
                            if cfg.attention_aware else {}):
        return run_and_pack(model, cfg, runner, targets, calib, report, "APTQ", device)
