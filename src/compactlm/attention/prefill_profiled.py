"""``--attn sparse-prefill-profiled``: block-sparse prefill with the layer profiler's dense-fallback layers.

The issue's "bad layer skip": layers whose chosen blocks capture too little of the true attention mass on
calibration prompts keep dense attention (:mod:`.prefill_profile`, after MInference's offline pattern search,
arXiv 2407.02490, §3.2). This preset runs that profile once per model on the calibration essays (CALIB-pg
offsets, never evaluation text), caches the proposed layers on disk beside the SALS projections, and returns
the base config with them as ``dense_layers``. Its base config also keeps the last 256 prompt tokens dense
(``dense_tail``): the question and the chat template's tail are where retrieval happens, and those were the
queries the block selection starved on RULER-syn at 2K (docs/prefill-sparse.md).

Profile settings: 2 prompts of min(8192, context length) tokens, every 16th query scored, ``min_mass`` 0.9.
On SmolLM2-135M this proposes 11 of 30 layers, ``[0..8, 20, 24]`` (208 s on one CPU thread).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models.adapter import get_adapter
from ..utils import write_json_atomic
from .prefill_sparse import SparsePrefillConfig, config_from_options

BASE = {"dense_tail": 256}
PROMPTS, MAX_LENGTH, QUERY_STRIDE, MIN_MASS = 2, 8192, 16, 0.9


def cache_path(model: torch.nn.Module, cfg: SparsePrefillConfig) -> Path | None:
    """Where a profile of a model loaded from a local folder is cached (None for in-memory models).

    The key covers everything the proposal depends on: the folder, the dtype and the config profiled.
    """
    src = getattr(model.config, "_name_or_path", "") or ""
    if not src or not Path(src).exists():
        return None
    probe = dataclasses.replace(cfg, dense_layers=(), impl="auto").to_json()
    key = hashlib.sha1(f"{Path(src).resolve()}|{model.dtype}|{probe}|{PROMPTS}|{QUERY_STRIDE}|{MIN_MASS}".encode())
    root = Path(os.environ.get("COMPACTLM_CACHE", Path.home() / ".cache" / "compactlm")) / "prefill"
    return root / f"{Path(src).name}-{key.hexdigest()[:16]}.json"


def calibration_prompts(model: torch.nn.Module, tokenizer=None) -> list[torch.Tensor]:
    """PROMPTS prompts of min(8192, context) tokens from the essays, as (1, T) batches."""
    if tokenizer is None:
        src = getattr(model.config, "_name_or_path", "") or ""
        if not src or not Path(src).exists():
            raise ConfigError("sparse-prefill-profiled needs calibration prompts and this model has no local folder "
                              "to take a tokenizer from: pass tokenizer=..., or use --attn sparse-prefill with "
                              "dense_layers=... from compactlm.attention.prefill_profile.profile_layers")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
    from ..data import calibration_set

    length = min(MAX_LENGTH, get_adapter(model).context_length)
    ids = calibration_set(tokenizer, "essays", PROMPTS, length, seed=0)
    return [ids[i:i + 1] for i in range(ids.shape[0])]


def profiled_config(model: torch.nn.Module, cfg: SparsePrefillConfig | None = None, tokenizer=None,
                    batches: list[torch.Tensor] | None = None) -> SparsePrefillConfig:
    """``cfg`` (default: this preset's base) plus the profiler's dense layers for ``model``: cached, else profiled.

    ``batches`` overrides the calibration prompts (tests); a profile of other prompts is not cached.
    """
    cfg = SparsePrefillConfig(**BASE) if cfg is None else cfg
    path = cache_path(model, cfg) if batches is None else None
    if path is not None and path.is_file():
        from .prefill_profile import with_dense_layers  # lazily: see the import below

        return with_dense_layers(cfg, json.loads(path.read_text())["proposed"])
    # Imported here: prefill_sparse imports this module to register the preset, and prefill_profile imports
    # prefill_sparse, so a module-level import would be circular when prefill_profile is imported first.
    from .prefill_profile import profile_layers

    prompts = calibration_prompts(model, tokenizer) if batches is None else batches
    prof = profile_layers(model, prompts, cfg, min_mass=MIN_MASS, query_stride=QUERY_STRIDE)
    if path is not None:  # atomic: a concurrent reader sees the whole file or none
        write_json_atomic(path, {**prof.to_dict(), "config": cfg.to_dict(), "query_stride": QUERY_STRIDE,
                                 "prompts": f"{len(prompts)} x {prompts[0].shape[1]} essay tokens, seed 0"})
    return prof.with_fallback(cfg)


def _register_method() -> None:
    from ..evaluation.methods import RuntimeMethod, register_method
    from .runtime import sparse_attention

    @register_method("attn:sparse-prefill-profiled")
    def build(model, options: dict) -> RuntimeMethod:
        options = dict(options)
        tokenizer = options.pop("tokenizer", None)
        cfg = profiled_config(model, config_from_options({**BASE, **options}), tokenizer)

        def make_cache(model, prefill_cache):
            from transformers import DynamicCache

            return DynamicCache(config=model.config)

        return RuntimeMethod("sparse-prefill-profiled", attach=lambda m: sparse_attention(m, cfg),
                             make_cache=make_cache, shares_prefill=False,
                             description=f"block-sparse prefill, profiled dense layers {cfg.to_json()}")


_register_method()
