"""A calibration killed mid-way resumes from its last finished layer with a bit-identical model."""

import pytest
import torch

from compactlm import compress, layerwise
from compactlm.errors import CalibrationError
from compactlm.layer_checkpoint import LayerCheckpoint, checkpointing
from compactlm.models import tiny_model
from compactlm.prune import Barber, Wanda
from compactlm.quant.aptq import APTQ
from compactlm.quant.gptq import GPTQ


class Interrupt(Exception):
    pass


def _killer(at_call: int, at_layer: int):
    """An ``after_layer`` hook that raises once, after layer ``at_layer`` of the ``at_call``-th driver call."""
    state = {"calls": -1, "fired": False}

    def hook(i: int) -> None:
        if i == 0:
            state["calls"] += 1
        if not state["fired"] and state["calls"] == at_call and i == at_layer:
            state["fired"] = True
            raise Interrupt(f"killed after layer {i}")

    return hook


def _model():
    return tiny_model("llama", seed=3, num_hidden_layers=4)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# APTQ: two driver calls (sensitivity, then GPTQ) and a seeded generator of Hutchinson probes that must resume
# where it stopped; Barber then GPTQ: two methods in a row, as a recipe runs them.
CASES = {
    "aptq": [APTQ(avg_bits=3.0, group_size=32, probes=2, batch_size=2)],
    "barber+gptq": [Barber(init=Wanda(sparsity=0.5), objective="block"), GPTQ(bits=4, group_size=32, batch_size=2)],
}


@pytest.mark.parametrize("case,kill_call,kill_layer", [("aptq", 1, 2), ("barber+gptq", 0, 1)])
def test_killed_run_resumes_bit_identical(tmp_path, case, kill_call, kill_layer):
    calib = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    reference = compress(_model(), list(CASES[case]), calib=calib)

    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    with pytest.raises(Interrupt), checkpointing(ckpt, after_layer=_killer(kill_call, kill_layer)):
        compress(_model(), list(CASES[case]), calib=calib)
    finished = sorted(p.name for p in ckpt.iterdir())
    assert finished, "nothing was checkpointed before the interruption"
    torch.manual_seed(123)  # a restart does not share the killed process's RNG: the checkpoint restores it
    with checkpointing(ckpt):
        resumed = compress(_model(), list(CASES[case]), calib=calib)
    _same(reference, resumed)


def test_resume_skips_finished_layers_and_refuses_other_data(tmp_path):
    calib = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(1))

    class Counter:
        true_sequential = False
        needs_reference_outputs = False

        def __init__(self):
            self.solved = []

        def new_stats(self, name, module):
            return None

        def add_batch(self, *a):
            pass

        def solve(self, name, module, stats, ctx):
            self.solved.append(ctx.index)
            return {}

        def refine_layer(self, *a):
            return None

    model = _model()
    with pytest.raises(Interrupt):
        layerwise.run(model, calib, Counter(), checkpoint=LayerCheckpoint(tmp_path, after_layer=_killer(0, 1)))
    again = Counter()
    report = layerwise.run(model, calib, again, checkpoint=LayerCheckpoint(tmp_path))
    assert sorted(set(again.solved)) == [2, 3]  # layers 0 and 1 were loaded, not recomputed
    assert len(report.records) == 4 * 7  # but their records are back in the report
    with pytest.raises(CalibrationError, match="different run"):
        layerwise.run(model, calib[:, :20], Counter(), checkpoint=LayerCheckpoint(tmp_path))
