"""PPL-decode: perplexity of the tokens a cache/attention method produces through its decode path.

Per ``../shared/PROTOCOL.md`` (PPL-decode): the PPL-wiki text in non-overlapping 4,096-token windows
(first 20; quick variant ``PPL-decode-q``: 5). Per window, prefill the first 3,840 tokens through the
method (decode-only methods share one full-attention prefill and convert a copy with ``make_cache``),
then feed the remaining tokens one at a time, teacher-forced. The last 256 tokens are scored: the
first of them by the prefill's last logits, the other 255 by decode steps. Full attention with a
full-precision cache is always scored beside the methods, in the same run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..utils import progress
from .generate import decode_step, eval_mode, prefill
from .methods import FULL, RuntimeMethod


@dataclass
class PPLDecodeResult:
    protocol: str
    windows: int
    window_len: int
    decoded: int  # scored tokens per window
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"ppl", "nll", "tokens", ...}
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "windows": self.windows, "window_len": self.window_len,
                "decoded": self.decoded, "methods": self.methods, "seconds": self.seconds}


def protocol_name(windows: int, window_len: int, decoded: int) -> str:
    if window_len == 4096 and decoded == 256:
        if windows == 20:
            return "PPL-decode"
        if windows == 5:
            return "PPL-decode-q"
    return f"PPL-decode-custom ({windows} windows of {window_len}, last {decoded} decoded)"


@torch.no_grad()
def _score_window(model: nn.Module, method: RuntimeMethod, window: torch.Tensor, prefix: int,
                  shared: Any) -> tuple[float, int, float]:
    """(summed NLL, tokens, decode seconds) of ``window[prefix:]`` under ``method``."""
    ids = window.unsqueeze(0)  # (1, T)
    with method.attach(model):
        if method.shares_prefill:
            cache = method.make_cache(model, shared[0])
            logits = shared[1]
        else:
            cache, logits = prefill(model, ids[:, :prefix], method.make_cache(model, None))
        device = logits.device
        nll = F.cross_entropy(logits, ids[:, prefix].to(device), reduction="sum").item()
        start = time.perf_counter()
        for t in range(prefix, ids.size(1) - 1):
            cache, logits = decode_step(model, ids[:, t: t + 1], cache)
            nll += F.cross_entropy(logits, ids[:, t + 1].to(device), reduction="sum").item()
        seconds = time.perf_counter() - start
    return nll, ids.size(1) - prefix, seconds


def run_ppl_decode(model: nn.Module, tokenizer=None, methods: list[RuntimeMethod] | None = None, *,
                   windows: int = 5, window_len: int = 4096, decoded: int = 256, data: str = "wiki",
                   input_ids: torch.Tensor | None = None) -> PPLDecodeResult:
    """PPL-decode for ``methods`` with the full-precision, full-attention figure beside them.

    ``input_ids`` (N, T) replaces the protocol text (tests use it with tiny models).
    """
    if input_ids is None:
        if tokenizer is None:
            raise DataError("PPL-decode needs a tokenizer, or pre-tokenized input_ids")
        from ..data.calib import eval_windows

        input_ids = eval_windows(tokenizer, data, seqlen=window_len, windows=windows)
        name = protocol_name(windows, window_len, decoded) if data == "wiki" else f"PPL-decode-{data}"
    else:
        if input_ids.dim() != 2:
            raise DataError(f"input_ids must be (windows, tokens), got shape {tuple(input_ids.shape)}")
        name = f"PPL-decode-ids ({input_ids.size(0)} windows of {input_ids.size(1)})"
    if not 1 <= decoded < input_ids.size(1):
        raise ConfigError(f"decoded={decoded} must be between 1 and the window length - 1 ({input_ids.size(1) - 1})")
    prefix = input_ids.size(1) - decoded  # BOS, where the tokenizer adds one, lengthens the prefix only
    methods = [FULL] + [m for m in (methods or []) if m is not FULL]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"two methods share a name in {names}; give each a distinct name")
    totals = {n: [0.0, 0, 0.0] for n in names}
    start = time.perf_counter()
    with eval_mode(model):
        for window in progress(list(input_ids), desc="PPL-decode"):
            shared = prefill(model, window[None, :prefix]) if any(m.shares_prefill for m in methods) else None
            for m in methods:
                nll, n, secs = _score_window(model, m, window, prefix, shared)
                acc = totals[m.name]
                acc[0] += nll
                acc[1] += n
                acc[2] += secs
    result = PPLDecodeResult(name, input_ids.size(0), input_ids.size(1), decoded,
                             seconds=time.perf_counter() - start)
    for m in methods:
        nll, n, secs = totals[m.name]
        steps = max(1, (decoded - 1) * input_ids.size(0))
        result.methods[m.name] = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n,
                                  "decode_tok_per_s": steps / secs if secs > 0 else float("nan"),
                                  "description": m.description}
    return result
