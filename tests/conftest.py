import os

import pytest

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
