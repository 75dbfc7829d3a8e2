"""Image and audio generators on tiny Stable Diffusion / AudioLDM-2 pipelines of the real classes.

The pipelines are built once per module into a private SIGNALGRAPH_HOME through
`resolve("tiny:...")` and loaded through the same `from_pretrained` path as real weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.assets import resolve
from models.errors import AssetMissingError, ConfigError
from models.generators import (
    AudioGenerator,
    ConditioningShapeError,
    ImageGenerator,
    build_audio_generator,
    build_image_generator,
)
from models.specs import AudioGeneratorSpec, ImageGeneratorSpec

CAPTIONS = ["a red square on a blue field", "rain"]
SECONDS = 0.016  # 64 mel frames -> 256 samples at 16 kHz with the tiny vocoder


@pytest.fixture(scope="module")
def sd_path(tiny_home) -> Path:
    return resolve("tiny:stable-diffusion")


@pytest.fixture(scope="module")
def ldm_path(tiny_home) -> Path:
    return resolve("tiny:audioldm2")


@pytest.fixture(scope="module")
def image_gen(sd_path: Path) -> ImageGenerator:
    return build_image_generator(ImageGeneratorSpec(source=str(sd_path), steps=2, device="cpu"))


@pytest.fixture(scope="module")
def audio_gen(ldm_path: Path) -> AudioGenerator:
    return build_audio_generator(AudioGeneratorSpec(source=str(ldm_path), steps=2, seconds=SECONDS, device="cpu"))


def _seeded(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


# ---------------------------------------------------------------------------------------------
# images


def test_image_conditioning_shapes(image_gen: ImageGenerator) -> None:
    assert image_gen.conditioning_shapes() == {"prompt_embeds": (77, 32)}


def test_image_text_conditioning_is_the_pipelines_own_encoding(image_gen: ImageGenerator) -> None:
    cond = image_gen.text_conditioning(CAPTIONS)
    assert set(cond) == {"prompt_embeds"} and cond["prompt_embeds"].shape == (2, 77, 32)
    pipe = image_gen.pipeline
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
    torch.testing.assert_close(cond["prompt_embeds"], expected, rtol=0, atol=0)
    # and that is CLIP's last hidden state over the prompt padded to 77 tokens
    ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.input_ids)[0]
    torch.testing.assert_close(cond["prompt_embeds"], hidden)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_image_generate_from_conditioning_equals_prompt_path(image_gen: ImageGenerator, guidance: float) -> None:
    images = image_gen.generate(image_gen.text_conditioning(CAPTIONS), seed=3, guidance=guidance)
    reference = image_gen.pipeline(
        prompt=CAPTIONS, num_inference_steps=2, guidance_scale=guidance, generator=_seeded(3, 2), output_type="pil"
    ).images
    np.testing.assert_array_equal(_pixels(images), _pixels(reference))


def test_image_generate_sizes_and_determinism(image_gen: ImageGenerator) -> None:
    cond = image_gen.text_conditioning(CAPTIONS)
    first = image_gen.generate(cond, seed=0)
    assert len(first) == 2
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in first)
    np.testing.assert_array_equal(_pixels(first), _pixels(image_gen.generate(cond, seed=0)))
    assert not np.array_equal(_pixels(first), _pixels(image_gen.generate(cond, seed=1)))
    # row i uses seed + i, so a row alone with its seed gives the same image as in the batch, up to
    # the float rounding of a batch of one against two (a pixel one level apart on some CPUs)
    alone = _pixels(image_gen.generate({"prompt_embeds": cond["prompt_embeds"][1:]}, seed=1)).astype(int)
    batched = _pixels(first[1:]).astype(int)
    assert np.abs(alone - batched).max() <= 1 and np.mean(alone != batched) < 0.01
    assert np.abs(alone - _pixels(first[:1]).astype(int)).max() > 1  # and not the other row's image
    tall = image_gen.generate({"prompt_embeds": cond["prompt_embeds"][:1]}, height=48, width=32, steps=1)
    assert tall[0].size == (32, 48)


def test_image_wrong_conditioning_raises(image_gen: ImageGenerator) -> None:
    with pytest.raises(ConditioningShapeError, match=r"\(batch, 77, 32\), got \(1, 76, 32\)"):
        image_gen.generate({"prompt_embeds": torch.zeros(1, 76, 32)})
    with pytest.raises(ConfigError, match="got \\(77, 32\\)"):  # ConditioningShapeError is a ConfigError
        image_gen.generate({"prompt_embeds": torch.zeros(77, 32)})
    with pytest.raises(ConditioningShapeError, match="missing"):
        image_gen.generate({"embeds": torch.zeros(1, 77, 32)})
    with pytest.raises(ConfigError, match="multiples of 8"):
        image_gen.generate({"prompt_embeds": torch.zeros(1, 77, 32)}, height=30)


def test_image_save_load_round_trip(image_gen: ImageGenerator, tmp_path: Path) -> None:
    image_gen.pipeline.save_pretrained(tmp_path / "sd")
    reloaded = build_image_generator(ImageGeneratorSpec(source=str(tmp_path / "sd"), steps=2, device="cpu"))
    cond = image_gen.text_conditioning(CAPTIONS)
    torch.testing.assert_close(reloaded.text_conditioning(CAPTIONS), cond, rtol=0, atol=0)
    np.testing.assert_array_equal(_pixels(reloaded.generate(cond, seed=5)), _pixels(image_gen.generate(cond, seed=5)))


def test_incomplete_pipeline_folder_is_asset_missing(sd_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "sd"
    shutil.copytree(sd_path, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(AssetMissingError, match="'text_encoder'") as info:
        build_image_generator(ImageGeneratorSpec(source=str(broken), device="cpu"))
    assert str(broken) in str(info.value)

    shutil.copytree(sd_path / "text_encoder", broken / "text_encoder")
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(AssetMissingError, match="'unet'"):
        build_image_generator(ImageGeneratorSpec(source=str(broken), device="cpu"))

    with pytest.raises(AssetMissingError, match="does not exist"):
        build_image_generator(ImageGeneratorSpec(source=str(tmp_path / "nowhere"), device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetMissingError, match="model_index.json"):
        build_image_generator(ImageGeneratorSpec(source=str(tmp_path / "empty"), device="cpu"))


def test_wrong_pipeline_kind_is_a_config_error(ldm_path: Path) -> None:
    with pytest.raises(ConfigError, match="AudioLDM2Pipeline.*StableDiffusionPipeline"):
        build_image_generator(ImageGeneratorSpec(source=str(ldm_path), device="cpu"))


# ---------------------------------------------------------------------------------------------
# audio


def test_audio_conditioning_shapes(audio_gen: AudioGenerator) -> None:
    # T5 (width 32) padded to the tiny tokenizer's 32 tokens; GPT-2 (width 16) writes 8 states
    assert audio_gen.conditioning_shapes() == {"prompt_embeds": (32, 32), "generated_prompt_embeds": (8, 16)}
    assert audio_gen.sample_rate == 16000


def test_audio_text_conditioning_is_the_pipelines_encoding_padded(audio_gen: AudioGenerator) -> None:
    cond = audio_gen.text_conditioning(CAPTIONS)
    assert cond["prompt_embeds"].shape == (2, 32, 32)
    assert cond["generated_prompt_embeds"].shape == (2, 8, 16)
    assert cond["attention_mask"].shape == (2, 32)
    with torch.no_grad():  # grad mode picks other attention kernels (differences ~1e-7)
        embeds, mask, generated = audio_gen.pipeline.encode_prompt(CAPTIONS, "cpu", 1, False, max_new_tokens=8)
    n = embeds.shape[1]  # the pipeline pads T5 to the longest caption only
    assert n < 32
    torch.testing.assert_close(cond["prompt_embeds"][:, :n], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["generated_prompt_embeds"], generated, rtol=0, atol=0)
    assert torch.equal(cond["attention_mask"][:, :n], mask)
    assert not cond["prompt_embeds"][:, n:].any() and not cond["attention_mask"][:, n:].any()
    # captions longer than the fixed length are truncated, so shapes stay static
    long = audio_gen.text_conditioning(["a very long caption " * 10])
    assert long["prompt_embeds"].shape == (1, 32, 32) and bool(long["attention_mask"].all())


def test_audio_generate_from_conditioning_equals_prompt_path(audio_gen: AudioGenerator) -> None:
    waves = audio_gen.generate(audio_gen.text_conditioning(CAPTIONS), seed=2, guidance=1.0)
    reference = audio_gen.pipeline(
        prompt=CAPTIONS, num_inference_steps=2, guidance_scale=1.0, audio_length_in_s=SECONDS,
        generator=_seeded(2, 2), max_new_tokens=8,
    ).audios
    # the extra T5 positions are masked out, so only float noise may differ
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(np.stack(waves), reference, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_audio_generate_waveforms(audio_gen: AudioGenerator, guidance: float) -> None:
    cond = audio_gen.text_conditioning(CAPTIONS)
    waves = audio_gen.generate(cond, seed=0, guidance=guidance)
    assert len(waves) == 2
    for wave in waves:
        assert isinstance(wave, np.ndarray) and wave.dtype == np.float32 and wave.ndim == 1
        assert len(wave) == round(SECONDS * audio_gen.sample_rate) and np.isfinite(wave).all() and wave.any()
    again = audio_gen.generate(cond, seed=0, guidance=guidance)
    np.testing.assert_array_equal(np.stack(waves), np.stack(again))
    assert not np.array_equal(np.stack(waves), np.stack(audio_gen.generate(cond, seed=1, guidance=guidance)))


def test_audio_generate_without_mask(audio_gen: AudioGenerator) -> None:
    """A projector's output has no mask: every position is attended."""
    cond = audio_gen.text_conditioning(["rain"])
    del cond["attention_mask"]
    (wave,) = audio_gen.generate(cond, seed=0)
    assert wave.shape == (256,) and np.isfinite(wave).all()


def test_audio_wrong_conditioning_raises(audio_gen: AudioGenerator) -> None:
    cond = audio_gen.text_conditioning(["rain"])
    with pytest.raises(ConditioningShapeError, match=r"'generated_prompt_embeds'.*\(batch, 8, 16\), got \(1, 8, 32\)"):
        audio_gen.generate({**cond, "generated_prompt_embeds": torch.zeros(1, 8, 32)})
    with pytest.raises(ConditioningShapeError, match="missing"):
        audio_gen.generate({"prompt_embeds": cond["prompt_embeds"]})
    with pytest.raises(ConditioningShapeError, match="attention_mask"):
        audio_gen.generate({**cond, "attention_mask": torch.ones(1, 31, dtype=torch.long)})
    with pytest.raises(ConditioningShapeError, match="batch size"):
        audio_gen.generate({**cond, "prompt_embeds": cond["prompt_embeds"].expand(2, -1, -1)})
    with pytest.raises(ConfigError, match="at least"):
        audio_gen.generate(cond, seconds=0.0001)


def test_audio_save_load_round_trip(audio_gen: AudioGenerator, tmp_path: Path) -> None:
    audio_gen.pipeline.save_pretrained(tmp_path / "ldm")
    reloaded = build_audio_generator(
        AudioGeneratorSpec(source=str(tmp_path / "ldm"), steps=2, seconds=SECONDS, device="cpu")
    )
    cond = audio_gen.text_conditioning(CAPTIONS)
    torch.testing.assert_close(reloaded.text_conditioning(CAPTIONS), cond, rtol=0, atol=0)
    again = reloaded.generate(cond, seed=4, guidance=3.5)
    np.testing.assert_array_equal(np.stack(again), np.stack(audio_gen.generate(cond, seed=4, guidance=3.5)))


def test_audio_incomplete_folder_is_asset_missing(ldm_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "ldm"
    shutil.copytree(ldm_path, broken)
    shutil.rmtree(broken / "vocoder")
    with pytest.raises(AssetMissingError, match="'vocoder'"):
        build_audio_generator(AudioGeneratorSpec(source=str(broken), device="cpu"))
