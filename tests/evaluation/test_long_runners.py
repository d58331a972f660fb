"""The long-context runners on tiny in-process models: PPL-decode, the decode loop, method plumbing."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from compactlm.errors import ConfigError, DataError
from compactlm.evaluation.generate import greedy_decode, prefill, run_method
from compactlm.evaluation.methods import FULL, RuntimeMethod
from compactlm.evaluation.ppl_decode import protocol_name, run_ppl_decode
from compactlm.models import tiny_model


def _ids(n: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_ppl_decode_full_equals_one_teacher_forced_forward():
    """Decoding the last tokens one at a time with a full cache must give the plain forward's NLL."""
    model = tiny_model("llama")
    ids = _ids(2, 40)
    result = run_ppl_decode(model, methods=[], input_ids=ids, decoded=8)
    total = 0.0
    with torch.no_grad():
        for row in ids:
            logp = torch.log_softmax(model(row[None]).logits[0].double(), -1)
            total -= sum(logp[t, row[t + 1]].item() for t in range(31, 39))
    assert result.methods["full"]["tokens"] == 16
    assert result.methods["full"]["ppl"] == pytest.approx(math.exp(total / 16), rel=1e-4)


def _counting_method(name: str, calls: list[str], shares_prefill: bool = True) -> RuntimeMethod:
    @contextlib.contextmanager
    def attach(model):
        calls.append("attach")
        yield model

    def make_cache(model, prefill_cache):
        calls.append("make_cache:" + ("shared" if prefill_cache is not None else "fresh"))
        return FULL.make_cache(model, prefill_cache)

    return RuntimeMethod(name, attach=attach, make_cache=make_cache, shares_prefill=shares_prefill)


def test_ppl_decode_methods_share_prefill_and_match_full():
    model = tiny_model("qwen2")
    calls: list[str] = []
    methods = [_counting_method("copy", calls), _counting_method("own", calls, shares_prefill=False)]
    result = run_ppl_decode(model, methods=methods, input_ids=_ids(2, 24), decoded=6)
    assert calls.count("make_cache:shared") == 2 and calls.count("make_cache:fresh") == 2
    full = result.methods["full"]["ppl"]
    assert result.methods["copy"]["ppl"] == pytest.approx(full, rel=1e-5)
    assert result.methods["own"]["ppl"] == pytest.approx(full, rel=1e-5)
    assert list(result.methods) == ["full", "copy", "own"]


def test_ppl_decode_rejects_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="decoded"):
        run_ppl_decode(model, input_ids=_ids(1, 10), decoded=10)
    with pytest.raises(DataError, match="tokenizer"):
        run_ppl_decode(model)
    dup = _counting_method("full", [])
    with pytest.raises(ConfigError, match="share a name"):
        run_ppl_decode(model, methods=[dup], input_ids=_ids(1, 10), decoded=4)


def test_protocol_names():
    assert protocol_name(5, 4096, 256) == "PPL-decode-q"
    assert protocol_name(20, 4096, 256) == "PPL-decode"
    assert protocol_name(3, 4096, 256).startswith("PPL-decode-custom")


def test_greedy_decode_matches_full_recompute():
    """Greedy tokens from the cached decode loop equal argmax of a fresh full forward at every step."""
    model = tiny_model("mistral")
    ids = _ids(1, 12)
    cache, _ = prefill(model, ids[:, :-1])
    out = greedy_decode(model, cache, int(ids[0, -1]), 6)
    seq = ids[0].tolist()
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out == seq[12:]


def test_run_method_shared_and_own_prefill_agree():
    model = tiny_model("llama")
    ids = _ids(1, 16)
    calls: list[str] = []
    a = run_method(model, _counting_method("a", calls), ids, 5)
    b = run_method(model, _counting_method("b", calls, shares_prefill=False), ids, 5)
    assert a == b and len(a) == 5
    with pytest.raises(DataError, match="prompt_ids"):
        run_method(model, FULL, ids[:, :1], 5)
