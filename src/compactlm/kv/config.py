"""``KVQuant``: the configuration of the quantized KV cache (data only; validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import BaseConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class KVQuant(BaseConfig):
    """KIVI-style KV-cache quantization: keys per channel, values per token, full-precision recent window.

    Based on KIVI (Liu et al., arXiv 2402.02750), §3; ``sinks`` and ``pre_rope`` follow KVQuant
    (Hooper et al., arXiv 2401.18079), §3.5 and §3.2.

    Fields:
        bits: 2, 4 or 8 bits per key/value element (the default of ``key_bits`` and ``value_bits``).
        key_bits: bits of the keys only (None: ``bits``). Keys hold the outlier channels and their error
            goes through the softmax (KIVI §3.1; KVQuant §3.1–3.2 spend their effort on keys), so they are
            the first to deserve more bits; e.g. ``bits=2, key_bits=4`` is K4V2.
        value_bits: bits of the values only (None: ``bits``).
        group_size: tokens per key group (per channel) and, unless ``value_group_size`` is set,
            channels per value group (per token). KIVI uses 32.
        residual: tokens kept in full precision at the end (KIVI's R; default 128). The window is
            flushed ``group_size`` tokens at a time, so it holds ``residual`` to ``residual + group_size - 1``.
        sinks: first tokens kept in full precision for good (0 = off).
        pre_rope: quantize keys before RoPE (un-rotated at their positions, re-rotated when read).
        value_group_size: channels per value group (None: ``group_size``, capped at the head dim).
        meta_dtype: format of the stored scales and zeros: fp16 (default), bf16, fp32, or int8 (2 bytes
            per group instead of 4: a uint8 log2 scale in 1/8-octave steps and an int8 zero point; see
            ``quantizer.encode_meta8``), or int4 (1 byte per group: 4-bit scale and offset codes relative to a
            per-channel base fixed at a layer's first flush, fitted by lowest reconstruction error; see
            ``compactlm.kv.fit``).
        clip_search: fit each group's range by the lowest squared reconstruction error over a grid of ranges
            cut at both ends (``fit.CLIP_GRID``) instead of min-max; costs no bytes, only flush time.
        value_rotation: rotate each token's value channels by an orthonormal Hadamard matrix before
            quantizing (QuaRot, arXiv 2404.00456, §4) and back when read (exact in full precision; needs
            a power-of-two head dim). Keys are not rotated: their per-channel groups rely on outliers
            staying in fixed channels (KIVI §3.1).
        key_allocation: ``"uniform"`` (every key channel gets ``k_bits``) or ``"importance"``: each key
            channel gets 0, 2 or 4 bits, averaging ``k_bits`` (2) per layer, by its share of the score error
            ``E[q_c²]·range_c²`` — query term from the weights, range from the layer's first flushed keys
            (``compactlm.kv.key_bits``; KVQuant §3.3's sensitivity weighting, spent on bit widths).
        fused_attention: decode attention reads the quantized store chunk by chunk (no full
            dequantized copy); False returns dequantized keys/values to the model's own attention.
        chunk_tokens: tokens of the store read at a time by the fused attention (a multiple of group_size).
            8,192 by default: at one query token the per-chunk op count, not the arithmetic, set the cost
            (int2-mixed at 8K: 232 CPU-ms per step with 1,024-token chunks, 187 with 8,192 = 0.51× the full
            cache; docs/kv-cache.md, "Decode speed of the quantized cache"), and a chunk's expanded codes are
            small (8,192 × H_kv·D values: 3 MB on the default model).
    """

    bits: int = 2
    key_bits: int | None = None
    value_bits: int | None = None
    group_size: int = 32
    residual: int = 128
    sinks: int = 0
    pre_rope: bool = False
    value_group_size: int | None = None
    meta_dtype: str = "fp16"
    clip_search: bool = False
    value_rotation: bool = False
    key_allocation: str = "uniform"
    fused_attention: bool = True
    chunk_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ConfigError(f"KVQuant.bits must be 2, 4 or 8, got {self.bits!r}")
        for name in ("key_bits", "value_bits"):
            v = getattr(self, name)
            if v is not None and v not in (2, 4, 8):
                raise ConfigError(f"KVQuant.{name} must be 2, 4, 8 or None (= bits), got {v!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"KVQuant.group_size must be a positive integer (KIVI uses 32), got {self.group_size!r}")
        if self.value_group_size is not None and (not isinstance(self.value_group_size, int)
                                                  or self.value_group_size < 1):
            raise ConfigError(f"KVQuant.value_group_size must be a positive integer or None, got "
                              f"{self.value_group_size!r}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise ConfigError(f"KVQuant.residual must be an integer ≥ 0 (KIVI uses 128), got {self.residual!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ConfigError(f"KVQuant.sinks must be an integer ≥ 0, got {self.sinks!r}")
        if self.meta_dtype not in ("fp16", "bf16", "fp32", "int8", "int4"):
            raise ConfigError(f"KVQuant.meta_dtype must be fp16, bf16, fp32, int8 or int4, got {self.meta_dtype!r}")
        if self.meta_dtype == "int4" and (self.k_bits, self.v_bits) != (2, 2):
            raise ConfigError("KVQuant(meta_dtype='int4') is for 2-bit keys and values (its offsets span ±1.5 steps "
                              "around a channel's midpoint, which fits 3-step codes); use meta_dtype='int8' or 'fp16' "
                              f"for {self.k_bits}-bit keys / {self.v_bits}-bit values")
        if self.key_allocation not in ("uniform", "importance"):
            raise ConfigError(f"KVQuant.key_allocation must be 'uniform' or 'importance', got {self.key_allocation!r}")
        if self.key_allocation == "importance" and self.k_bits != 2:
            raise ConfigError("KVQuant(key_allocation='importance') spreads an average of 2 key bits over 0/2/4-bit "
                              f"channels; it needs 2-bit keys (bits=2 or key_bits=2), got {self.k_bits}-bit keys")
        if not isinstance(self.clip_search, bool):
            raise ConfigError(f"KVQuant.clip_search must be True or False, got {self.clip_search!r}")
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < self.group_size \
                or self.chunk_tokens % self.group_size:
            raise ConfigError(f"KVQuant.chunk_tokens must be a positive multiple of group_size ({self.group_size}), "
                              f"got {self.chunk_tokens!r}")

    @property
    def k_bits(self) -> int:
        """Bits of the stored keys (``key_bits``, else ``bits``)."""
        return self.key_bits or self.bits

    @property
    def v_bits(self) -> int:
        """Bits of the stored values (``value_bits``, else ``bits``)."""
        return self.value_bits or self.bits

    def value_group(self, head_dim: int) -> int:
        """Channels per value group for a model with ``head_dim`` (``group_size`` capped at the head dim)."""
        return self.value_group_size or min(self.group_size, head_dim)

    def check_model(self, head_dim: int) -> None:
        """Raise ConfigError when the value groups or the bit packing do not fit ``head_dim``."""
        if head_dim % self.value_group(head_dim):
            raise ConfigError(f"value groups of {self.value_group(head_dim)} channels do not divide this model's "
                              f"head dim {head_dim}; set KVQuant(value_group_size=...) to a divisor of {head_dim}")
        if self.value_rotation and head_dim & (head_dim - 1):
            raise ConfigError(f"value_rotation needs a power-of-two head dim, this model's is {head_dim}; "
                              "set KVQuant(value_rotation=False)")
        for bits in {self.k_bits, self.v_bits}:
            if (head_dim * bits) % 8:
                raise ConfigError(f"head dim {head_dim} × {bits} bits does not pack into whole bytes")

    @property
    def label(self) -> str:
        extra = (f"-vg{self.value_group_size}" if self.value_group_size else "") + (
            f"-s{self.sinks}" if self.sinks else "") + ("-prerope" if self.pre_rope else "") + (
            {"int8": "-m8", "int4": "-m4"}.get(self.meta_dtype, "")) + ("-clip" if self.clip_search else "") + (
            "-vrot" if self.value_rotation else "") + ("-kalloc" if self.key_allocation == "importance" else "")
        # "k4v2" where keys and values differ, "int2" where they agree (whatever spelled it)
        name = f"int{self.k_bits}" if self.k_bits == self.v_bits else f"k{self.k_bits}v{self.v_bits}"
        return f"{name}-g{self.group_size}-r{self.residual}{extra}"
