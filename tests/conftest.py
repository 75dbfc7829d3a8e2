import os

import pytest
import torch

# Nothing in the test suite may reach a model hub; fail fast instead of waiting on DNS.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_profile():
    from models.profiles import load_profile

    return load_profile("tiny")


@pytest.fixture
def tiny_backbone(tiny_profile):
    from models.backbone import Backbone

    return Backbone.from_spec(tiny_profile.backbone)


@pytest.fixture(scope="module")
def chaotic_mm():
    """The tiny model with larger random weights, so it writes varied text rather than newlines."""
    from models.mmllm import MMLLM
    from models.profiles import load_profile

    mm = MMLLM.from_profile(load_profile("tiny"), require_trained=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in mm.backbone.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return mm
