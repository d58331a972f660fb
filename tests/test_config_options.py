"""One converter for option strings (CLI flags, ``NAME@field=value`` specs, benchmark overrides)."""

import dataclasses

import pytest

from compactlm.attention.prefill_sparse import SparsePrefillConfig
from compactlm.attention.prefill_sparse import config_from_options as prefill_options
from compactlm.attention.sals import SALSConfig
from compactlm.config import BaseConfig, config_from_options, parse_spec
from compactlm.errors import ConfigError
from compactlm.kv.config import KVQuant
from compactlm.quant import APTQ


@dataclasses.dataclass(frozen=True)
class _Fields(BaseConfig):
    flag: bool = False
    count: int = 1
    ratio: float = 0.5
    either: float | int = 1
    maybe: int | None = None
    label: str = "x"
    free: float | int | str = 0.25
    layers: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    table: dict[str, int] = dataclasses.field(default_factory=dict)


def test_strings_become_the_annotated_types():
    cfg = config_from_options(_Fields, {"flag": "yes", "count": "16", "ratio": "1/8", "either": "8", "maybe": "none",
                                        "label": "int8", "free": "energy:0.99", "layers": "0, 1 29",
                                        "names": "q_proj,k_proj", "table": "re:.*down_proj:4,lm_head:8"})
    assert cfg.flag is True and cfg.count == 16 and cfg.ratio == 0.125
    assert cfg.either == 8 and isinstance(cfg.either, int)  # an integer spelling stays a count
    assert config_from_options(_Fields, {"either": "0.25"}).either == 0.25
    assert cfg.maybe is None and cfg.label == "int8" and cfg.free == "energy:0.99"
    assert cfg.layers == (0, 1, 29) and cfg.names == ("q_proj", "k_proj")
    assert cfg.table == {"re:.*down_proj": 4, "lm_head": 8}
    assert config_from_options(_Fields, {"free": "0.5", "flag": "false", "maybe": "3"}) == \
        _Fields(free=0.5, flag=False, maybe=3)
    # non-strings pass through untouched; dashes read as underscores
    assert config_from_options(_Fields, {"count": 3, "ratio": 0.25}) == _Fields(count=3, ratio=0.25)
    assert config_from_options(_Fields, {"maybe": "7"}).maybe == 7


def test_errors_name_the_option_and_type():
    with pytest.raises(ConfigError, match=r"has no option 'bogus'.*count"):
        config_from_options(_Fields, {"bogus": "1"})
    with pytest.raises(ConfigError, match=r"count='many' is not a whole number"):
        config_from_options(_Fields, {"count": "many"})
    with pytest.raises(ConfigError, match=r"ratio='1/0'"):
        config_from_options(_Fields, {"ratio": "1/0"})
    with pytest.raises(ConfigError, match=r"flag='maybe' is not true or false"):
        config_from_options(_Fields, {"flag": "maybe"})
    with pytest.raises(ConfigError, match=r"maybe='x' is not a whole number or none"):
        config_from_options(_Fields, {"maybe": "x"})
    with pytest.raises(ConfigError, match=r"table='a' is not a KEY:VALUE list"):
        config_from_options(_Fields, {"table": "a"})
    with pytest.raises(ConfigError, match=r"kv:int2 option group_size='big'"):
        config_from_options(KVQuant, {"bits": 2, "group_size": "big"}, what="kv:int2")


def test_parse_spec():
    assert parse_spec("int2@sinks=16@group_size=64") == ("int2", {"sinks": "16", "group_size": "64"})
    assert parse_spec(" sals ") == ("sals", {})
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        parse_spec("int2@sinks")


def test_every_config_that_takes_options():
    kv = config_from_options(KVQuant, {"bits": "2", "sinks": "16", "pre-rope": "true", "value_group_size": "none"})
    assert (kv.bits, kv.sinks, kv.pre_rope, kv.value_group_size) == (2, 16, True, None)
    sals = config_from_options(SALSConfig, {"keep": "1/8", "rank": "energy:0.99", "rank_budget": "0.5",
                                            "dense_layers": "0,1,29", "score_rope": "averaged"})
    assert (sals.keep, sals.rank, sals.rank_budget, sals.dense_layers) == (0.125, "energy:0.99", 0.5, (0, 1, 29))
    assert config_from_options(SALSConfig, {"keep": "64"}).keep == 64  # a count, not a fraction
    assert prefill_options({"threshold": "0.9", "dense_layers": "0,3"}) == \
        SparsePrefillConfig(threshold=0.9, keep_ratio=None, dense_layers=(0, 3))
    aptq = config_from_options(APTQ, {"avg_bits": "2.5", "bits_menu": "2,3,4", "clip_search": "true"})
    assert (aptq.avg_bits, aptq.bits_menu, aptq.clip_search) == (2.5, (2, 3, 4), True)
    with pytest.raises(ConfigError, match="bits"):
        config_from_options(APTQ, {"avg_bits": "2.5", "bits_menu": "2,5"})  # the config's own validation speaks


def test_method_specs_carry_their_own_options():
    from compactlm.evaluation.generate import resolve_methods
    from compactlm.models import tiny_model

    model = tiny_model("llama")
    int2, int4 = resolve_methods(model, kv="int2@sinks=16@group_size=16,int4", kv_options={"residual": 32})
    assert '"sinks": 16' in int2.description and '"group_size": 16' in int2.description
    assert '"residual": 32' in int2.description and '"residual": 32' in int4.description
    assert '"sinks": 0' in int4.description  # one name's options do not leak into the next
    with pytest.raises(ConfigError, match="kv:int2 has no option 'sink'"):
        resolve_methods(model, kv="int2@sink=16")
    with pytest.raises(ConfigError, match="kv:int2 fixes bits=2"):
        resolve_methods(model, kv="int2@bits=4")
    with pytest.raises(ConfigError, match="takes no options"):
        resolve_methods(model, kv="full@sinks=4")
