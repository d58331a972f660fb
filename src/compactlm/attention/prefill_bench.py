"""End-to-end prefill of a real model, dense vs block-sparse, in one run: time and next-token NLL.

One forward pass per window and method gives both figures: the prefill time (the forward with
``logits_to_keep=1``, as generation runs it) and the perplexity of the window (the final-norm output,
captured with a hook, scored in chunks through the LM head so the (T, vocab) logits never exist at once).
Used by ``benchmarks/prefill_model.py`` and the demo step ``prefill``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.block_prefill import block_attention
from ..models.adapter import get_adapter
from .prefill_sparse import SparsePrefillConfig, select_blocks
from .runtime import sparse_attention


@torch.no_grad()
def timed_prefill_nll(model, ids: torch.Tensor, chunk: int = 1024) -> tuple[float, int, float]:
    """(summed next-token NLL in nats, tokens scored, prefill seconds) for one (1, T) window."""
    adapter = get_adapter(model)
    captured = {}
    hook = adapter.final_norm.register_forward_hook(lambda mod, args, out: captured.__setitem__("h", out))
    try:
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    hidden = captured["h"][0]  # (T, hidden)
    total = 0.0
    for i in range(0, ids.shape[1] - 1, chunk):
        j = min(i + chunk, ids.shape[1] - 1)
        logits = adapter.lm_head(hidden[i:j]).float()
        total += float(F.cross_entropy(logits, ids[0, i + 1:j + 1], reduction="sum"))
    return total, ids.shape[1] - 1, seconds


@torch.no_grad()
def warm_up(model, cfg: SparsePrefillConfig, length: int) -> float:
    """Compile the kernel for the model's attention shape at ``length`` (FlexAttention compiles per shape)."""
    adapter = get_adapter(model)
    param = next(model.parameters())
    q = torch.randn(1, adapter.num_heads, length, adapter.head_dim, dtype=param.dtype, device=param.device)
    k = torch.randn(1, adapter.num_kv_heads, length, adapter.head_dim, dtype=param.dtype, device=param.device)
    start = time.perf_counter()
    block_attention(q, k, k, select_blocks(q, k, cfg), impl=cfg.impl)
    return time.perf_counter() - start


def compare_prefill(model, windows: torch.Tensor, cfg: SparsePrefillConfig, log=print) -> dict[str, Any]:
    """Dense then sparse on each (1, T) row of ``windows``, side by side; returns per-window rows and totals."""
    compile_s = warm_up(model, cfg, windows.shape[1])
    rows = []
    totals = {"dense": [0.0, 0, 0.0], "sparse": [0.0, 0, 0.0]}
    stats = None
    for w in range(windows.shape[0]):
        ids = windows[w:w + 1]
        dense = timed_prefill_nll(model, ids)
        with sparse_attention(model, cfg) as built:
            sparse = timed_prefill_nll(model, ids)
        stats = built[0].state
        for name, res in (("dense", dense), ("sparse", sparse)):
            totals[name] = [a + b for a, b in zip(totals[name], res, strict=True)]
        rows.append({"window": w, "tokens": dense[1], "dense_s": dense[2], "sparse_s": sparse[2],
                     "speedup": dense[2] / sparse[2], "dense_nll": dense[0] / dense[1],
                     "sparse_nll": sparse[0] / sparse[1], **{f"sparse_{k}": v for k, v in stats.summary().items()}})
        log(f"window {w}: dense {dense[2]:.1f} s, sparse {sparse[2]:.1f} s ({dense[2] / sparse[2]:.2f}x), "
            f"NLL {dense[0] / dense[1]:.4f} -> {sparse[0] / sparse[1]:.4f}, "
            f"block fraction {stats.block_fraction():.3f}")
    ppl = {name: math.exp(t[0] / t[1]) for name, t in totals.items()}
    return {"config": cfg.to_dict(), "length": windows.shape[1], "windows": windows.shape[0],
            "tokens_scored": totals["dense"][1], "dense_ppl": ppl["dense"], "sparse_ppl": ppl["sparse"],
            "ppl_change": ppl["sparse"] / ppl["dense"] - 1.0, "dense_s": totals["dense"][2],
            "sparse_s": totals["sparse"][2], "speedup": totals["dense"][2] / totals["sparse"][2],
            "compile_s": compile_s, "rows": rows}


def step_prefill(ctx) -> list[dict[str, Any]]:
    """Demo step: one 8K window of the wiki text, bf16, dense vs block-sparse prefill (time and NLL)."""
    from ..data import eval_windows

    model, tok = ctx.load(dtype="bf16")
    length = min(8192, get_adapter(model).context_length)
    cfg = SparsePrefillConfig()
    res = compare_prefill(model, eval_windows(tok, "wiki", length, 1), cfg)
    return [{"step": "prefill", "method": "dense prefill (bf16)", "prefill_s": res["dense_s"],
             "ppl_wiki_8k_1w": res["dense_ppl"], "seconds": res["dense_s"]},
            {"step": "prefill", "method": f"sparse-prefill keep {cfg.keep_ratio:g} ({cfg.score})",
             "prefill_s": res["sparse_s"], "speedup": res["speedup"], "ppl_wiki_8k_1w": res["sparse_ppl"],
             "block_fraction": res["rows"][0]["sparse_block_fraction"], "seconds": res["sparse_s"] + res["compile_s"]}]
