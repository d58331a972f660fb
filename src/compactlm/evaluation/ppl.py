"""Perplexity per PPL-wiki-512 (``../shared/PROTOCOL.md``): exp(mean next-token NLL), fp32 logits."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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

    def to_dict(self) -> dict:
        return asdict(self)


def protocol_name(source: str, seqlen: int, windows: int) -> str:
    base = f"PPL-{source}-{seqlen}" if source in ("wiki", "essays") else f"PPL-file-{seqlen}"
    if source == "wiki" and seqlen == 512:
        if windows == 200:
            return "PPL-wiki-512"
        if windows == 40:
            return "PPL-wiki-512-q"
    return f"{base} (first {windows} windows)"


@torch.no_grad()
def nll_sum(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (nats) over every predicted token of a (B, T) batch, with fp32 logits."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum")
    return float(loss), target.numel()


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
    total, count = 0.0, 0
    batches = list(torch.split(input_ids, batch_size))
    for batch in progress(batches, desc="perplexity", leave=False) if show_progress else batches:
        s, n = nll_sum(model, batch)
        total += s
        count += n
    model.train(was_training)
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=input_ids.size(0), protocol=name)
