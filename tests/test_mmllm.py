"""The composition on the tiny profile: losses, generation with signal spans, trained-weight files."""

import pytest
import torch

from models.errors import UntrainedProjectorError
from models.mmllm import MMLLM, Example


@pytest.fixture
def mm(tiny_profile):
    torch.manual_seed(0)
    return MMLLM.from_profile(tiny_profile, require_trained=False)


def _conversation(mm, user: str, answer: str) -> Example:
    b = mm.backbone
    prompt = b.chat_ids([{"role": "user", "content": user}])
    full = b.chat_ids([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                      add_generation_prompt=False)
    labels = [-100] * len(prompt) + full[len(prompt):]
    return Example(full, labels)


def test_text_loss_with_spliced_audio_features(mm):
    ex = _conversation(mm, "<audio>\nWhat is said?", "hello")
    ex.features = {"audio": mm.encode("audio", [torch.zeros(16000).numpy()])}
    losses = mm([ex])
    assert torch.isfinite(losses.text) and losses.alignment is None
    losses.loss.backward()
    grads = [p.grad for p in mm.input_projector("audio").parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the loss reaches the projector


def test_alignment_loss_targets_the_generators_text_encoder(mm):
    ex = _conversation(mm, "draw a red circle", "here " + "".join(f"[IMG{i}]" for i in range(4)))
    ex.targets = {"image": [mm.generator("image").text_conditioning(["a red circle"])]}
    ex.targets["image"] = [{k: v[0] for k, v in ex.targets["image"][0].items()}]
    losses = mm([ex])
    assert losses.alignment is not None and torch.isfinite(losses.alignment)
    assert torch.allclose(losses.loss, losses.text + losses.alignment)


def test_untrained_projectors_are_refused_by_name(tiny_profile):
    mm = MMLLM.from_profile(tiny_profile)  # require_trained by default
    with pytest.raises(UntrainedProjectorError, match="image input projector"):
        mm.input_projector("image")
    with pytest.raises(UntrainedProjectorError, match="audio output projector"):
        mm.output_projector("audio")


def test_generation_returns_spans_with_the_generators_conditioning(mm):
    b = mm.backbone
    plain = mm.generate([{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert plain.spans == []
    # Make [IMG0] the greedy choice where the model's favourite token was (tied embeddings):
    favourite = plain.token_ids[0]
    with torch.no_grad():
        b.input_embeddings().weight[b.signal_ids["image"][0]] = 2 * b.input_embeddings().weight[favourite]
    out = mm.generate([{"role": "user", "content": "hi"}], max_new_tokens=6)
    assert out.text.startswith("[IMG0][IMG1][IMG2][IMG3]")  # the span was completed by the decoder
    span = out.spans[0]
    assert (span.modality, out.text[span.start:span.end]) == ("image", "[IMG0][IMG1][IMG2][IMG3]")
    shapes = mm.generator("image").conditioning_shapes()
    assert {k: tuple(v.shape) for k, v in span.conditioning.items()} == shapes
    images = mm.generator("image").generate({k: v.unsqueeze(0) for k, v in span.conditioning.items()})
    assert images[0].size[0] > 0


def test_generation_with_an_image_input(mm):
    from PIL import Image

    out = mm.generate([{"role": "user", "content": "what is this?"}], images=[Image.new("RGB", (40, 30), "red")],
                      max_new_tokens=4)
    assert len(out.token_ids) <= 4


def test_trained_state_round_trip_gives_identical_outputs(tiny_profile, tmp_path):
    torch.manual_seed(0)
    mm = MMLLM.from_profile(tiny_profile, require_trained=False)
    mm.input_projector("image")
    mm.backbone.enable_lora()
    with torch.no_grad():  # make the adapters non-trivial (LoRA B starts at zero)
        for name, p in mm.backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        mm.backbone.input_embeddings().weight[mm.backbone.new_token_ids] += 0.5
    weights = tmp_path / "trained.safetensors"
    mm.save_trained(weights)
    saved = set(mm.trained_state())
    assert not any(k.startswith("encoder") for k in saved)  # frozen parts are not saved
    assert any("lora" in k for k in saved) and "backbone.new_token_embeddings" in saved

    profile = tiny_profile.model_copy(update={"projector_weights": str(weights)})
    torch.manual_seed(123)  # a different random init must not matter
    again = MMLLM.from_profile(profile)
    feats = mm.encode("image", [__import__("PIL.Image", fromlist=["Image"]).new("RGB", (32, 32), "blue")])
    assert torch.equal(mm.project("image", feats)[0], again.project("image", feats)[0])
    ex = _conversation(mm, "<image>\nwhat colour?", "blue")
    ex.features = {"image": feats}
    assert torch.allclose(mm([ex]).loss, again([ex]).loss)


def test_parameter_counts_show_the_trainable_share(mm):
    mm.backbone.freeze()
    mm.input_projector("image")
    counts = mm.parameter_counts()
    assert counts["backbone"][0] == 0
    assert counts["input_projector.image"][0] == counts["input_projector.image"][1] > 0


def test_batched_generation_matches_one_at_a_time(mm):
    from PIL import Image

    mm.backbone.enable_lora()  # the batch must go through the adapted model the same way
    with torch.no_grad():
        for name, p in mm.backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    requests = [
        ([{"role": "user", "content": "what is this?"}], {"image": [Image.new("RGB", (40, 30), "red")]}),
        ([{"role": "user", "content": "a much longer question that needs padding on the left"}], {}),
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "<image>\nand this?"}],
         {"image": [Image.new("RGB", (32, 32), "blue")]}),
    ]
    batched = mm.generate_many(requests, max_new_tokens=6)
    alone = [mm.generate(messages, images=media.get("image"), max_new_tokens=6) for messages, media in requests]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert [b.text for b in batched] == [a.text for a in alone]
    assert len({tuple(b.token_ids) for b in batched}) > 1  # rows differ, so a mix-up would show


def test_the_decode_copy_runs_in_the_profiles_decode_dtype(tiny_profile):
    from PIL import Image

    torch.manual_seed(0)
    profile = tiny_profile.model_copy(update={"backbone": tiny_profile.backbone.model_copy(
        update={"decode_dtype": "bfloat16"})})
    mm = MMLLM.from_profile(profile, require_trained=False)
    out = mm.generate([{"role": "user", "content": "what is this?"}], images=[Image.new("RGB", (40, 30), "red")],
                      max_new_tokens=4)
    assert 1 <= len(out.token_ids) <= 4
    assert mm.decoder.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert next(mm.backbone.model.parameters()).dtype == torch.float32  # training keeps its precision
