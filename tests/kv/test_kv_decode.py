"""The folded decode path over the quantized KV cache (``compactlm.kernels.kv_decode``) against the plain
reference: uniform 2/4-bit keys, per-channel 0/2/4-bit keys, 1- and 2-byte metadata, sinks, value rotation,
pre-RoPE keys, a masked batch of 2, chunks that do not divide the store and several metadata spans; its
table lookups bit-exact; the store's bytes untouched by reading."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compactlm.kernels.kv_decode import SPAN_CHUNKS, token_meta
from compactlm.kv import KVQuant, QuantizedKVCache, quantized_decode_attention, reference_attention
from compactlm.kv.attention import force_path
from compactlm.kv.key_bits import MixedKeyStore
from compactlm.kv.quantizer import QuantizedKV, unpack_codes, unpack_to
from compactlm.models import tiny_model

from .helpers import fused_matches_reference

CASES = {
    "int2": {"bits": 2},
    "int4": {"bits": 4},
    "int2-meta4": {"bits": 2, "meta_dtype": "int4"},
    "int2-meta8-vrot": {"bits": 2, "meta_dtype": "int8", "value_rotation": True, "value_group_size": 16},
    "int2-mixed": {"bits": 2, "meta_dtype": "int4", "key_allocation": "importance"},
    "int2-mixed-fp16": {"bits": 2, "key_allocation": "importance"},
    "int2-mixed-vrot": {"bits": 2, "meta_dtype": "int4", "key_allocation": "importance", "value_rotation": True},
    "int2-mixed-prerope": {"bits": 2, "meta_dtype": "int4", "key_allocation": "importance", "pre_rope": True},
}
TOKENS = 600  # sinks 2 + store 584 (73 groups of 8) + window 14
CHUNK = 40  # does not divide the store; 8 chunks = a 320-token metadata span, so two spans (320 + 264)


def _layer(options: dict, tokens: int = TOKENS, dtype: torch.dtype = torch.float32, seed: int = 0):
    model = tiny_model("llama")
    cfg = KVQuant(group_size=8, residual=8, sinks=2, chunk_tokens=CHUNK, **options)
    layer = QuantizedKVCache(model, cfg).layers[0]
    g = torch.Generator().manual_seed(seed)
    if cfg.key_allocation == "importance":
        layer.query_weights = (2 * torch.randn(2, 16, generator=g)).exp()  # spread widths: 0, 2 and 4 bits all used
    keys = torch.randn(2, 2, tokens, 16, generator=g) * torch.linspace(0.1, 3, 16)  # channels of different ranges
    layer.update(keys.to(dtype), torch.randn(2, 2, tokens, 16, generator=g).to(dtype))
    return layer, g


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_folded_path_matches_reference(case, masked):
    layer, g = _layer(CASES[case])
    assert layer.quantized_length == 584 and layer.quantized_length % CHUNK  # a partial last chunk
    assert layer.quantized_length > CHUNK * SPAN_CHUNKS  # more than one metadata span
    if isinstance(layer.qk, MixedKeyStore):
        assert set(layer.qk.bits().unique().tolist()) == {0, 2, 4}  # every width class is exercised
    with force_path("folded"):
        fused_matches_reference(layer, g, masked)


@pytest.mark.parametrize("case", ["int2", "int2-mixed"])
def test_folded_and_chunked_paths_agree_in_bf16_and_track_fp32(case):
    layer, g = _layer(CASES[case], dtype=torch.bfloat16)
    query = torch.randn(2, 4, 1, 16, generator=g).bfloat16()
    k, v = layer.materialize()
    ref = reference_attention(query.float(), k.float(), v.float(), 0.25)
    got = {p: quantized_decode_attention(query, layer, 0.25, path=p) for p in ("folded", "chunked")}
    for out in got.values():
        assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 3e-2
    assert (got["folded"].float() - got["chunked"].float()).abs().max() < 3e-2


def test_reading_leaves_the_stored_bytes_untouched():
    """The folded path keeps nothing: every held tensor is bit-identical and the byte count unchanged."""
    layer, g = _layer(CASES["int2-mixed"])

    def held(layer):
        qk, qv = layer.qk, layer.qv
        tensors = [layer.sink_k, layer.sink_v, layer.keys, layer.values, qv.packed, qv.scale, qv.zero]
        tensors += [t for s in qk.stores.values() for t in (s.packed, s.scale, s.zero)] + [qk.means]
        return [t.clone() for t in tensors], layer.nbytes(), sorted(vars(layer)), dataclasses.asdict(qk).keys()

    before = held(layer)
    for _ in range(3):
        quantized_decode_attention(torch.randn(2, 4, 1, 16, generator=g), layer, 0.25, path="folded")
    after = held(layer)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert before[1:] == after[1:]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_table_unpack_is_bit_exact(bits, dtype):
    packed = torch.randint(0, 256, (2, 3, 50, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for p in (packed, packed[..., 7:31, :], packed[:, 1:]):  # contiguous and sliced views
        got = unpack_to(p, bits, dtype)
        assert got.dtype == dtype and torch.equal(got, unpack_codes(p, bits).to(dtype))


def test_value_metadata_table_equals_the_decoder():
    g = torch.Generator().manual_seed(2)
    qv = QuantizedKV.quantize(torch.randn(2, 3, 640, 64, generator=g) * 3, 2, 32, -1, "int4")
    assert qv.meta4
    for start, end in ((32, 608), (0, 640), (64, 96)):  # table path (> 256 tokens) and the direct decode
        got, want = token_meta(qv, start, end), qv.meta(start, end, torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    fp16 = QuantizedKV.quantize(torch.randn(1, 2, 320, 64, generator=g), 2, 32, -1)
    assert all(torch.equal(a, b) for a, b in zip(token_meta(fp16, 0, 320), fp16.meta(0, 320, torch.float32),
                                                 strict=True))


def test_path_is_validated():
    layer, g = _layer(CASES["int2"], tokens=64)
    query = torch.randn(2, 4, 1, 16, generator=g)
    with pytest.raises(ValueError, match="path must be one of"):
        quantized_decode_attention(query, layer, 0.25, path="fast")
    with pytest.raises(ValueError, match="path must be one of"):
        with force_path("fast"):
            pass
    with force_path("chunked"):  # the override wins over the argument
        forced = quantized_decode_attention(query, layer, 0.25, path="folded")
    assert torch.equal(forced, quantized_decode_attention(query, layer, 0.25, path="chunked"))
