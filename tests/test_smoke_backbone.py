"""The real shipped backbone (SmolLM2-135M-Instruct, from its GGUF) through the MM-LLM."""

import pytest

from models.mmllm import MMLLM
from models.profiles import load_profile

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def local():
    return MMLLM.from_profile(load_profile("local"))


def test_smollm2_knows_the_capital_of_france(local):
    out = local.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=30)
    print(f"SmolLM2: {out.text!r}")
    assert "Paris" in out.text
    assert out.spans == []


def test_smollm2_has_the_signal_vocabulary_and_a_chat_template(local):
    b = local.backbone
    assert b.hidden_size == 576
    assert b.tokenizer.convert_ids_to_tokens(b.signal_ids["image"]) == ["[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]"]
    assert len(b.signal_ids["audio"]) == 8
