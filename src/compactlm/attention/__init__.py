"""Attention: scoped runtime overrides (sparse decode, block-sparse prefill) and reference attention."""

from .runtime import ATTN_NAME, PhaseHandlers, attention_override, register_runtime, sparse_attention

__all__ = ["ATTN_NAME", "PhaseHandlers", "attention_override", "register_runtime", "sparse_attention"]
