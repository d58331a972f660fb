"""Save/load round trip in our format and the compressed-tensors export, decompressed by compressed-tensors."""

import json

import pytest
import torch

import compactlm
from compactlm.errors import ConfigError
from compactlm.export.compressed_tensors import export_compressed_tensors
from compactlm.modules.packed_linear import PackedLinear
from compactlm.quant import APTQ, RTN, quant_summary

IDS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [3, 4])
def test_save_load_round_trip(tiny_llama, tmp_path, bits):
    compactlm.quantize(tiny_llama, RTN(bits=bits, group_size=16, symmetric=bits == 3))
    out = compactlm.save(tiny_llama, tmp_path / "q")
    loaded, tok = compactlm.models.load(out)
    assert tok is None
    assert quant_summary(loaded)["bits_per_layer"] == quant_summary(tiny_llama)["bits_per_layer"]
    for (n, a), (_, b) in zip(tiny_llama.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, tiny_llama(IDS).logits)
    generated = loaded.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


def test_save_is_atomic_and_refuses_to_clobber(tiny_llama, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        compactlm.save(tiny_llama, tmp_path / "q")
    assert (tmp_path / "q" / "keep.txt").read_text() == "x"


def _decompress_with_compressed_tensors(folder):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["quant_method"] == "compressed-tensors"
    tensors = load_file(str(folder / "model.safetensors"))
    weights = {}
    for group in cfg["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
        for name in group["targets"]:
            local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
            weights[name] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return weights, cfg


@pytest.mark.parametrize("symmetric", [False, True])
def test_export_decompresses_exactly_with_compressed_tensors(tiny_llama, tmp_path, symmetric):
    pytest.importorskip("compressed_tensors")
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    compactlm.quantize(tiny_llama, APTQ(avg_bits=3.0, group_size=16, symmetric=symmetric), calib=calib)
    out = export_compressed_tensors(tiny_llama, tmp_path / "ct", dtype="fp32")
    weights, cfg = _decompress_with_compressed_tensors(out)
    packed = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, PackedLinear)}
    assert set(weights) == set(packed) and len(cfg["config_groups"]) == 2  # 2-bit and 4-bit groups
    assert cfg["ignore"] == ["lm_head"]
    for name, m in packed.items():
        assert torch.equal(weights[name].float(), m.dequantize_weight()), name


def test_export_in_bf16_matches_bf16_scales(tiny_llama, tmp_path):
    pytest.importorskip("compressed_tensors")
    compactlm.quantize(tiny_llama, RTN(bits=4, group_size=16))
    weights, _ = _decompress_with_compressed_tensors(export_compressed_tensors(tiny_llama, tmp_path / "ct"))
    m = tiny_llama.model.layers[1].mlp.down_proj
    from compactlm.primitives.quant import dequantize

    ref = dequantize(m.codes(), m.scale.to(torch.bfloat16), m.zero, dtype=torch.bfloat16)
    assert torch.equal(weights["model.layers.1.mlp.down_proj"], ref)


def test_three_bit_export_is_refused(tiny_llama, tmp_path):
    compactlm.quantize(tiny_llama, RTN(bits=3, group_size=16))
    with pytest.raises(ConfigError, match="3-bit.*vLLM"):
        export_compressed_tensors(tiny_llama, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
