"""KV-cache quantization (KIVI-style): keys per channel, values per token, full-precision recent window.

    with compactlm.kv_cache(model, KVQuant(bits=2, group_size=32, residual=128)) as session:
        model.generate(**inputs)
    session.cache.kv_bytes()

or pass ``QuantizedKVCache(model, KVQuant(...))`` as ``past_key_values=`` / ``cache=`` yourself.
"""

from .attention import dense_grouped_attention, quantized_decode_attention, reference_attention
from .cache import QuantizedKVCache, QuantizedKVLayer, full_cache_bytes
from .config import KVQuant
from .quantizer import QuantizedKV, dequantize_groups, pack_codes, quantize_groups, unpack_codes
from .runtime import KVSession, kv_cache

__all__ = ["KVQuant", "QuantizedKVCache", "QuantizedKVLayer", "KVSession", "kv_cache", "quantized_decode_attention",
           "reference_attention", "dense_grouped_attention", "full_cache_bytes", "QuantizedKV", "quantize_groups",
           "dequantize_groups", "pack_codes", "unpack_codes"]
