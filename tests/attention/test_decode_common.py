"""The budget validator shared by SALS and the decode baselines: every error path, for every config class."""

from __future__ import annotations

import re
import types

import pytest

from compactlm.attention.decode_baselines import OracleConfig, QuestConfig, StreamingConfig
from compactlm.attention.decode_common import DecodeBudget, validate_budget
from compactlm.attention.sals import SALSConfig
from compactlm.config import BaseConfig
from compactlm.errors import ConfigError

CLASSES = (DecodeBudget, SALSConfig, StreamingConfig, QuestConfig, OracleConfig)

BAD = [
    ("keep", 0, "keep must be a fraction in (0, 1] or a positive int count, got 0"),
    ("keep", -3, "keep must be a fraction"),
    ("keep", True, "keep must be a fraction"),
    ("keep", "0.5", "keep must be a fraction"),
    ("keep", 1.5, "keep=1.5 is a float above 1"),
    ("sink", -1, "sink must be an int ≥ 0, got -1"),
    ("sink", 2.0, "sink must be an int ≥ 0"),
    ("dense_first", -1, "dense_first must be an int ≥ 0"),
    ("dense_last", None, "dense_last must be an int ≥ 0"),
    ("recent", 0, "recent must be an int ≥ 1 (the new token itself)"),
    ("recent", 1.0, "recent must be an int ≥ 1"),
    ("dense_layers", (0, -1), "dense_layers must be layer indices ≥ 0"),
    ("dense_layers", ("a",), "dense_layers must be layer indices ≥ 0"),
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("field", "value", "message"), BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_every_config_names_its_class_and_field(cls, field, value, message):
    with pytest.raises(ConfigError, match=re.escape(f"{cls.__name__}.{message}")):
        cls(**{field: value})


@pytest.mark.parametrize(("field", "value"), [("rank", 0), ("rank", 2.5), ("score_dims", -0.1), ("score_dims", "x")])
def test_sals_fraction_fields(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"SALSConfig.{field}")):
        SALSConfig(**{field: value})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_valid_budgets_pass_and_dense_layers_become_a_tuple(cls):
    cfg = cls(keep=1.0, sink=0, recent=1, dense_first=0, dense_last=0, dense_layers=[3, 0])
    assert cfg.dense_layers == (3, 0)
    assert BaseConfig.from_json(cfg.to_json()) == cfg
    assert cls(keep=7).keep == 7 and cls(dense_layers=None).dense_layers is None


def test_validator_checks_only_the_fractions_it_is_given():
    budget = types.SimpleNamespace(keep=0.5, width=0, sink=0, recent=1, dense_first=0, dense_last=0,
                                   dense_layers=None)
    validate_budget(budget)  # `width` is not a budget fraction unless named
    with pytest.raises(ConfigError, match=re.escape("SimpleNamespace.width must be a fraction")):
        validate_budget(budget, fractions=("keep", "width"))
