import pytest
import torch

from models.backbone import FEATURE, PAD, PLACEHOLDERS, Backbone, count_parameters
from models.errors import ConfigError, MediaError
from models.specs import BackboneSpec, LoraSpec


@pytest.mark.parametrize("source", ["tiny:llama", "tiny:qwen2"])
def test_new_tokens_are_single_special_tokens(source):
    backbone = Backbone.from_spec(BackboneSpec(source=source, signal_tokens={"image": 3, "audio": 5}))
    tok = backbone.tokenizer
    assert len(backbone.signal_ids["image"]) == 3 and len(backbone.signal_ids["audio"]) == 5
    for text in ["[IMG0]", "[IMG2]", "[AUD4]", *PLACEHOLDERS.values()]:
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1
    assert backbone.input_embeddings().weight.shape[0] >= len(tok)
    assert len(set(backbone.new_token_ids)) == 3 + 5 + 3


def test_splice_puts_features_exactly_at_the_placeholders(tiny_backbone):
    b = tiny_backbone
    ids = b.chat_ids([{"role": "user", "content": "a <image> b <audio> c <image>"}])
    image_1, image_2 = torch.full((3, b.hidden_size), 1.0), torch.full((2, b.hidden_size), 2.0)
    audio = torch.full((4, b.hidden_size), 3.0)
    labels = list(range(len(ids)))
    embeds, token_map, new_labels = b.splice(ids, {"image": [image_1, image_2], "audio": [audio]}, labels)
    assert embeds.shape[0] == len(ids) - 3 + 3 + 2 + 4 == len(token_map) == len(new_labels)
    positions = [i for i, t in enumerate(ids) if t in b.placeholder_ids.values()]
    first = positions[0]
    assert torch.equal(embeds[first:first + 3], image_1)  # the first image, in place of the first <image>
    assert token_map[first:first + 3] == [FEATURE] * 3 and new_labels[first:first + 3] == [-100] * 3
    second = positions[1] + 2  # shifted by the first image's extra 2 positions
    assert torch.equal(embeds[second:second + 4], audio)
    third = positions[2] + 2 + 3
    assert torch.equal(embeds[third:third + 2], image_2)
    text_rows = [i for i, t in enumerate(token_map) if t >= 0]
    expected = b.input_embeddings()(torch.tensor([t for t in token_map if t >= 0]))
    assert torch.allclose(embeds[text_rows], expected)


def test_placeholder_and_media_counts_must_agree(tiny_backbone):
    ids = tiny_backbone.chat_ids([{"role": "user", "content": "<image> <image>"}])
    with pytest.raises(MediaError, match="2 <image> placeholder"):
        tiny_backbone.splice(ids, {"image": [torch.zeros(1, tiny_backbone.hidden_size)]})


def test_collate_pads_left_for_generation_and_right_for_training(tiny_backbone):
    b = tiny_backbone
    short, long = b.splice(b.chat_ids([{"role": "user", "content": "hi"}]), {}, None), \
        b.splice(b.chat_ids([{"role": "user", "content": "hello there"}]), {}, None)
    left = b.collate([short, long], padding_side="left")
    right = b.collate([short, long], padding_side="right")
    n = short[0].shape[0]
    assert left.attention_mask[0, -n:].all() and not left.attention_mask[0, :-n].any()
    assert right.attention_mask[0, :n].all() and not right.attention_mask[0, n:].any()
    assert (left.token_map[0, :-n] == PAD).all()


def test_signal_states_are_read_at_the_signal_positions(tiny_backbone):
    b = tiny_backbone
    img = b.signal_ids["image"]
    token_map = torch.tensor([[5, *img, 7, 8, *img[:2], 9], [*img, 1, 2, 3, 4, 5, 6]])
    hidden = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1).expand(2, 10, 3)
    spans = b.signal_states(hidden, token_map, "image")
    assert [(row, start) for row, start, _ in spans] == [(0, 1), (1, 0)]  # the broken span is not read
    assert torch.equal(spans[0][2][:, 0], torch.tensor([1.0, 2, 3, 4]))
    assert torch.equal(spans[1][2][:, 0], torch.tensor([10.0, 11, 12, 13]))


def test_lora_trains_adapters_and_new_token_rows_only(tiny_backbone):
    b = tiny_backbone
    b.freeze()
    assert count_parameters(b)[0] == 0
    base = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    b.enable_lora(LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = count_parameters(b)
    config = b.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    q = 4 * (config.hidden_size + config.num_attention_heads * head_dim)
    v = 4 * (config.hidden_size + config.num_key_value_heads * head_dim)
    expected = config.num_hidden_layers * (q + v) + len(b.new_token_ids) * config.hidden_size
    assert trainable == expected
    assert trainable / total < 0.2
    names = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens" in n for n in names)
    # frozen weights are untouched by wrapping
    for name, p in b.model.named_parameters():
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        if plain in base and not p.requires_grad:
            assert torch.equal(p, base[plain])


def test_lora_on_modules_the_model_lacks_is_a_config_error(tiny_backbone):
    with pytest.raises(ConfigError, match="not in this model"):
        tiny_backbone.enable_lora(LoraSpec(target_modules=["c_attn"]))
