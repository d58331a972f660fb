"""Perplexity per PPL-wiki-512 (``../shared/PROTOCOL.md``): exp(mean next-token NLL), fp32 logits."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..data.calib import eval_windows
from ..errors import DataError
from ..utils import progress


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token, nats
    tokens: int  # predicted tokens scored
    windows: int
    protocol: str
    # Mean NLL of each window (nats), in window order: what :func:`paired_ppl_interval` resamples.
    window_nll: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict:
        return {**asdict(self), "window_nll": list(self.window_nll)}


def protocol_name(source: str, seqlen: int, windows: int) -> str:
    base = f"PPL-{source}-{seqlen}" if source in ("wiki", "essays") else f"PPL-file-{seqlen}"
    if source == "wiki" and seqlen == 512:
        if windows == 200:
            return "PPL-wiki-512"
        if windows == 40:
            return "PPL-wiki-512-q"
    return f"{base} (first {windows} windows)"


@torch.no_grad()
def nll_per_window(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (nats, float64) of each row of a (B, T) batch, with fp32 logits."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none")
    return loss.view(target.shape).double().sum(dim=1).cpu()


def nll_sum(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (nats) over every predicted token of a (B, T) batch, with fp32 logits."""
    return float(nll_per_window(model, input_ids).sum()), input_ids[:, 1:].numel()


def paired_ppl_interval(base: list[float] | tuple[float, ...], other: list[float] | tuple[float, ...],
                        resamples: int = 2000, seed: int = 0) -> dict:
    """How much ``other``'s perplexity differs from ``base``'s on the same windows, with a 95 % interval.

    Both are per-window mean NLLs (:attr:`PerplexityResult.window_nll`) of the same windows in the same order
    (equal-length windows, so the mean of the window means is the protocol's NLL). Windows are resampled with
    replacement, paired — the same draw for both, so text that is hard for both models moves both and stays out of
    the interval — and the percent change of PPL is read off each resample. The interval covers the evaluation
    text's sampling noise only, not calibration-to-calibration variation of the method.
    """
    if len(base) != len(other) or len(base) < 2:
        raise DataError(f"paired windows needed: got {len(base)} and {len(other)} window NLLs (same windows, ≥ 2)")
    diffs = [b - a for a, b in zip(base, other, strict=True)]
    n = len(diffs)
    rng = random.Random(seed)
    draws = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    pct = lambda d: 100.0 * (math.exp(d) - 1.0)  # noqa: E731 - PPL ratio from a mean NLL difference
    return {"delta_pct": pct(sum(diffs) / n), "low_pct": pct(draws[int(0.025 * resamples)]),
            "high_pct": pct(draws[int(0.975 * resamples) - 1]), "windows": n,
            "better_share": sum(d < 0 for d in diffs) / n}


def perplexity(
    model,
    tokenizer=None,
    *,
    data: str = "wiki",
    seqlen: int = 512,
    windows: int = 200,
    input_ids: torch.Tensor | None = None,
    batch_size: int = 4,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` windows of ``data`` (or on given (N, T) ``input_ids``)."""
    if input_ids is None:
        if tokenizer is None:
            raise DataError("perplexity needs a tokenizer, or pre-tokenized input_ids")
        input_ids = eval_windows(tokenizer, data, seqlen=seqlen, windows=windows)
        name = protocol_name(data, seqlen, windows)
    else:
        if input_ids.dim() != 2 or input_ids.size(1) < 2:
            raise DataError(f"input_ids must be (windows, tokens ≥ 2), got shape {tuple(input_ids.shape)}")
        name = f"PPL-ids-{input_ids.size(1)} ({input_ids.size(0)} windows)"
    if batch_size < 1:
        raise DataError(f"batch_size must be ≥ 1, got {batch_size}")
    was_training = model.training
    model.eval()
    sums: list[float] = []
    batches = list(torch.split(input_ids, batch_size))
    for batch in progress(batches, desc="perplexity", leave=False) if show_progress else batches:
        sums += nll_per_window(model, batch).tolist()
    model.train(was_training)
    per_window = input_ids.size(1) - 1
    count = per_window * len(sums)
    nll = math.fsum(sums) / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=input_ids.size(0), protocol=name,
                            window_nll=tuple(x / per_window for x in sums))
