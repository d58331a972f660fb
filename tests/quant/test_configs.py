"""Quantization configs: dict/JSON round trip and clear errors for bad values."""

import pytest
import torch

import compactlm
from compactlm.config import BaseConfig
from compactlm.errors import ConfigError, DataError
from compactlm.models import tiny_model
from compactlm.quant import APTQ, GPTQ, RTN

CONFIGS = [
    RTN(bits=3, group_size=32, symmetric=True, clip_search=True, ignore=(".*down_proj",)),
    GPTQ(bits=2, group_size=-1, act_order=False, damp=0.05, block_size=32),
    APTQ(avg_bits=2.5, bits_menu=(2, 4), pin={".*layers\\.0\\..*": 4}, share_fused=False, probes=4),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trip(cfg):
    assert BaseConfig.from_dict(cfg.to_dict()) == cfg
    assert BaseConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("make, match", [
    (lambda: GPTQ(bits=5), "bits=5 is not supported"),
    (lambda: RTN(group_size=0), "group_size"),
    (lambda: GPTQ(damp=0.0), "damp"),
    (lambda: GPTQ(block_size=0), "block_size"),
    (lambda: RTN(ignore="lm_head"), "list of regexes"),
    (lambda: RTN(ignore=("([",)), "not a valid regex"),
    (lambda: APTQ(avg_bits=5.0), "outside the menu"),
    (lambda: APTQ(bits_menu=(2, 5)), "bits_menu"),
    (lambda: APTQ(pin={".*": 7}), "pinned widths"),
])
def test_invalid_values_raise_config_error(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_group_size_100_on_width_576_names_the_layer():
    model = tiny_model("llama", hidden_size=576)
    with pytest.raises(ConfigError, match=r"group_size=100 does not divide the input width 576 of "
                                          r"model\.layers\.0\.self_attn\.q_proj"):
        compactlm.quantize(model, RTN(bits=4, group_size=100))


def test_calibrated_methods_need_calibration_data(tiny_llama):
    for cfg in (GPTQ(bits=4, group_size=16), APTQ(avg_bits=3.0, group_size=16)):
        with pytest.raises(DataError, match="needs calibration data"):
            compactlm.quantize(tiny_llama, cfg, calib=None)


def test_a_layer_we_cannot_quantize_is_a_clear_error(tiny_llama):
    compactlm.quantize(tiny_llama, RTN(bits=4, group_size=16))
    with pytest.raises(ConfigError, match="already quantized"):
        compactlm.quantize(tiny_llama, RTN(bits=4, group_size=16))
    from compactlm.quant.common import check_quantizable

    with pytest.raises(ConfigError, match="only torch.nn.Linear"):
        check_quantizable("model.embed_tokens", torch.nn.Embedding(4, 4))


def test_nan_calibration_is_a_clear_error_naming_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    from compactlm.errors import CalibrationError

    with pytest.raises(CalibrationError, match="layer 1|layers.0"):
        compactlm.quantize(tiny_llama, GPTQ(bits=4, group_size=16), calib=torch.randint(0, 256, (2, 16)))
