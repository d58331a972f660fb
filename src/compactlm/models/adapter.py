"""The architecture adapter: the one place that knows a model family's internals.

Methods reach decoder layers, projections, norms, rotary embeddings and head geometry only through
:class:`Adapter`. A new family is one entry in :data:`FAMILIES` (plus a subclass when its layout
differs, as MoE and Gemma 3 do).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """Static facts about a family's decoder-layer layout (module names relative to a layer)."""

    name: str
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    k_norm: str | None = None  # applied to keys before RoPE (Qwen3, Gemma 3)
    q_norm: str | None = None  # applied to queries before RoPE (Qwen3, Gemma 3)
    input_norm: str = "input_layernorm"  # the norm in front of the attention block
    k_norm_heads_first: bool = False  # k_norm sees (B, H_kv, T, D) (Gemma 3) rather than (B, T, H_kv, D) (Qwen3)
    moe: bool = False
    shared_expert: str | None = None  # an always-on dense expert beside the routed ones (Qwen2-MoE)
    rotary_takes_layer_type: bool = False  # Gemma 3: local and global RoPE per layer type


FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3", k_norm="k_norm", q_norm="q_norm"),
    "gemma3_text": Family("gemma3_text", k_norm="k_norm", q_norm="q_norm", k_norm_heads_first=True,
                          rotary_takes_layer_type=True),
    "mixtral": Family("mixtral", moe=True),
    "qwen2_moe": Family("qwen2_moe", moe=True, shared_expert="shared_expert"),
    "qwen3_moe": Family("qwen3_moe", k_norm="k_norm", q_norm="q_norm", moe=True),
}


class UnfusedExperts(nn.Module):
    """Routed experts as one ``nn.Linear`` triple per expert, numerically the same as the fused 3-D form.

    transformers 5 stores experts as 3-D parameters; per-expert quantization and pruning need ordinary
    linear layers, so the adapter swaps this in (same forward signature, same math).
    """

    def __init__(self, fused: nn.Module):
        super().__init__()
        num_experts, two_inter, hidden = fused.gate_up_proj.shape
        inter = two_inter // 2
        self.num_experts = num_experts
        self.act_fn = fused.act_fn
        self.experts = nn.ModuleList()
        for e in range(num_experts):
            expert = nn.Module()
            expert.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=fused.gate_up_proj.dtype)
            expert.up_proj = nn.Linear(hidden, inter, bias=False, dtype=fused.gate_up_proj.dtype)
            expert.down_proj = nn.Linear(inter, hidden, bias=False, dtype=fused.down_proj.dtype)
            with torch.no_grad():
                expert.gate_proj.weight.copy_(fused.gate_up_proj[e, :inter])
                expert.up_proj.weight.copy_(fused.gate_up_proj[e, inter:])
                expert.down_proj.weight.copy_(fused.down_proj[e])
            self.experts.append(expert)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)  # (tokens, hidden)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            x = hidden_states[token_idx]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


class Adapter:
    """Uniform access to a decoder-only causal LM of a supported family."""

    def __init__(self, model: nn.Module, family: Family):
        self.model = model
        self.family = family
        self.config = model.config
        self.decoder = model.model  # the *Model inside *ForCausalLM

    # --- geometry -----------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}"

    def attention(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.family.attn)

    def mlp(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.family.mlp)

    def layer_type(self, i: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[i] if types else "full_attention"

    # --- projections ----------------------------------------------------------------------------------
    def attention_linears(self, i: int) -> dict[str, nn.Linear]:
        f = self.family
        attn = self.attention(i)
        return {f"{f.attn}.{n}": getattr(attn, n) for n in (f.q, f.k, f.v, f.o)}

    def mlp_linears(self, i: int) -> dict[str, nn.Linear]:
        f = self.family
        mlp = self.mlp(i)
        if not f.moe:
            return {f"{f.mlp}.{n}": getattr(mlp, n) for n in (f.gate, f.up, f.down)}
        experts = self._unfused_experts(i)
        out: dict[str, nn.Linear] = {}
        for e, expert in enumerate(experts.experts):
            for n in (f.gate, f.up, f.down):
                out[f"{f.mlp}.experts.experts.{e}.{n}"] = getattr(expert, n)
        if f.shared_expert:
            shared = getattr(mlp, f.shared_expert)
            for n in (f.gate, f.up, f.down):
                out[f"{f.mlp}.{f.shared_expert}.{n}"] = getattr(shared, n)
        return out

    def linears(self, i: int) -> dict[str, nn.Linear]:
        """Every compressible linear of layer ``i``, keyed by its name relative to the layer."""
        return {**self.attention_linears(i), **self.mlp_linears(i)}

    def named_linears(self) -> dict[str, nn.Linear]:
        """Every compressible linear of every decoder layer, keyed by its full module name."""
        return {f"{self.layer_prefix(i)}.{n}": m for i in range(self.num_layers) for n, m in self.linears(i).items()}

    def sequential_groups(self, i: int) -> list[list[str]]:
        """Linears in ``true_sequential`` order: each group's inputs depend on the groups before it."""
        names = list(self.mlp_linears(i))
        f = self.family
        a = [f"{f.attn}.{n}" for n in (f.q, f.k, f.v)]
        gate_up = [n for n in names if n.endswith((f".{f.gate}", f".{f.up}"))]
        down = [n for n in names if n.endswith(f".{f.down}")]
        return [a, [f"{f.attn}.{f.o}"], gate_up, down]

    def fused_groups(self, i: int) -> list[list[str]]:
        """Linears that serving engines fuse into one matmul (q/k/v; gate/up per expert): share a format."""
        f = self.family
        groups = [[f"{f.attn}.{n}" for n in (f.q, f.k, f.v)]]
        names = list(self.mlp_linears(i))
        prefixes = sorted({n.rsplit(".", 1)[0] for n in names})
        for p in prefixes:
            groups.append([f"{p}.{f.gate}", f"{p}.{f.up}"])
        return groups

    def key_pre_rope_module(self, i: int) -> nn.Module:
        """The module whose output is the pre-RoPE keys (k_norm where the family has one)."""
        attn = self.attention(i)
        return getattr(attn, self.family.k_norm) if self.family.k_norm else getattr(attn, self.family.k)

    def pre_rope_keys(self, i: int, output: torch.Tensor) -> torch.Tensor:
        """Reshape the output of :meth:`key_pre_rope_module` to (B, H_kv, T, D), whatever the family's layout."""
        if output.dim() == 3:  # k_proj output (B, T, H_kv * D)
            b, t, _ = output.shape
            return output.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return output if self.family.k_norm_heads_first else output.transpose(1, 2)

    @torch.no_grad()
    def query_channel_weights(self, i: int) -> torch.Tensor:
        """Expected squared pre-RoPE query per channel, (H_kv, D) fp32, from the weights alone.

        A key error ``e`` changes a score by ``q·e``, so ``E[q_c²]`` is what an error in key channel ``c``
        costs (KVQuant, arXiv 2401.18079, §3.3 weights its key quantizer by the same sensitivity). Without
        data: the normed input is taken as unit-variance and isotropic, so ``E[q_c²] = Σ_j (W_q[c,j]·γ_j)²``;
        where queries are RMS-normed per head (q_norm), the norm's gain sets each channel's scale. Each
        norm's effective gain is read by applying it to ones, which covers ``w`` and ``1 + w`` conventions.
        Averaged over the query heads that share a KV head.
        """
        f, attn = self.family, self.attention(i)
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if f.q_norm:
            norm = getattr(attn, f.q_norm)
            ref = next(norm.parameters(), None)
            ones = torch.ones(1, d, dtype=ref.dtype if ref is not None else torch.float32,
                              device=ref.device if ref is not None else "cpu")
            w = norm(ones).float().reshape(d).pow(2).expand(h, d)
        else:
            q = getattr(attn, f.q)
            weight = q.dequantize_weight() if hasattr(q, "dequantize_weight") else q.weight
            norm = getattr(self.layers[i], f.input_norm)
            gain = norm(torch.ones(1, weight.shape[1], dtype=weight.dtype, device=weight.device)).float().reshape(-1)
            w = (weight.float() * gain).pow(2).sum(-1).view(h, d)
        return w.reshape(hkv, h // hkv, d).mean(1).cpu()

    def _unfused_experts(self, i: int) -> UnfusedExperts:
        mlp = self.mlp(i)
        if not isinstance(mlp.experts, UnfusedExperts):
            mlp.experts = UnfusedExperts(mlp.experts)
        return mlp.experts

    # --- rotary ---------------------------------------------------------------------------------------
    @property
    def rotary_emb(self) -> nn.Module:
        return self.decoder.rotary_emb

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` for ``position_ids`` (B, T) as layer ``i`` uses them."""
        if self.family.rotary_takes_layer_type:
            return self.rotary_emb(x, position_ids, self.layer_type(i))
        return self.rotary_emb(x, position_ids)

    @property
    def apply_rotary(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The family's own ``apply_rotary_pos_emb(q, k, cos, sin)``."""
        return sys.modules[type(self.attention(0)).__module__].apply_rotary_pos_emb

    # --- summary --------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.model.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        nbytes += sum(b.numel() * b.element_size() for b in self.model.buffers())
        return {
            "family": self.family.name,
            "architecture": type(self.model).__name__,
            "parameters": params,
            "bytes": nbytes,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "context_length": self.context_length,
            "vocab_size": self.config.vocab_size,
        }


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; raises :class:`UnsupportedArchitectureError` for unknown families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type or "")
    if family is None or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); compactlm supports decoder-only "
            f"causal LMs of the families: {supported}. Adding one is a new entry in compactlm.models.adapter.FAMILIES"
        )
    return Adapter(model, family)
