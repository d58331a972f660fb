"""A transformers ``Cache`` holding 2/4/8-bit keys and values with a full-precision recent window.

Based on KIVI (Liu et al., arXiv 2402.02750), §3.3 (Algorithm 1): tokens enter a full-precision
window; once it holds ``residual + group_size`` tokens, the oldest ``group_size`` are quantized
(keys per channel, values per token) and appended to the quantized store, so the window keeps
between ``residual`` and ``residual + group_size - 1`` tokens. Options beyond KIVI:

- ``sinks``: the first tokens stay in full precision (attention sinks; KVQuant, arXiv 2401.18079, §3.5
  keeps them unquantized for the same reason);
- ``pre_rope``: keys are quantized before RoPE (KVQuant §3.2): flushed keys are un-rotated at their
  positions and re-rotated when read, which keeps per-channel statistics intact across positions;
- ``value_rotation``: values are rotated by a Hadamard matrix before per-token quantization (QuaRot,
  arXiv 2404.00456, §4) and rotated back when read;
- padding: a (B, T) validity mask keeps padded tokens out of the key groups' min/max.

Layer tensor layout: ``[sinks | quantized store | recent window]`` along T, in position order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .config import KVQuant
from .key_bits import MixedKeyStore, channel_bits
from .quantizer import META_DTYPES, QuantizedKV, hadamard

Rope = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (k (B,H,T,D), positions (B,T), inverse)


def _positions(kwargs: dict, batch: int, start: int, length: int, device) -> torch.Tensor:
    inner = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
    pos = inner.get("position_ids") if inner else None
    if pos is None:
        pos = torch.arange(start, start + length, device=device)[None]
    return pos.to(device=device, dtype=torch.int32).expand(batch, length)  # (B, T)


class QuantizedKVLayer(DynamicLayer):
    """One layer of :class:`QuantizedKVCache`; ``update`` returns full-length keys/values (dequantized)."""

    is_croppable = False

    def __init__(self, config: KVQuant, rope: Rope | None = None, query_weights: torch.Tensor | None = None):
        super().__init__()
        if config.pre_rope and rope is None:
            raise ValueError("pre_rope=True needs the model's rotary embedding (build the cache from a model)")
        if config.key_allocation == "importance" and query_weights is None:
            raise ValueError("key_allocation='importance' needs the query weights (build the cache from a model)")
        self.cfg = config
        self.rope = rope
        self.query_weights = query_weights  # (H_kv, D) E[q_c²] estimate, for per-channel key bits
        self.meta_dtype = META_DTYPES[config.meta_dtype]
        self.sink_k = self.sink_v = None  # (B, H, S, D) full precision
        self.qk: QuantizedKV | MixedKeyStore | None = None  # keys, grouped along tokens
        self.qv: QuantizedKV | None = None  # values, grouped along channels
        # positions of quantized keys (pre_rope only): (B, Tq/G) int32 first position of each group while every
        # group's positions are consecutive (4 bytes per group instead of per token), else (B, Tq) per token
        self.qpos: torch.Tensor | None = None
        self.qpos_grouped = True
        self.rpos: torch.Tensor | None = None  # (B, R') positions of the recent window (pre_rope only)
        self.cumulative_length = 0
        self.fused_pending = False  # set when update skipped materialising for a fused decode handler
        self.fuse_decode = False

    # --- state ----------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        self.batch_size = b
        empty = key_states.new_zeros(b, h, 0, d)
        self.sink_k, self.sink_v = empty, value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.keys, self.values = empty.clone(), self.sink_v.clone()  # the recent full-precision window
        self.rpos = torch.zeros(b, 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.cumulative_length

    @property
    def quantized_length(self) -> int:
        return 0 if self.qk is None else self.qk.length

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (codes, scales, zeros, full-precision parts, positions)."""
        held = [self.sink_k, self.sink_v, self.keys, self.values, self.qpos, self.rpos]
        total = sum(t.numel() * t.element_size() for t in held if t is not None)
        return total + sum(q.nbytes for q in (self.qk, self.qv) if q is not None)

    # --- update ---------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, valid: torch.Tensor | None = None,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        b, _, t, _ = key_states.shape
        pos = _positions(kwargs, b, self.cumulative_length, t, key_states.device)
        start = self.cumulative_length
        self.cumulative_length += t
        k, v = key_states, value_states
        room = self.cfg.sinks - self.sink_k.shape[-2]
        if room > 0:  # the first `sinks` tokens are kept in full precision for good
            self.sink_k = torch.cat([self.sink_k, k[..., :room, :]], -2)
            self.sink_v = torch.cat([self.sink_v, v[..., :room, :]], -2)
            k, v, pos = k[..., room:, :], v[..., room:, :], pos[:, room:]
        self.keys = torch.cat([self.keys, k], -2)
        self.values = torch.cat([self.values, v], -2)
        if self.cfg.pre_rope:
            self.rpos = torch.cat([self.rpos, pos], -1)
        self._flush(valid, start + t)
        if first:
            return key_states, value_states  # prefill attends over exact keys/values (KIVI Alg. 1)
        if self.fuse_decode and t == 1:
            self.fused_pending = True  # the fused handler reads the store itself; skip materialising
            return self.keys, self.values
        self.fused_pending = False
        return self.materialize()

    def _flush(self, valid: torch.Tensor | None, end: int) -> None:
        g, r = self.cfg.group_size, self.cfg.residual
        n = self.keys.shape[-2]
        if n < r + g:
            return
        m = ((n - r) // g) * g  # whole groups, oldest first
        k, v = self.keys[..., :m, :], self.values[..., :m, :]
        flushed_valid = None
        if valid is not None:
            first_index = end - n  # cache index of the window's first token
            flushed_valid = valid[:, first_index: first_index + m].to(self.device)
        if self.cfg.pre_rope:
            pos = self.rpos[:, :m]
            k = self.rope(k, pos, True)  # un-rotate: quantize pre-RoPE keys
            self._store_positions(pos, flushed_valid)
            self.rpos = self.rpos[:, m:]
        clip = self.cfg.clip_search
        if self.cfg.key_allocation == "importance":
            bits = None
            if self.qk is None:  # the layer's channel widths are chosen once, from its first flushed keys
                bits = channel_bits(self.query_weights, k, g, self.cfg.k_bits, flushed_valid)
            qk = MixedKeyStore.quantize(k, bits, g, self.meta_dtype, flushed_valid, clip, self.qk)
        else:
            qk = QuantizedKV.quantize(k, self.cfg.k_bits, g, -2, self.meta_dtype, flushed_valid, clip, self.qk)
        if self.cfg.value_rotation:  # quantize v·H; read back as dequant(v·H)·H (H symmetric orthonormal)
            v = v.float() @ hadamard(v.shape[-1], v.device)
        qv = QuantizedKV.quantize(v, self.cfg.v_bits, self.cfg.value_group(v.shape[-1]), -1, self.meta_dtype,
                                  None, clip, self.qv)
        self.qk = qk if self.qk is None else self.qk.append(qk)
        self.qv = qv if self.qv is None else self.qv.append(qv)
        self.keys, self.values = self.keys[..., m:, :].contiguous(), self.values[..., m:, :].contiguous()

    def _store_positions(self, pos: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Append the positions (B, m) of flushed keys: one per group while they run consecutively."""
        g = self.cfg.group_size
        first = pos[:, g - 1:: g] - (g - 1)  # (B, m/G): anchored on each group's last token (left padding)
        regular = first.repeat_interleave(g, -1) + torch.arange(g, device=pos.device).repeat(pos.shape[-1] // g)
        same = regular == pos
        if valid is not None:  # padded tokens are never attended: their positions need not fit
            same = same | ~valid.bool()
        if self.qpos_grouped and not bool(same.all()):  # irregular position ids: keep one per token from now on
            if self.qpos is not None:
                self.qpos = self._key_positions(0, self.quantized_length)
            self.qpos_grouped = False
        new = first if self.qpos_grouped else pos
        self.qpos = new if self.qpos is None else torch.cat([self.qpos, new], -1)

    def _key_positions(self, start: int, end: int) -> torch.Tensor:
        """Positions (B, end-start) of quantized keys ``[start, end)`` (group edges)."""
        if not self.qpos_grouped:
            return self.qpos[:, start:end]
        g = self.cfg.group_size
        first = self.qpos[:, start // g: end // g]
        return first.repeat_interleave(g, -1) + torch.arange(g, device=first.device, dtype=first.dtype).repeat(
            first.shape[-1])

    # --- reading --------------------------------------------------------------------------------------
    def dequantized_keys(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Quantized keys ``[start, end)`` (store coordinates) back in ``dtype``, RoPE re-applied if pre-RoPE."""
        k = self.qk.dequantize(dtype, start, end)
        if self.cfg.pre_rope:
            k = self.rope(k, self._key_positions(start, end), False)
        return k

    def dequantized_values(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Quantized values ``[start, end)`` back in ``dtype``, the Hadamard rotation undone if configured."""
        if not self.cfg.value_rotation:
            return self.qv.dequantize(dtype, start, end)
        v = self.qv.dequantize(torch.float32, start, end)
        return (v @ hadamard(v.shape[-1], v.device)).to(dtype)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-length (B, H, T, D) keys and values: sinks, dequantized store, recent window."""
        parts_k, parts_v = [self.sink_k], [self.sink_v]
        if self.qk is not None:
            parts_k.append(self.dequantized_keys(0, self.qk.length, self.dtype))
            parts_v.append(self.dequantized_values(0, self.qv.length, self.dtype))
        return torch.cat([*parts_k, self.keys], -2), torch.cat([*parts_v, self.values], -2)

    # --- batch bookkeeping (generate's beam search / batch selection) ----------------------------------
    def _map(self, fn) -> None:
        for name in ("sink_k", "sink_v", "keys", "values", "qpos", "rpos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.qk = None if self.qk is None else self.qk.map_batch(fn)
        self.qv = None if self.qv is None else self.qv.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (assisted decoding is not supported)")

    def reset(self) -> None:
        self.__init__(self.cfg, self.rope, self.query_weights)


class QuantizedKVCache(Cache):
    """KIVI-style quantized KV cache for every layer of ``model``; pass it as ``cache=`` / ``past_key_values=``.

    ``valid_mask`` (B, T_total) bool, when set, marks real (non-padding) tokens; ``compactlm.kv_cache``
    keeps it in sync with the attention mask of each forward call.
    """

    def __init__(self, model: torch.nn.Module, config: KVQuant):
        from ..models.adapter import get_adapter

        adapter = get_adapter(model)
        config.check_model(adapter.head_dim)
        sliding = [i for i in range(adapter.num_layers) if adapter.layer_type(i) != "full_attention"]
        if sliding:
            from ..errors import UnsupportedArchitectureError

            raise UnsupportedArchitectureError(f"layers {sliding} use {adapter.layer_type(sliding[0])!r}; the "
                                               "quantized KV cache supports full-attention layers only")
        importance = config.key_allocation == "importance"
        layers = [QuantizedKVLayer(config, _rope_for(adapter, i) if config.pre_rope else None,
                                   adapter.query_channel_weights(i) if importance else None)
                  for i in range(adapter.num_layers)]
        super().__init__(layers=layers)
        self.config = config
        self.valid_mask: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, *args, valid=self.valid_mask, **kwargs)

    def kv_bytes(self) -> int:
        """Bytes held by every layer (quantized codes, scales, zeros, full-precision window and sinks)."""
        return sum(layer.nbytes() for layer in self.layers)

    @classmethod
    def from_cache(cls, model: torch.nn.Module, config: KVQuant, cache: Cache) -> QuantizedKVCache:
        """Quantize a filled full-precision cache (e.g. a shared prefill) into a new quantized cache."""
        out = cls(model, config)
        for i, layer in enumerate(cache.layers):
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                out.layers[i].update(layer.keys, layer.values)
        return out


def _rope_for(adapter, i: int) -> Rope:
    def rope(k: torch.Tensor, positions: torch.Tensor, inverse: bool) -> torch.Tensor:
        cos, sin = adapter.rotary(k, positions.long(), i)  # (B, T, D)
        _, out = adapter.apply_rotary(k, k, cos.to(k.dtype), (-sin if inverse else sin).to(k.dtype))
        return out

    return rope


def full_cache_bytes(cache: Cache) -> int:
    """Bytes of the keys and values a full-precision ``DynamicCache`` holds."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total
