"""The SALS cache layer: latent keys (+ values, positions) instead of full keys for sparse layers.

A :class:`SALSLayer` replaces a ``DynamicLayer`` of a transformers cache in place (:func:`convert_cache`), so
the cache object the caller holds stays the same. ``compressed`` mode stores r numbers per token for the keys
of all KV heads together (the memory saving of arXiv 2510.24273, §4); ``index`` mode also keeps the full keys
and uses the latent only to select, so it stores only the r* leading latent columns the scoring reads (never
a rebuild). Buffers grow by doubling, so a decode step appends in O(1) amortised instead of concatenating the
whole cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from ..errors import ConfigError
from ..kernels.huge_pages import empty as empty_on_huge_pages
from ..kernels.sparse_decode import ExactKeys, PackedValues, rope, unrope


class SALSLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, proj: torch.Tensor, rope_table: Any, layer_idx: int, mode: str = "compressed",
                 value_bits: int | None = None, value_group: int = 32, exact_sink: int = 0, exact_recent: int = 0,
                 score_dims: int | None = None, huge_pages: bool = True):
        """``proj`` (n_kv, d, r); ``score_dims`` r*: in ``index`` mode only the first r* columns are kept (projected
        and stored), since the full keys are cached and the latent only scores; None keeps all r."""
        super().__init__()
        if mode == "index" and score_dims is not None:
            if not 1 <= score_dims <= proj.shape[-1]:
                raise ConfigError(f"SALSLayer: score_dims={score_dims} must be in [1, r={proj.shape[-1]}]")
            # Index mode reads latent[..., :r*] only (scoring); the other r - r* columns were dead bytes per token
            # and strided the scoring GEMM's reads (docs/sals.md, ATTN-decode): drop them from the projection.
            proj = proj[..., :score_dims].contiguous()
        # Exact post-RoPE keys for the first `exact_sink` positions and a ring of the last `exact_recent` slots
        # (compressed mode): constant memory, used instead of their latent rebuild (kernels.sparse_decode.ExactKeys).
        self.exact_sink = exact_sink if mode == "compressed" else 0
        self.exact_recent = exact_recent if mode == "compressed" else 0
        self._exact: torch.Tensor | None = None  # (B, n_kv, S + R, d)
        self._sink_slot: torch.Tensor | None = None  # (B, S) int64, -1 = none yet
        self.value_bits = value_bits  # None: full-precision values; else per-token KIVI codes (kv.quantizer)
        self.value_group = value_group
        self._vq: dict[str, torch.Tensor] = {}  # packed / scale / zero, (B, n_kv, cap, ·)
        self.proj = proj  # (n_kv, d, r) in the cache dtype; (n_kv, d, r*) in index mode
        self.proj_f32 = proj.float()
        self.rope_table = rope_table
        self.layer_idx = layer_idx
        self.mode = mode
        self.huge_pages = huge_pages  # large CPU buffers on 2 MB pages (kernels.huge_pages)
        self.length = 0
        self.max_pos = -1
        self._latent: torch.Tensor | None = None  # (B, cap, r); (B, cap, r*) in index mode
        self._values: torch.Tensor | None = None  # (B, n_kv, cap, d)
        self._keys: torch.Tensor | None = None  # (B, n_kv, cap, d), index mode only
        self._positions: torch.Tensor | None = None  # (B, cap) int32

    # --- storage ----------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def _grow(self, batch: int, need: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        cap = 0 if self._latent is None else self._latent.shape[1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 256)
        r = self.proj.shape[-1]
        hkv, d = like_v.shape[1], like_v.shape[-1]
        dev = like_v.device

        def grown(old: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, dim: int) -> torch.Tensor:
            new = empty_on_huge_pages(shape, dtype, dev, enabled=self.huge_pages)
            if old is not None and self.length:
                new.narrow(dim, 0, self.length).copy_(old.narrow(dim, 0, self.length))
            return new

        self._latent = grown(self._latent, (batch, new_cap, r), self.proj.dtype, 1)
        if self.value_bits is None:
            self._values = grown(self._values, (batch, hkv, new_cap, d), like_v.dtype, 2)
        else:
            groups = d // self.value_group
            widths = {"packed": (d * self.value_bits // 8, torch.uint8), "scale": (groups, torch.float16),
                      "zero": (groups, torch.float16)}
            for name, (w, dt) in widths.items():
                self._vq[name] = grown(self._vq.get(name), (batch, hkv, new_cap, w), dt, 2)
        self._positions = grown(self._positions, (batch, new_cap), torch.int32, 1)
        if self.mode == "index":
            self._keys = grown(self._keys, (batch, hkv, new_cap, d), like_k.dtype, 2)

    def latent_view(self) -> torch.Tensor:
        return self._latent[:, : self.length]

    def values_view(self) -> torch.Tensor | PackedValues:
        if self.value_bits is None:
            return self._values[:, :, : self.length]
        n = self.length
        return PackedValues(self._vq["packed"][:, :, :n], self._vq["scale"][:, :, :n], self._vq["zero"][:, :, :n],
                            self.value_bits, self.value_group)

    def dense_values(self, dtype: torch.dtype) -> torch.Tensor:
        """Every cached value as a (B, n_kv, L, d) tensor (dequantized when values are quantized)."""
        v = self.values_view()
        if isinstance(v, torch.Tensor):
            return v
        from ..kv.quantizer import dequantize_groups, unpack_codes

        return dequantize_groups(unpack_codes(v.packed, v.bits), v.scale, v.zero, v.group, -1, dtype)

    def positions_view(self) -> torch.Tensor:
        return self._positions[:, : self.length]

    def keys_view(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, :, : self.length]

    def exact_view(self) -> ExactKeys | None:
        if self._exact is None:
            return None
        return ExactKeys(self._exact, self._sink_slot, self.exact_recent, self.length)

    def _store_exact(self, key_states: torch.Tensor, pos: torch.Tensor, before: int) -> None:
        """Keep the exact keys of sink positions (the last slot holding each wins: left padding comes first) and
        of the newest slots in the ring."""
        b, hkv, t, d = key_states.shape
        sinks, recent = self.exact_sink, self.exact_recent
        dev = key_states.device
        if self._exact is None:
            self._exact = key_states.new_zeros(b, hkv, sinks + recent, d)
            self._sink_slot = torch.full((b, sinks), -1, dtype=torch.long, device=dev)
        if sinks:
            hit = pos[:, :, None] == torch.arange(sinks, device=dev)[None, None]  # (B, T, S)
            last = torch.where(hit, torch.arange(1, t + 1, device=dev)[None, :, None], 0).amax(1) - 1  # (B, S)
            has = last >= 0
            got = key_states.gather(2, last.clamp(min=0)[:, None, :, None].expand(b, hkv, sinks, d))
            self._exact[:, :, :sinks] = torch.where(has[:, None, :, None], got, self._exact[:, :, :sinks])
            self._sink_slot = torch.where(has, before + last, self._sink_slot)
        if recent:
            m = min(t, recent)
            rows = sinks + torch.arange(before + t - m, before + t, device=dev) % recent
            self._exact[:, :, rows] = key_states[:, :, t - m:]

    def rebuild_keys(self) -> torch.Tensor:
        """Every cached key, rebuilt from the latent and rotated at its position: (B, n_kv, L, d) (compressed mode)."""
        if self.mode == "index":  # its latent holds only the scoring columns; the exact keys are keys_view()
            raise ConfigError("SALSLayer.rebuild_keys: index mode stores the full keys (keys_view()) and only r* "
                              "latent columns, which cannot rebuild them")
        z = self.latent_view()
        k_pre = torch.einsum("blr,hdr->bhld", z, self.proj)
        cos, sin = self.rope_table.at(self.positions_view(), self.layer_idx, k_pre.dtype)
        keys = rope(k_pre, cos[:, None], sin[:, None])
        exact = self.exact_view()
        if exact is not None:
            b, hkv, n, _ = keys.shape
            keys = exact.apply(keys, torch.arange(n, device=keys.device).expand(b, hkv, n))
        return keys

    def nbytes(self) -> int:
        """Bytes held for the cached tokens (the buffers' spare capacity is not counted)."""
        n = self.length
        if self._latent is None or n == 0:
            return 0
        b = self._latent.shape[0]
        per = self._latent.shape[-1] * self._latent.element_size()
        if self.value_bits is None:
            per += self._values.shape[1] * self._values.shape[-1] * self._values.element_size()
        else:
            per += sum(t.shape[1] * t.shape[-1] * t.element_size() for t in self._vq.values())
        per += self._positions.element_size()
        if self._keys is not None:
            per += self._keys.shape[1] * self._keys.shape[-1] * self._keys.element_size()
        fixed = 0 if self._exact is None else self._exact.nbytes + self._sink_slot.nbytes  # constant in length
        return b * n * per + fixed

    # --- the transformers cache-layer contract ---------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' latent keys, values and positions; return what attention needs now.

        Prefill of an empty layer returns the given keys (dense prefill); a later prefill chunk returns every
        key (rebuilt in compressed mode); a decode step returns a 0-length key placeholder in compressed mode,
        since the SALS handler reads the latent itself (dense attention on it fails loudly).
        """
        self.is_initialized = True
        kw = kwargs.get("kwargs") or {}
        b, _, t, _ = key_states.shape
        pos = kw.get("position_ids")
        if pos is None:
            pos = torch.arange(self.length, self.length + t, device=key_states.device)[None]
        pos = pos[:, -t:].expand(b, t)
        cos, sin = self.rope_table.at(pos, self.layer_idx, torch.float32)
        k_pre = unrope(key_states.float(), cos[:, None], sin[:, None])  # (B, n_kv, T, d)
        z = torch.einsum("bhtd,hdr->btr", k_pre, self.proj_f32)  # heads concatenated, projected jointly
        before = self.length
        self._grow(b, before + t, key_states, value_states)
        self._latent[:, before:before + t] = z.to(self._latent.dtype)
        if self.value_bits is None:
            self._values[:, :, before:before + t] = value_states
        else:
            from ..kv.quantizer import pack_codes, quantize_groups

            codes, scale, zero = quantize_groups(value_states, self.value_bits, self.value_group, -1)
            self._vq["packed"][:, :, before:before + t] = pack_codes(codes, self.value_bits)
            self._vq["scale"][:, :, before:before + t] = scale
            self._vq["zero"][:, :, before:before + t] = zero
        self._positions[:, before:before + t] = pos.to(torch.int32)
        if self._keys is not None:
            self._keys[:, :, before:before + t] = key_states
        if self.exact_sink or self.exact_recent:
            self._store_exact(key_states, pos, before)
        self.length = before + t
        self.max_pos = max(self.max_pos, int(pos.max()))
        if t == 1:  # the SALS handler reads the layer itself; dense attention on these fails loudly
            return key_states[:, :, :0], value_states[:, :, :0]
        if before == 0:
            return key_states, value_states
        keys = self.keys_view() if self.mode == "index" else self.rebuild_keys().to(key_states.dtype)
        return keys, self.dense_values(value_states.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in ("_latent", "_values", "_keys", "_positions", "_exact", "_sink_slot"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[indices])
        self._vq = {k: t[indices] for k, t in self._vq.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def offload(self) -> None:  # CPU-resident; nothing to move
        return None

    def prefetch(self) -> None:
        return None


def convert_cache(cache: Any, adapter: Any, cfg: Any, projections: Any, rope_table: Any, sparse: list[int]) -> None:
    """Swap the sparse layers of a transformers cache for :class:`SALSLayer`, in place (idempotent).

    Layers that already hold tokens (a shared dense prefill) are converted with positions 0..L-1, i.e. an
    unpadded prompt; a padded batch must be prefilled inside the ``sparse_attention`` scope instead.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ConfigError(f"SALS needs a transformers Cache with per-layer storage, got {type(cache).__name__}")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while len(layers) < adapter.num_layers and replicate is not None:
        layers.append(replicate())
    ranks = cfg.layer_ranks(projections, adapter.num_layers)  # per layer: energy ranks differ by layer
    if cfg.value_bits is not None and (adapter.head_dim % cfg.value_group or adapter.head_dim * cfg.value_bits % 8):
        raise ConfigError(f"SALSConfig.value_group={cfg.value_group} must divide the head dim {adapter.head_dim}")
    for i in sparse:
        old = layers[i]
        if isinstance(old, SALSLayer):
            continue
        if type(old) is not DynamicLayer:
            raise ConfigError(f"SALS converts full-precision DynamicLayer caches; layer {i} is {type(old).__name__}. "
                              "Run SALS with a plain DynamicCache (values quantization is not combined yet)")
        dtype = adapter.embed_tokens.weight.dtype
        new = SALSLayer(projections.proj(i, ranks[i][0], dtype), rope_table, i, cfg.mode, cfg.value_bits,
                        cfg.value_group, exact_sink=cfg.exact_sink, exact_recent=cfg.exact_recent,
                        score_dims=ranks[i][1], huge_pages=cfg.huge_pages)
        if old.is_initialized and old.keys is not None and old.keys.numel():
            length = old.keys.shape[-2]
            pos = torch.arange(length, device=old.keys.device)[None]
            new.update(old.keys, old.values, kwargs={"position_ids": pos})
        layers[i] = new


def kv_bytes_per_token(cache: Any) -> float:
    """Bytes the cache holds per cached token, over all layers (SALS layers count latent + values + positions, and
    the full keys in index mode, whose latent holds r* columns)."""
    total, tokens = 0, 0
    for layer in cache.layers:
        if isinstance(layer, SALSLayer):
            total += layer.nbytes()
            tokens = max(tokens, layer.length * (layer._latent.shape[0] if layer._latent is not None else 0))
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.nbytes + layer.values.nbytes
            tokens = max(tokens, layer.keys.shape[0] * layer.keys.shape[-2])
    if tokens == 0:
        raise ConfigError("the cache holds no tokens; prefill it before measuring bytes per token")
    return total / tokens
