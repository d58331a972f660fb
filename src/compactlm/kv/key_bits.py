"""Per-channel bit allocation for quantized keys: 0, 2 or 4 bits per channel, averaging the key budget.

Keys are quantized per channel (KIVI, arXiv 2402.02750, §3.1), so each channel can get its own width.
A channel's share of the score error is ``E[q_c²] · range_c²`` (a uniform quantizer's error grows with
the square of its step; a key error ``e`` moves a score by ``q·e``), the sensitivity KVQuant
(arXiv 2401.18079, §3.3) weights its key quantizer by. Giving bits where that product is large —
reverse water-filling, each 2 more bits dividing a channel's error by 16 — holds retrieval at an
average of 2 bits where uniform 2-bit keys lose it (docs/kv-cache.md, "Per-channel key bits").

The query term comes from the weights (:meth:`compactlm.models.adapter.Adapter.query_channel_weights`),
the range term from the keys of a layer's first flush, so nothing is calibrated and the partition is
fixed per layer for the rest of the generation. RoPE rotates channel ``c`` with ``c ± D/2`` at every
relative angle, so the query term of both channels of a rotary pair is their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizer import META4, META8, QuantizedKV

MENU = (0, 2, 4)  # widths a channel may get: 0 keeps only each group's mean; 2 and 4 pack into whole bytes
_PACK = {2: 4, 4: 2}  # channels per byte: a class is padded to a multiple of this


def pair_mean(w: torch.Tensor) -> torch.Tensor:
    """Mean of each channel's weight with its rotary partner (``rotate_half`` layout: c and c + D/2)."""
    d = w.shape[-1]
    return 0.5 * (w + w.roll(d // 2, -1))


def group_ranges(keys: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared min–max range per channel over token groups: keys (B, H, T, D) -> (H, D) fp32.

    ``valid`` (B, T) bool leaves padded tokens out; groups with no valid token are left out.
    """
    b, h, t, d = keys.shape
    g = keys.float().reshape(b, h, t // group_size, group_size, d)
    if valid is None:
        r = (g.amax(3) - g.amin(3)).pow(2)  # (B, H, T/G, D)
        return r.mean((0, 2))
    v = valid.to(torch.bool).reshape(b, 1, t // group_size, group_size, 1)
    mx = torch.where(v, g, -torch.inf).amax(3)
    mn = torch.where(v, g, torch.inf).amin(3)
    seen = v.any(3)  # (B, 1, T/G, 1)
    r = torch.where(seen, mx - mn, 0.0).pow(2)
    count = seen.expand_as(r).sum((0, 2)).clamp(min=1)
    return r.sum((0, 2)) / count


def allocate(importance: torch.Tensor, avg_bits: int) -> torch.Tensor:
    """Bits from :data:`MENU` per channel (same shape as ``importance``) averaging exactly ``avg_bits``.

    Greedy reverse water-filling: a step of 2 bits divides a channel's error by 16, so the first step
    of channel c gains ``imp_c·15/16`` and the second ``imp_c·15/256``; the ``avg_bits/2 · n`` largest
    gains win (each channel's gains decrease, so taking them in order is the greedy optimum).
    """
    if avg_bits != 2:
        raise ValueError(f"per-channel key bits average 2 (menu {MENU}), got {avg_bits}")
    flat = importance.float().reshape(-1).clamp(min=0)
    n = flat.numel()
    gains = torch.cat([flat * (15 / 16), flat * (15 / 256)])
    steps = avg_bits // 2 * n
    chosen = torch.zeros(2 * n, dtype=torch.bool)
    chosen[torch.topk(gains, steps, sorted=False).indices] = True
    # a second step is only taken with the first (its gain is 16x smaller): count steps per channel
    bits = 2 * (chosen[:n].long() + chosen[n:].long())
    return bits.reshape(importance.shape)


def channel_bits(query_weights: torch.Tensor, keys: torch.Tensor, group_size: int, avg_bits: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """The widths (H, D) a layer's keys (B, H, T, D) get: :func:`allocate` over ``E[q_c²]·range_c²``.

    ``query_weights`` (H, D) is the adapter's ``E[q_c²]`` estimate, taken as the mean over each rotary pair.
    """
    weights = pair_mean(query_weights.to(keys.device))
    return allocate(weights * group_ranges(keys, group_size, valid), avg_bits)


@dataclass
class MixedKeyStore:
    """Quantized keys (B, H, T, D) whose channels have 0, 2 or 4 bits; appendable along T.

    Channels are addressed flat over (H, D). Each width class is one :class:`QuantizedKV` over its
    gathered channels (padded with constant channels to fill whole bytes), the 0-bit class keeps each
    group's mean. The partition (``channels``) is fixed at the first flush and reused by appends.
    """

    channels: dict[int, torch.Tensor]  # bits -> flat channel indices (long), every channel in exactly one class
    stores: dict[int, QuantizedKV]  # bits (2, 4) -> store over (B, 1, T, n_b padded)
    means: torch.Tensor | None  # (B, 1, T/G, n_0) group means of the 0-bit channels
    heads: int
    head_dim: int
    group_size: int
    length: int

    @classmethod
    def quantize(cls, keys: torch.Tensor, bits: torch.Tensor | None, group_size: int,
                 meta_dtype: torch.dtype | str, valid: torch.Tensor | None = None, clip_search: bool = False,
                 like: MixedKeyStore | None = None) -> MixedKeyStore:
        """Quantize ``keys`` with per-channel ``bits`` (H, D) — or the partition of ``like`` when given."""
        b, h, t, d = keys.shape
        flat = keys.permute(0, 2, 1, 3).reshape(b, 1, t, h * d)  # (B, 1, T, H·D): channels on the last dim
        if like is not None:
            channels = like.channels
        else:
            if bits is None or bits.shape != (h, d):
                raise ValueError(f"per-channel bits must have shape {(h, d)}, got "
                                 f"{None if bits is None else tuple(bits.shape)}")
            bits = bits.reshape(-1).cpu()
            channels = {w: torch.nonzero(bits == w).flatten().to(keys.device) for w in MENU}
        stores: dict[int, QuantizedKV] = {}
        for w, per in _PACK.items():
            idx = channels[w]
            if not idx.numel():
                continue
            x = flat.index_select(-1, idx)
            pad = -idx.numel() % per
            if pad:  # constant channels fill the last byte; they dequantize to zero and are dropped
                x = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], -1)
            meta = META8 if (meta_dtype == META4 and w != 2) else meta_dtype  # the 1-byte format fits 2-bit codes
            prev = like.stores.get(w) if like is not None else None
            stores[w] = QuantizedKV.quantize(x, w, group_size, -2, meta, valid, clip_search, prev)
        means = None
        idx0 = channels[0]
        if idx0.numel():
            x = flat.index_select(-1, idx0).float().reshape(b, 1, t // group_size, group_size, -1)
            if valid is None:
                m = x.mean(3)
            else:
                v = valid.to(torch.bool).reshape(b, 1, t // group_size, group_size, 1).float()
                m = (x * v).sum(3) / v.sum(3).clamp(min=1)
            mean_dtype = meta_dtype if isinstance(meta_dtype, torch.dtype) else torch.float16
            means = m.to(mean_dtype)
        return cls(channels, stores, means, h, d, group_size, t)

    @property
    def nbytes(self) -> int:
        held = [*self.channels.values(), *([self.means] if self.means is not None else [])]
        return sum(s.nbytes for s in self.stores.values()) + sum(t.numel() * t.element_size() for t in held)

    def bits(self) -> torch.Tensor:
        """The per-channel widths (H, D)."""
        out = torch.zeros(self.heads * self.head_dim, dtype=torch.long)
        for w, idx in self.channels.items():
            out[idx.cpu()] = w
        return out.view(self.heads, self.head_dim)

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tokens ``[start, end)`` (group edges) back in ``dtype``, (B, H, end-start, D)."""
        end = self.length if end is None else end
        g = self.group_size
        ref = next(iter(self.stores.values())).packed if self.stores else self.means
        b, t = ref.shape[0], end - start
        out = torch.empty(b, 1, t, self.heads * self.head_dim, dtype=dtype, device=ref.device)
        for w, store in self.stores.items():
            idx = self.channels[w]
            out.index_copy_(-1, idx, store.dequantize(dtype, start, end)[..., : idx.numel()])
        if self.means is not None:
            m = self.means[..., start // g: end // g, :].to(dtype).repeat_interleave(g, -2)
            out.index_copy_(-1, self.channels[0], m)
        return out.view(b, t, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def append(self, other: MixedKeyStore) -> MixedKeyStore:
        if other.channels is not self.channels:
            raise ValueError("append keys quantized with like=<this store> (one channel partition per layer)")
        stores = {w: s.append(other.stores[w]) for w, s in self.stores.items()}
        means = None if self.means is None else torch.cat([self.means, other.means], -2)
        return MixedKeyStore(self.channels, stores, means, self.heads, self.head_dim, self.group_size,
                             self.length + other.length)

    def map_batch(self, fn) -> MixedKeyStore:
        """Apply ``fn`` to the batch dim of every held tensor (the partition is shared by the batch)."""
        stores = {w: s.map_batch(fn) for w, s in self.stores.items()}
        means = None if self.means is None else fn(self.means)
        return MixedKeyStore(self.channels, stores, means, self.heads, self.head_dim, self.group_size, self.length)
