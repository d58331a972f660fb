"""Recipes: every shipped recipe validates; every impossible recipe fails before any work, naming the fix."""

import pytest
import yaml

from compactlm.errors import ConfigError
from compactlm.recipes import Recipe, load_recipe, parse_recipe, shipped_recipes
from compactlm.recipes.schema import CONFIG_MODULES, import_config_modules

REQUIRED = ["w4-g64", "aptq-3bit", "aptq-2.5bit+kv4+sals", "50pct-barber+w4"]


def test_the_required_recipes_are_shipped():
    assert set(REQUIRED) <= set(shipped_recipes())


@pytest.mark.parametrize("name", REQUIRED)
def test_shipped_recipe_validates_and_round_trips(name):
    missing = import_config_modules()
    if missing:
        pytest.skip(f"config modules not landed yet: {missing}")
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.steps
    again = Recipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again.to_dict() == recipe.to_dict()


def _recipe(*steps, **extra):
    return yaml.safe_dump({"name": "t", "steps": list(steps), **extra})


@pytest.mark.parametrize("steps,match", [
    ([{"type": "Frobnicate"}], "unknown step type 'Frobnicate'"),
    ([{"type": "gptq", "bitz": 4}], r"step 1 \(gptq\): GPTQ has no field\(s\) \['bitz'\]"),
    ([{"type": "GPTQ", "bits": 5}], "step 1"),
    ([{"type": "GPTQ", "bits": 4}, {"type": "rtn", "bits": 4}], "second quantize step"),
    ([{"type": "kv", "bits": 4}, {"type": "GPTQ", "bits": 4}], "quantize step after a kv step"),
    ([{"type": "sals"}, {"type": "wanda"}], "prune step after a attention step"),
    ([{"type": "GPTQ", "bits": 3}, {"type": "export", "format": "compressed-tensors"}], r"cannot hold \[3\]-bit"),
    ([{"type": "APTQ", "avg_bits": 2.5, "bits_menu": [2, 3, 4]}, {"type": "export", "format": "compressed-tensors"}],
     r"cannot hold \[3\]-bit"),
    ([{"type": "wanda"}, {"type": "export", "format": "compressed-tensors"}], "needs a quantize step"),
    ([{"type": "export", "format": "onnx"}], "Export.format"),
    ([{"type": "sals"}, {"type": "quest"}], "two decode attention configs"),
    ([{"bits": 4}], "missing 'type'"),
    (["GPTQ"], "each step is a mapping"),
])
def test_impossible_recipes_fail_with_the_fix(steps, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe(_recipe(*steps))


def test_recipe_level_errors():
    with pytest.raises(ConfigError, match="unknown key"):
        parse_recipe(yaml.safe_dump({"steps": [{"type": "rtn"}], "stepz": 1}))
    with pytest.raises(ConfigError, match="needs 'steps'"):
        parse_recipe("name: x\n")
    with pytest.raises(ConfigError, match="calibration.source"):
        parse_recipe(_recipe({"type": "rtn"}, calibration={"source": "wiki"}))
    with pytest.raises(ConfigError, match="evaluate has no field"):
        parse_recipe(_recipe({"type": "rtn"}, evaluate={"pplwindows": 3}))
    with pytest.raises(ConfigError, match="evaluate.speed_dtype must be bf16, fp16 or fp32, got 'int8'"):
        parse_recipe(_recipe({"type": "rtn"}, evaluate={"speed_dtype": "int8"}))
    with pytest.raises(ConfigError, match="evaluate.ruler_dtype must be bf16, fp16 or fp32, got 'fp64'"):
        parse_recipe(_recipe({"type": "rtn"}, evaluate={"ruler_dtype": "fp64"}))
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_recipe("steps: [")
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_aliases_resolve_nested_and_a_prefill_plus_decode_pair_is_allowed():
    r = parse_recipe(_recipe({"type": "barber", "init": {"type": "wanda", "sparsity": 0.4}},
                             {"type": "gptq", "bits": 4}, {"type": "kv", "bits": 4},
                             {"type": "prefill"}, {"type": "sals"}))
    assert [type(s).__name__ for s in r.steps] == ["Barber", "GPTQ", "KVQuant", "SparsePrefillConfig", "SALSConfig"]
    assert type(r.steps[0].init).__name__ == "Wanda" and r.steps[0].init.sparsity == 0.4
    assert r.plan["prefill"] is r.steps[3] and r.plan["decode"] is r.steps[4]


def test_config_modules_are_importable():
    assert len(CONFIG_MODULES) >= 10
    assert import_config_modules() == []
