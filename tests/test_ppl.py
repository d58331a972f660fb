import math

import pytest
import torch

from compactlm.evaluation import perplexity
from compactlm.models import tiny_model


def test_perplexity_equals_hand_computation():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (5, 17), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, input_ids=ids, batch_size=2, show_progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(row[None]).logits[0].double()
            for t in range(row.numel() - 1):
                total -= torch.log_softmax(logits[t], -1)[row[t + 1]].item()
                count += 1
    assert result.tokens == count == 5 * 16
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 256, (6, 12))
    a = perplexity(model, input_ids=ids, batch_size=1, show_progress=False)
    b = perplexity(model, input_ids=ids, batch_size=6, show_progress=False)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)


@pytest.mark.default_model
def test_default_model_perplexity_matches_the_anchor(default_model):
    """PPL-wiki-512 on the first 32 windows: ANCHORS.md measured 22.79 (fp32) on 16,352 tokens."""
    model, tok = default_model
    result = perplexity(model, tok, windows=32, show_progress=False)
    assert result.tokens == 16_352
    assert math.isfinite(result.ppl) and result.ppl == pytest.approx(22.79, abs=0.05)
