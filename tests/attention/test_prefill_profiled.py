"""``sparse-prefill-profiled``: the profiler's dense layers added to the base config, cached per model folder."""

import dataclasses
import json

import pytest
import torch

from compactlm.attention import prefill_profiled as pp
from compactlm.attention.prefill_profile import profile_layers
from compactlm.attention.prefill_sparse import SparsePrefillConfig
from compactlm.errors import ConfigError
from compactlm.evaluation.methods import build_method

# Tiny shapes: groups of 32 queries over 16-token blocks, so 256-token prompts have many groups to select in.
SMALL = dict(share_len=32, block_size=16, dense_head=0, dense_tail=32, keep_ratio=0.1, impl="reference")


def batches(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, 256), generator=gen) for _ in range(2)]


@pytest.fixture
def folder_model(tiny_llama, tmp_path, monkeypatch):
    """The tiny model as if loaded from a local folder, with the cache under tmp_path and the essays stubbed."""
    (tmp_path / "model").mkdir()
    tiny_llama.config._name_or_path = str(tmp_path / "model")
    monkeypatch.setenv("COMPACTLM_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(pp, "calibration_prompts", lambda model, tok=None: calls.append(1) or batches())
    tiny_llama.calibration_calls = calls
    return tiny_llama


def test_profiled_layers_are_the_profilers_proposal_added_to_the_config(tiny_llama):
    cfg = SparsePrefillConfig(**SMALL, dense_layers=(1,))
    got = pp.profiled_config(tiny_llama, cfg, batches=batches())
    prof = profile_layers(tiny_llama, batches(), cfg, min_mass=pp.MIN_MASS, query_stride=pp.QUERY_STRIDE)
    assert prof.proposed, f"random attention should lose mass at keep 0.1; masses {prof.mass}"
    assert got.dense_layers == tuple(sorted({1, *prof.proposed}))
    assert dataclasses.replace(got, dense_layers=cfg.dense_layers) == cfg  # nothing else changes


def test_profile_is_cached_per_folder_and_config(folder_model, monkeypatch):
    cfg = SparsePrefillConfig(**SMALL)
    first = pp.profiled_config(folder_model, cfg)
    path = pp.cache_path(folder_model, cfg)
    assert path is not None and path.is_file()
    assert tuple(json.loads(path.read_text())["proposed"]) == first.dense_layers
    assert folder_model.calibration_calls == [1]

    def no_profile(*args, **kwargs):
        raise AssertionError("a cached profile must not be recomputed")

    monkeypatch.setattr("compactlm.attention.prefill_profile.profile_layers", no_profile)
    assert pp.profiled_config(folder_model, cfg) == first
    # the impl does not change which blocks are chosen, so it shares the cache; the budget does not
    assert pp.cache_path(folder_model, dataclasses.replace(cfg, impl="gather")) == path
    assert pp.cache_path(folder_model, dataclasses.replace(cfg, keep_ratio=0.5)) != path


def test_preset_method_carries_the_profiled_config(folder_model):
    method = build_method(folder_model, "attn", "sparse-prefill-profiled", {"share_len": "32", "block_size": "16",
                                                                          "dense_head": "0", "dense_tail": "32",
                                                                          "keep_ratio": "0.1", "impl": "reference"})
    assert method.name == "sparse-prefill-profiled" and not method.shares_prefill
    expected = pp.profiled_config(folder_model, SparsePrefillConfig(**SMALL))  # read back from the cache
    assert expected.dense_layers and folder_model.calibration_calls == [1]
    assert json.loads(method.description.split(" ", 5)[-1]) == json.loads(expected.to_json())
    ids = batches(seed=3)[0]
    with torch.no_grad(), method.attach(folder_model) as built:
        folder_model(input_ids=ids, use_cache=False)
    assert set(built[0].state.sparse_calls) == set(range(2)) - set(expected.dense_layers)


@pytest.mark.parametrize("first", ["compactlm.attention.prefill_profile", "compactlm.attention.prefill_profiled",
                                   "compactlm.attention.prefill_sparse"])
def test_each_prefill_module_imports_first(first):
    """prefill_sparse registers the preset by importing prefill_profiled: no import order may be circular."""
    import subprocess
    import sys

    code = f"import {first}; from compactlm.evaluation.methods import METHOD_BUILDERS; " \
           "assert 'attn:sparse-prefill-profiled' in METHOD_BUILDERS"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_in_memory_model_without_tokenizer_raises(tiny_llama):
    with pytest.raises(ConfigError, match="tokenizer"):
        pp.profiled_config(tiny_llama, SparsePrefillConfig(**SMALL))
