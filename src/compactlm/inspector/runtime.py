"""Runtime candidates: a quantized KV cache or sparse prefill attention, seen by one forward pass.

A runtime method changes how attention is computed, not the weights, so ``inspect(ref, cand, batches,
candidate_runtime=...)`` runs the candidate's forward with it attached through the named ``compactlm``
attention function (:func:`compactlm.attention.runtime.attention_override`):

- **KV-cache quantization** (:class:`~compactlm.kv.config.KVQuant`, or ``PerLayer`` of them keyed by the
  attention module path): a forward pass with a real quantized cache attends to exact keys (KIVI's
  prefill, arXiv 2402.02750, Alg. 1), so it would show nothing. Instead each query attends to the keys and
  values *as the cache would hold them when that token is decoded*: the first ``sinks`` tokens exact, then
  every whole group of ``group_size`` tokens up to the full-precision recent window (``residual`` to
  ``residual + group_size − 1`` tokens) quantized with KIVI's grouping (keys per channel over token groups,
  values per token over channel groups: :func:`compactlm.kv.quantizer.quantize_groups`, §3.2), the
  window exact. The store a query at position ``p`` reads depends only on ``p + 1`` (flushes are whole
  groups from the first non-sink token), so one forward equals teacher-forced decoding of the whole
  sequence through :class:`~compactlm.kv.cache.QuantizedKVCache` (tested). ``pre_rope`` keys are
  un-rotated before quantization and re-rotated after, as the cache does (KVQuant, arXiv 2401.18079, §3.2).
- **Prefill sparse attention** (a runtime attention config with prefill handlers, e.g.
  :class:`~compactlm.attention.prefill_sparse.SparsePrefillConfig`): its handlers run in the forward.
- **Decode-only methods** (SALS, Quest, StreamingLLM, oracle top-k: any ``DecodeBudget`` config, or a
  ``RuntimeMethod`` with ``shares_prefill``) change nothing in a forward pass over a prompt; they are
  refused with a :class:`ConfigError` that says so, rather than reported as error-free.

While the reference runs eager attention (to capture probabilities), layers and dense fall-backs of the
candidate run the same eager function on the same additive mask, so an untouched layer is bit-identical
to the reference (its isolated error is exactly zero, not SDPA-vs-eager rounding).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attention.runtime import Handler, attention_override
from ..config import BaseConfig, PerLayer
from ..errors import ConfigError
from ..kv.cache import _rope_for
from ..kv.config import KVQuant
from ..kv.key_bits import MixedKeyStore, channel_bits
from ..kv.quantizer import META_DTYPES, dequantize_groups, hadamard, quantize_groups
from ..models.adapter import get_adapter

# --- the math: tensors in, tensors out ---------------------------------------------------------------------

def store_mask(q_pos: torch.Tensor, kv_len: int, cfg: KVQuant) -> torch.Tensor:
    """(Tq, Tk) bool: key ``j`` is read from the quantized store by the query at position ``q_pos[t]``.

    When the query at position ``p`` is decoded the cache holds ``n = p + 1`` tokens: ``sinks`` exact, then
    ``Q(n) = max(0, ⌊(n − sinks − residual) / group_size⌋) · group_size`` quantized, the rest exact.
    """
    n = q_pos.to(torch.long) + 1  # (Tq,)
    quantized = torch.clamp(n - cfg.sinks - cfg.residual, min=0) // cfg.group_size * cfg.group_size
    j = torch.arange(kv_len, device=q_pos.device)
    return (j[None, :] >= cfg.sinks) & (j[None, :] < cfg.sinks + quantized[:, None])


def simulate_store(key: torch.Tensor, value: torch.Tensor, cfg: KVQuant,
                   rope: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor] | None = None,
                   query_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values (B, H_kv, T, D) with every whole group after the sinks quantized and dequantized.

    Groups are those of the cache's store (``group_size`` tokens from the first non-sink token); the
    tail that fills no whole group is returned exact (no query ever reads it from the store). Every storage
    option of :class:`KVQuant` is reproduced (tested against the cache): metadata formats, ``clip_search``
    range fits, pre-RoPE keys, value rotation, per-channel key bits (``query_weights`` (H_kv, D), as the cache
    gets them from the adapter), and the 1-byte format's per-row base and the key bit widths as a cache fixes
    them at the first flush of a sequence prefilled at once.
    """
    b, _, t, d = key.shape
    s = min(cfg.sinks, t)
    n = (t - s) // cfg.group_size * cfg.group_size
    if n == 0:
        return key, value
    meta = META_DTYPES[cfg.meta_dtype]
    k = key[..., s:s + n, :]
    pos = torch.arange(s, s + n, device=key.device, dtype=torch.int32)[None].expand(b, n)  # (B, n)
    if cfg.pre_rope:
        k = rope(k, pos, True)  # the cache quantizes un-rotated keys
    # The 1-byte format codes every group against a per-row base the cache fixes at its first flush: for a
    # sequence prefilled at once, the whole groups that leave the recent window then (all of them if none do).
    first = (t - s - cfg.residual) // cfg.group_size * cfg.group_size
    first = first if first > 0 else n

    def store(x: torch.Tensor, bits: int, group: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        base = None
        if cfg.meta_dtype == "int4":
            base = quantize_groups(x[..., :first, :], bits, group, dim, meta, clip_search=cfg.clip_search)[2]
        parts = quantize_groups(x, bits, group, dim, meta, clip_search=cfg.clip_search, base=base)
        return dequantize_groups(*parts, group, dim, dtype)

    if cfg.key_allocation == "importance":
        if query_weights is None:
            raise ValueError("key_allocation='importance' needs the layer's query weights")
        g = cfg.group_size
        bits = channel_bits(query_weights, k[..., :first, :], g, cfg.k_bits)
        first_flush = MixedKeyStore.quantize(k[..., :first, :], bits, g, meta, clip_search=cfg.clip_search)
        kq = MixedKeyStore.quantize(k, None, g, meta, clip_search=cfg.clip_search, like=first_flush).dequantize(
            key.dtype)
    else:
        kq = store(k, cfg.k_bits, cfg.group_size, -2, key.dtype)
    if cfg.pre_rope:
        kq = rope(kq, pos, False)
    vg = cfg.value_group(d)
    v = value[..., s:s + n, :]
    if cfg.value_rotation:  # as the cache stores it: quantize v·H, read back dequant(v·H)·H (H symmetric orthonormal)
        h = hadamard(d, value.device)
        v = v.float() @ h
    vq = store(v, cfg.v_bits, vg, -1, torch.float32 if cfg.value_rotation else value.dtype)
    if cfg.value_rotation:
        vq = (vq @ h).to(value.dtype)
    k_out = torch.cat([key[..., :s, :], kq, key[..., s + n:, :]], -2)
    v_out = torch.cat([value[..., :s, :], vq, value[..., s + n:, :]], -2)
    return k_out, v_out


def allowed_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool (B|1, 1|H, Tq, Tk) of the keys each query may see, from an SDPA (bool/None) or eager (additive) mask."""
    if attention_mask is None:  # SDPA's plain causal case; queries are the last q_len positions
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :kv_len]
    return attention_mask[..., :kv_len] > torch.finfo(attention_mask.dtype).min / 2


def kv_store_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                       scaling: float, cfg: KVQuant, rope=None, softcap: float | None = None,
                       query_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` (B, H, Tq, D) over the KV cache as ``cfg``'s store holds it at each query's step.

    ``key``/``value`` (B, H_kv, Tk, D) exact; ``allowed`` bool mask broadcastable to (B, H, Tq, Tk).
    Returns ``(out (B, Tq, H, D), probs (B, H, Tq, Tk))``, computed as eager attention does (matmuls in the
    input dtype, softmax in fp32).
    """
    tq, tk = query.shape[-2], key.shape[-2]
    groups = query.shape[1] // key.shape[1]
    k_deq, v_deq = simulate_store(key, value, cfg, rope, query_weights)
    rep = (lambda x: x.repeat_interleave(groups, dim=1)) if groups > 1 else (lambda x: x)  # noqa: E731
    use_store = store_mask(torch.arange(tk - tq, tk, device=query.device), tk, cfg)  # (Tq, Tk)
    scores = torch.where(use_store, query @ rep(k_deq).transpose(-1, -2), query @ rep(key).transpose(-1, -2))
    scores = scores * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, H, Tq, Tk)
    out = probs.masked_fill(~use_store, 0) @ rep(v_deq) + probs.masked_fill(use_store, 0) @ rep(value)
    return out.transpose(1, 2).contiguous(), probs


# --- handlers --------------------------------------------------------------------------------------------

def kv_store_handler(cfg: KVQuant, rope=None, query_weights: torch.Tensor | None = None) -> Handler:
    """An attention handler that attends over ``cfg``'s simulated store (see :func:`kv_store_attention`)."""
    def handler(module, query, key, value, attention_mask, scaling, fallback, **kwargs):
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        allowed = allowed_mask(attention_mask, query.shape[-2], key.shape[-2], query.device)
        return kv_store_attention(query, key, value, allowed, scaling, cfg, rope, kwargs.get("softcap"),
                                  query_weights)

    return handler


def eager_exact(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The family's eager attention on the additive mask eager mode builds (0 / dtype min), from any mask format.

    The same function on the same mask values as a reference running eager attention, so the output is
    bit-identical to it (and the probabilities are returned).
    """
    allowed = allowed_mask(attention_mask, query.shape[-2], key.shape[-2], query.device)
    mask = torch.where(allowed, torch.zeros((), dtype=query.dtype, device=query.device),
                       torch.finfo(query.dtype).min)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _with_fallback(handler: Handler, fallback) -> Handler:
    def wrapped(module, query, key, value, attention_mask, scaling, _original, **kwargs):
        return handler(module, query, key, value, attention_mask, scaling, fallback, **kwargs)

    return wrapped


def _exact_handler(module, query, key, value, attention_mask, scaling, fallback, **kwargs):
    return eager_exact(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


# --- resolving what the user passed ------------------------------------------------------------------------

@dataclass
class CandidateRuntime:
    """A resolved runtime candidate: per-layer handlers (or an opaque ``attach``) and what they are."""

    handlers: dict[int, Handler] = field(default_factory=dict)
    attach: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None
    decode: Any = None  # a decode-only budget config (SALS, Quest, ...): inspected on the decode path
    description: list[dict[str, Any]] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def opaque(self) -> bool:
        return self.attach is not None

    def context(self, model: nn.Module, eager: bool, layers: Sequence[int] | None = None):
        """The scope that runs ``model`` as the candidate (``layers``: only those handlers, for impact swaps).

        ``eager``: the reference runs eager attention, so every other layer and every dense fall-back runs
        :func:`eager_exact` (bit-identical to it); otherwise they run the model's own attention.
        """
        if self.attach is not None:
            return self.attach(model)
        chosen = {i: h for i, h in self.handlers.items() if layers is None or i in layers}
        eager = eager or model.config._attn_implementation == "eager"  # eager needs its additive mask
        if eager:
            chosen = {i: _with_fallback(h, eager_exact) for i, h in chosen.items()}
            chosen = {i: chosen.get(i, _exact_handler) for i in range(get_adapter(model).num_layers)}
        return attention_override(model, chosen)

    def close(self) -> None:
        for fn in self.closers:
            fn()


def _is_decode_only(cfg: Any) -> bool:
    from ..attention.decode_common import DecodeBudget

    return isinstance(cfg, DecodeBudget)


DECODE_ONLY = ("is decode-only: it changes attention only when one new token attends to the cache, and a forward "
                "pass over a prompt never does that, so a forward-mode inspection would report it as error-free. "
                "Pass its config (SALSConfig, QuestConfig, StreamingConfig, OracleConfig) with "
                "InspectConfig(decode_tokens=N) (CLI: --attn NAME --decode-tokens N) to inspect it on a teacher-forced "
                "decode pass over the last N tokens of each sequence")


def _kv_handlers(model: nn.Module, cfg: KVQuant | PerLayer) -> tuple[dict[int, Handler], list[dict[str, Any]]]:
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    handlers, described = {}, {}
    for i in range(adapter.num_layers):
        path = names[id(adapter.attention(i))]
        layer_cfg = cfg.config_for(path) if isinstance(cfg, PerLayer) else cfg
        if layer_cfg is None:
            continue
        if not isinstance(layer_cfg, KVQuant):
            raise ConfigError(f"PerLayer entry for {path} is a {type(layer_cfg).__name__}; a KV candidate takes "
                              "KVQuant configs keyed by attention module path")
        layer_cfg.check_model(adapter.head_dim)
        rope = _rope_for(adapter, i) if layer_cfg.pre_rope else None
        weights = adapter.query_channel_weights(i) if layer_cfg.key_allocation == "importance" else None
        handlers[i] = kv_store_handler(layer_cfg, rope, weights)
        described.setdefault(layer_cfg.to_json(), []).append(i)
    if not handlers:
        raise ConfigError("the KV PerLayer config matches no attention module (keys are attention module paths "
                          "such as 'model.layers.3.self_attn', 're:' regexes or '_default')")
    return handlers, [{"kind": "kv-store", "layers": ls, "config": BaseConfig.from_json(j).to_dict()}
                      for j, ls in described.items()]


def _resolve_one(model: nn.Module, item: Any) -> CandidateRuntime:
    from ..attention.runtime import RUNTIME_BUILDERS
    from ..evaluation.methods import RuntimeMethod

    if isinstance(item, KVQuant) or (isinstance(item, PerLayer) and any(
            isinstance(c, KVQuant) for c in item.configs.values())):
        handlers, desc = _kv_handlers(model, item)
        return CandidateRuntime(handlers=handlers, description=desc)
    if isinstance(item, RuntimeMethod):
        if item.shares_prefill:
            if item.name.startswith("kv"):
                raise ConfigError(f"runtime method {item.name!r} is a quantized KV cache, which a forward pass through "
                                  "the cache does not exercise (its prefill attends to exact keys); pass its KVQuant "
                                  "config instead (CLI: --kv int4): the inspector simulates the cache's store in the "
                                  "forward pass")
            raise ConfigError(f"runtime method {item.name!r} {DECODE_ONLY}")
        return CandidateRuntime(attach=item.attach, description=[{"kind": "method", "name": item.name,
                                                                  "description": item.description}])
    if _is_decode_only(item):
        layers = item.sparse_layers(get_adapter(model).num_layers)
        return CandidateRuntime(decode=item, description=[{"kind": "decode", "layers": layers,
                                                           "config": item.to_dict()}])
    builder = RUNTIME_BUILDERS.get(type(item))
    if builder is None:
        raise ConfigError(f"candidate_runtime got a {type(item).__name__}; pass a KVQuant (or PerLayer of KVQuant), "
                          "a runtime attention config such as SparsePrefillConfig, or a prefill RuntimeMethod")
    phases = builder(model, item)
    closers = [phases.close] if phases.close else []
    if not phases.prefill:
        for fn in closers:
            fn()
        raise ConfigError(f"{type(item).__name__} {DECODE_ONLY}")
    return CandidateRuntime(handlers=dict(phases.prefill), closers=closers,
                            description=[{"kind": "attention", "layers": sorted(phases.prefill),
                                          "config": item.to_dict()}])


def resolve_runtime(model: nn.Module, runtime: Any) -> CandidateRuntime:
    """Resolve ``candidate_runtime`` (one item or a list of them) against the candidate ``model``.

    Items: ``KVQuant`` / ``PerLayer`` of KVQuant, a registered runtime attention config with prefill
    handlers, or a prefill ``RuntimeMethod`` (opaque: no per-layer impact). Items must claim disjoint layers.
    """
    items = list(runtime) if isinstance(runtime, list | tuple) else [runtime]
    if not items:
        raise ConfigError("candidate_runtime is an empty list; pass a KVQuant or an attention config")
    resolved = []
    try:
        for item in items:
            resolved.append(_resolve_one(model, item))
        if len(resolved) == 1:
            return resolved[0]
        if any(r.opaque for r in resolved):
            raise ConfigError("a RuntimeMethod cannot be combined with other runtime items; pass configs instead")
        if any(r.decode is not None for r in resolved):
            raise ConfigError("a decode-only attention config is inspected on the decode path alone; it cannot be "
                              "combined with other runtime items")
        out = CandidateRuntime()
        for r in resolved:
            clash = set(out.handlers) & set(r.handlers)
            if clash:
                raise ConfigError(f"two runtime items both change attention in layers {sorted(clash)}; give each "
                                  "layer to one (e.g. PerLayer KV configs with None for the sparse layers)")
            out.handlers.update(r.handlers)
            out.description += r.description
            out.closers += r.closers
        return out
    except Exception:
        for r in resolved:
            r.close()
        raise


@contextlib.contextmanager
def runtime_scope(model: nn.Module, runtime: Any) -> Iterator[CandidateRuntime]:
    """Resolve ``runtime`` for ``model`` and release what its builders hold when the scope ends."""
    resolved = resolve_runtime(model, runtime)
    try:
        yield resolved
    finally:
        resolved.close()
