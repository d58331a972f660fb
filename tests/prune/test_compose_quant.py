"""Prune then quantize: GPTQ (issue 3) keeps the pruned weights at exactly zero."""

import pytest
import torch

import compactlm
from compactlm.models import tiny_model
from compactlm.prune import Wanda, is_nm

gptq = pytest.importorskip("compactlm.quant.gptq")
packed = pytest.importorskip("compactlm.modules.packed_linear")


@pytest.mark.parametrize("spec", [dict(sparsity=0.5), dict(pattern="2:4")])
def test_wanda_then_w4_gptq_respects_the_mask(spec):
    model = tiny_model("llama")
    calib = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    compactlm.compress(model, Wanda(**spec), calib=calib, batch_size=4)
    masks = {n: m.weight != 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    compactlm.compress(model, gptq.GPTQ(bits=4, group_size=16), calib=calib)
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, packed.PackedLinear):
            w = m.dequantize_weight()
            assert (w[~masks[name]] == 0).all(), name
            assert float((w == 0).float().mean()) >= 0.5
            if "pattern" in spec:
                assert is_nm(w != 0, 2, 4) or (w == 0).float().mean() > 0.5, name
            checked += 1
    assert checked == len(masks)
