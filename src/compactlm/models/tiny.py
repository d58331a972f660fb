"""Tiny random-init causal LMs built in-process, for tests: no network, a few hundred KB each.

Shapes keep the properties methods care about: GQA (4 query heads, 2 KV heads), a head dim of 16,
widths divisible by common group sizes (hidden 64, MLP 128), RoPE, and 2 decoder layers
(3 for families with layer types, so every type appears).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedArchitectureError

_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

TINY_FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gemma3", "qwen2_moe", "mixtral")


def tiny_config(family: str, **overrides: Any):
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise UnsupportedArchitectureError(
            f"no tiny test model for family {family!r}; choose one of {', '.join(TINY_FAMILIES)}"
        )
    kw = dict(_COMMON)
    if family == "mistral":
        kw["sliding_window"] = None
    if family == "gemma3":
        model_type = "gemma3_text"
        kw.update(num_hidden_layers=3, sliding_window=32, layer_types=["sliding_attention", "sliding_attention",
                                                                        "full_attention"], query_pre_attn_scalar=16)
    elif family == "qwen2_moe":
        model_type = "qwen2_moe"
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                  decoder_sparse_step=1)
    elif family == "mixtral":
        model_type = "mixtral"
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    else:
        model_type = family
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any):
    """A deterministic random-init ``*ForCausalLM`` of ``family`` with the tiny shapes above."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # Random init leaves RMSNorm weights at 1 and tiny logits; widen the weight spread a little so that
        # attention is not uniform and errors from compression are visible in tests.
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.data.normal_(0.0, 0.08)
    return model.eval()
