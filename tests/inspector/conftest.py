"""Fixtures for the inspector tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny4():
    from compactlm.models import tiny_model

    return tiny_model("llama", num_hidden_layers=4)


@pytest.fixture
def ids():
    return torch.randint(3, 256, (4, 48), generator=torch.Generator().manual_seed(1))

