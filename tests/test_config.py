import dataclasses
import json

import pytest

from compactlm.config import BaseConfig, PerLayer
from compactlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class _Toy(BaseConfig):
    bits: int = 4
    names: tuple = ("a", "b")

    def __post_init__(self):
        if self.bits not in (2, 4):
            raise ConfigError(f"bits must be 2 or 4, got {self.bits}")


def test_round_trip_dict_and_json():
    cfg = _Toy(bits=2)
    assert BaseConfig.from_dict(cfg.to_dict()) == cfg
    assert BaseConfig.from_json(cfg.to_json()) == cfg
    per = PerLayer({"re:.*down_proj": _Toy(bits=4), "_default": _Toy(bits=2)})
    back = BaseConfig.from_json(json.dumps(per.to_dict()))
    assert back.config_for("model.layers.0.mlp.down_proj") == _Toy(bits=4)
    assert back.config_for("model.layers.0.self_attn.q_proj") == _Toy(bits=2)


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="bits must be 2 or 4"):
        _Toy(bits=5)
    with pytest.raises(ConfigError, match="unknown config type 'Nope'"):
        BaseConfig.from_dict({"type": "Nope"})
    with pytest.raises(ConfigError, match="has no field"):
        BaseConfig.from_dict({"type": "_Toy", "bitz": 3})
    with pytest.raises(ConfigError, match="'type' key"):
        BaseConfig.from_dict({"bits": 3})
    with pytest.raises(ConfigError, match="not a valid regex"):
        PerLayer({"re:(": _Toy()})
    with pytest.raises(ConfigError, match="at least one entry"):
        PerLayer({})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _Toy().bits = 2
