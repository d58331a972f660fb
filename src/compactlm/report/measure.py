"""What ``compactlm compress`` measures for its report, each figure beside the uncompressed model's.

- quality: PPL-wiki-512 (``ppl_windows`` windows; 40 = PPL-wiki-512-q) of the base and compressed weights
  (a 512-token full forward: the decode-time KV/attention steps do not act there, see RULER-syn);
- RULER-syn at the recipe's lengths: base model (full attention, full cache), compressed weights with a full
  cache, and compressed weights with the recipe's KV cache and attention (the whole recipe), on copies of
  both models cast to ``ruler_dtype`` (bf16 by default);
- memory: weight bytes (parameters + buffers, packed codes and scales included) and KV-cache bytes per token
  after a ``speed_prefill``-token prefill of the wiki text;
- speed: prefill tokens/s and greedy decode tokens/s (``speed_decode`` tokens), one run each, same process,
  on copies of both models cast to ``speed_dtype`` (bf16 by default);
- the precision inspector's top offenders (``inspect_samples`` > 0).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..evaluation.methods import FULL, RuntimeMethod


def _inspector_row(op: dict[str, Any]) -> dict[str, Any]:
    """One offender: its name and the error metrics (SQNR, KL, noise-to-signal, cosine) of each measurement."""
    row: dict[str, Any] = {"name": op.get("name"), "rank": op.get("rank")}
    for key, value in op.items():
        if isinstance(value, dict):
            for metric, x in value.items():
                if isinstance(x, int | float) and any(t in metric for t in ("sqnr", "kl", "nsr", "cos")):
                    row[f"{key}.{metric}"] = x
    return row


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "rotary" not in n]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def memory_and_speed(model: nn.Module, method: RuntimeMethod, ids: torch.Tensor, decode_tokens: int
                     ) -> dict[str, Any]:
    """Prefill ``ids`` (1, T) and decode greedily under ``method``: KV bytes/token, prefill and decode tok/s."""
    from ..evaluation.generate import eval_mode, greedy_decode, prefill
    from ..recipes.runtime import cache_bytes

    head, last = ids[:, :-1], int(ids[0, -1])
    with eval_mode(model), method.attach(model):
        start = time.perf_counter()
        if method.shares_prefill:
            shared, _ = prefill(model, head)
            prefill_s = time.perf_counter() - start
            cache = method.make_cache(model, shared)
        else:
            cache, _ = prefill(model, head, method.make_cache(model, None))
            prefill_s = time.perf_counter() - start
        kv = cache_bytes(cache)
        start = time.perf_counter()
        out = greedy_decode(model, cache, last, decode_tokens)
        decode_s = time.perf_counter() - start
    return {"kv_bytes_per_token": kv / head.shape[1], "prefill_tokens": int(head.shape[1]),
            "prefill_tok_s": head.shape[1] / prefill_s, "decode_tokens": len(out),
            "decode_tok_s": len(out) / decode_s if decode_s > 0 else None}


def measure(model_spec: str, dtype: str, model: nn.Module, tokenizer: Any, recipe: Any,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """All figures of the report for the compressed ``model`` and a fresh load of ``model_spec``."""
    from ..data import eval_windows
    from ..evaluation import perplexity
    from ..evaluation.ppl import protocol_name
    from ..models import load
    from ..recipes.runtime import recipe_method

    ev = recipe.evaluate
    base, _ = load(model_spec, dtype=dtype)
    method = recipe_method(model, recipe, name=recipe.name)
    out: dict[str, Any] = {"method": method.name, "method_description": method.description,
                           "torch_threads": torch.get_num_threads()}
    out["weights_MiB"] = {"base": weight_bytes(base) / 2**20, "compressed": weight_bytes(model) / 2**20}
    if ev.ppl_windows and tokenizer is not None:
        log(f"evaluating {protocol_name('wiki', 512, ev.ppl_windows)}: base, then compressed")
        b = perplexity(base, tokenizer, windows=ev.ppl_windows)
        c = perplexity(model, tokenizer, windows=ev.ppl_windows)
        out["ppl"] = {"protocol": b.protocol, "tokens": b.tokens, "base": b.ppl, "compressed": c.ppl}
    if ev.inspect_samples and tokenizer is not None:
        from ..inspector import InspectConfig, inspect

        log(f"precision inspector on {ev.inspect_samples} sequences")
        batches = eval_windows(tokenizer, "wiki", 512, ev.inspect_samples)
        rep = inspect(base, model, batches, InspectConfig(impact=False, attention_probs=False))
        out["inspector"] = [_inspector_row(op) for op in rep.top(10)]
    # RULER-syn and speed run last, on copies cast to their dtypes (the quality figures above are in `dtype`;
    # the compressed model itself stays as it is: it is saved next). One cast pair is shared when the dtypes agree.
    from ..utils import parse_dtype

    casts: dict[str, tuple[nn.Module, nn.Module, RuntimeMethod]] = {}

    def cast_pair(name: str) -> tuple[nn.Module, nn.Module, RuntimeMethod]:
        if name not in casts:
            casts.clear()  # at most one pair alive at a time
            dt = parse_dtype(name)
            b = copy.deepcopy(base).to(dt)
            c = copy.deepcopy(model).to(dt)
            casts[name] = (b, c, recipe_method(c, recipe, name=recipe.name))
        return casts[name]

    if ev.ruler_lengths and ev.ruler_samples and tokenizer is not None:
        from ..evaluation.ruler import run_ruler

        log(f"RULER-syn ({ev.ruler_dtype}) lengths {list(ev.ruler_lengths)}, {ev.ruler_samples} samples x "
            f"{list(ev.ruler_tasks)}")
        rbase, rmodel, rmethod = cast_pair(ev.ruler_dtype)
        rb = run_ruler(rbase, tokenizer, [], lengths=list(ev.ruler_lengths), samples=ev.ruler_samples,
                       tasks=ev.ruler_tasks)
        rc = run_ruler(rmodel, tokenizer, [] if method is FULL else [rmethod], lengths=list(ev.ruler_lengths),
                       samples=ev.ruler_samples, tasks=ev.ruler_tasks)
        rows = {"base": rb.methods["full"], "weights_only": rc.methods["full"]}
        if method is not FULL:
            rows["compressed"] = rc.methods[rmethod.name]
        out["ruler"] = {"protocol": rb.protocol, "lengths": list(ev.ruler_lengths), "dtype": ev.ruler_dtype,
                        "methods": {k: {"score": v["score"], "by_length": {n: d["score"] for n, d in
                                                                           v["by_length"].items()}}
                                    for k, v in rows.items()}}
    if ev.speed and tokenizer is not None:
        log(f"memory and speed ({ev.speed_dtype}): {ev.speed_prefill}-token prefill, {ev.speed_decode} greedy decode "
            "tokens")
        ids = eval_windows(tokenizer, "wiki", ev.speed_prefill + 1, 1)[:1]
        sbase, fast, fast_method = cast_pair(ev.speed_dtype)
        out["speed"] = {"dtype": ev.speed_dtype,
                        "base": memory_and_speed(sbase, FULL, ids, ev.speed_decode),
                        "weights_only": memory_and_speed(fast, FULL, ids, ev.speed_decode),
                        "compressed": memory_and_speed(fast, fast_method, ids, ev.speed_decode),
                        "note": f"one run each, {ev.speed_dtype}, in this process"}
    return out
