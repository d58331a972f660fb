"""The loss statistics of Barber's end-to-end objective (:mod:`.barber_lm`): G, its standard error and D of the
whole model's next-token loss for every pruned weight, streamed so that at most two fp32 sums and one weight's
gradient are alive at a time, and the held-out loss that picks the step.

G = E_s[∂L_s/∂W] over calibration sequences s; D = E_s[diag GGN of L_s] from targets sampled from the model's own
softmax (Martens 2020, arXiv 1412.1193 §9; Kunstner et al. 2019, arXiv 1905.12558 §3); see :mod:`.barber_lm`'s
docstring, steps 2 and 3, for how the rebuild uses them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError
from ..utils import progress


@contextlib.contextmanager
def streamed_gradients(model: nn.Module, weights: dict[str, torch.Tensor], add):
    """Inside: only ``weights`` require grad, and every backward hands each weight's gradient to ``add(name, g)``
    as soon as autograd has accumulated it, then drops it; the caller's ``requires_grad`` and ``.grad`` are back after.

    Why: ``torch.autograd.grad`` over every pruned weight returns all the gradients at once, another 4 bytes per
    weight (0.4 GiB on the default model) beside the sums; here at most one weight's gradient is in flight. The
    gradient tensors are the same (the same backward graph), so sums built from them are bit-identical.
    """
    name_of = {id(p): n for n, p in weights.items()}
    saved = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {p: p.grad for p in weights.values()}

    def consume(p: torch.Tensor) -> None:  # right after the backward has set p.grad
        g, p.grad = p.grad, None
        add(name_of[id(p)], g)  # g is the last reference: freed when this returns

    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in weights.values():
            p.requires_grad_(True)
            p.grad = None  # a backward accumulates into .grad: start from nothing
            handles.append(p.register_post_accumulate_grad_hook(consume))
        with torch.enable_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for p, g in saved_grads.items():
            p.grad = g
        for p, flag in saved.items():
            p.requires_grad_(flag)


def lm_gradient(model: nn.Module, weights: dict[str, torch.Tensor], seqs: torch.Tensor,
                desc: str = "Barber lm: gradients", with_noise: bool = False):
    """G = E_s[∂L_s/∂W] for every weight in ``weights``, L_s the mean next-token cross-entropy of sequence s of the
    (N, T) ``seqs``, one forward and backward per sequence, summed in fp32. Returns (G, mean L, noise): with
    ``with_noise`` noise is the standard error of G, sqrt(Var_s[∂L_s/∂W] / N) (the squared sums, turned into it in
    place), else None."""
    weights = dict(weights)
    grad = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    sq = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()} if with_noise else {}

    def add(n: str, g: torch.Tensor) -> None:
        grad[n] += g.float()
        if with_noise:
            sq[n] += g.float().pow_(2)

    device, total = next(iter(weights.values())).device, 0.0
    with streamed_gradients(model, weights, add):
        for seq in progress(seqs, desc=desc):
            ids = seq.unsqueeze(0).to(device)  # (1, T)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
            loss = F.cross_entropy(logits, ids[0, 1:])
            if not torch.isfinite(loss):
                raise CalibrationError(f"the calibration loss is {float(loss)} (not finite) in Barber's lm "
                                       "gradient pass; check the calibration data or run in fp32")
            del logits  # not needed by the backward (the log-softmax is saved): 4·T·vocab bytes less at its peak
            torch.autograd.backward(loss, inputs=list(weights.values()))
            total += float(loss.detach())
            del loss
    k = max(len(seqs), 1)
    grad = {n: g.div_(k) for n, g in grad.items()}
    noise = None
    if with_noise:  # unbiased variance of the per-sequence gradients, over N for the mean's standard error
        noise = {n: v.div_(k).sub_(grad[n] ** 2).clamp_(min=0).div_(max(k - 1, 1)).sqrt_() for n, v in sq.items()}
    return grad, total / k, noise


def lm_curvature(model: nn.Module, weights: dict[str, torch.Tensor], seqs: torch.Tensor, seed: int = 0,
                 desc: str = "Barber lm: curvature") -> dict[str, torch.Tensor]:
    """D = E_s[diag GGN of L_s] for every weight in ``weights``: per sequence one forward, targets sampled from the
    model's softmax (``seed``), one backward of their summed NLL, squared and divided by the T-1 predicted tokens
    (module docstring, step 2); fp32 sums.

    A pass of its own, after :func:`lm_gradient`, so that D never coexists with the squared-gradient sums of the
    margin (one full fp32 copy of the pruned weights less at the peak), for one more forward per sequence. The
    forward is recomputed on the same weights and inputs, so the logits, the sampled targets and D are those of a
    single forward shared with the gradient pass (tests/prune/test_barber_lm.py checks it bit for bit).
    """
    weights = dict(weights)
    curv = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    gen = torch.Generator().manual_seed(seed)
    tokens = [1]

    def add(n: str, h: torch.Tensor) -> None:
        curv[n] += h.float().pow_(2).div_(tokens[0])

    device = next(iter(weights.values())).device
    with streamed_gradients(model, weights, add):
        for seq in progress(seqs, desc=desc):
            ids = seq.unsqueeze(0).to(device)  # (1, T)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
            with torch.no_grad():
                sampled = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen).squeeze(1).to(device)
            nll = F.cross_entropy(logits, sampled, reduction="sum")
            tokens[0] = logits.shape[0]
            del logits  # as in lm_gradient: the backward needs only the saved log-softmax
            torch.autograd.backward(nll, inputs=list(weights.values()))
            del nll
    k = max(len(seqs), 1)
    return {n: d.div_(k) for n, d in curv.items()}


def lm_statistics(model: nn.Module, weights: dict[str, torch.Tensor], seqs: torch.Tensor, seed: int = 0,
                  desc: str = "Barber lm", with_noise: bool = False):
    """(G, D, mean L, noise): :func:`lm_gradient` then :func:`lm_curvature` on the same sequences (all three sums
    alive at once; :func:`rebuild_lm` folds the margin into G between the two passes instead)."""
    grad, loss, noise = lm_gradient(model, weights, seqs, f"{desc}: gradients", with_noise)
    return grad, lm_curvature(model, weights, seqs, seed, f"{desc}: curvature"), loss, noise


def fold_margin(grad: dict[str, torch.Tensor], noise: dict[str, torch.Tensor], dense: dict[str, torch.Tensor],
                z: float) -> None:
    """G ← G + z·SE·sign(w_dense) in place, one weight at a time, releasing each SE (popped from ``noise``) once
    folded: a revive's first-order term G·w then sits ``z`` standard errors against it (module docstring, step 3).
    The same element-wise operations in the same order as ``G + z * SE * sign(w)``: bit-identical, without a
    shifted copy of G beside G, D and SE."""
    for n in list(noise):
        se = noise.pop(n)
        grad[n].add_(se.mul_(z).mul_(dense[n].sign()))  # (out, in)
        del se


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Why: the per-linear sums (0.2–3.5 MB tensors) come from glibc's heap once its dynamic mmap threshold has risen,
    and glibc keeps their pages after they are freed, while the held-out forwards' logits (≥ 32 MB) are mmapped
    afresh: without a trim the freed G and D stay resident under them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def lm_loss(model: nn.Module, seqs: torch.Tensor, batch_size: int = 4) -> float:
    """Mean over ``seqs`` of each sequence's mean next-token cross-entropy (the held-out selection loss)."""
    device = next(model.parameters()).device
    total = 0.0
    for batch in torch.split(seqs, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float().flatten(0, 1)  # (B·(T-1), V)
        # flatten copies the sliced logits: the model's full (B, T, V) output is freed here, before the log-softmax
        nll = F.cross_entropy(logits, batch[:, 1:].flatten(), reduction="none")
        del logits
        total += float(nll.view(batch.shape[0], -1).mean(1).sum())
    return total / len(seqs)
