"""The demo's step selection: the main job by default, every step with ``all``, a clear error otherwise."""

import pytest

from compactlm import demo
from compactlm.errors import ConfigError


@pytest.fixture
def fake_steps(monkeypatch):
    ran: list[str] = []

    def make(name):
        def step(ctx):
            ran.append(name)
            return [{"step": name, "method": name}]
        return step

    monkeypatch.setattr(demo, "STEPS", {n: make(n) for n in ("baseline", "quant", "pipeline")})
    return ran


def test_default_runs_only_the_main_job(fake_steps):
    rows = demo.run_demo("tiny-llama")
    assert fake_steps == list(demo.DEFAULT_STEPS) == ["pipeline"]
    assert [r["step"] for r in rows] == ["pipeline"]


def test_all_runs_every_step_in_order(fake_steps):
    demo.run_demo("tiny-llama", steps=["all"])
    assert fake_steps == ["baseline", "quant", "pipeline"]


def test_unknown_step_is_a_clear_error_before_any_work(fake_steps):
    with pytest.raises(ConfigError, match="unknown demo step.*'nope'"):
        demo.run_demo("tiny-llama", steps=["quant", "nope"])
    assert fake_steps == []
