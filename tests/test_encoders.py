"""Encoder shape contracts on tiny models of the real classes, and the real EfficientNet-lite0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.encoders import VideoEncoder, build_audio_encoder, build_image_encoder
from models.errors import ConfigError
from models.specs import AudioEncoderSpec, ImageEncoderSpec

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}  # ImageNet 281-285


def _images(n: int, size=(48, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


def _frozen(module: torch.nn.Module) -> bool:
    return not module.training and not any(p.requires_grad for p in module.parameters())


def _clip(freeze: bool = True, **options):
    spec = ImageEncoderSpec(kind="hf_vision", source="tiny:clip-vision", device="cpu", **options)
    return build_image_encoder(spec, freeze=freeze)


@pytest.fixture(scope="module")
def clip_patch():
    return _clip()


# --- images: transformers vision towers --------------------------------------------------------


def test_tiny_clip_patch_features_drop_cls(clip_patch):
    # 32x32 images in 8x8 patches: 16 patch tokens; the CLS token is dropped
    assert (clip_patch.hidden_size, clip_patch.num_tokens, clip_patch.num_prefix_tokens) == (32, 16, 1)
    features = clip_patch.encode(_images(2))
    assert features.shape == (2, 16, 32)
    assert torch.isfinite(features).all()


def test_tiny_clip_cls_patch_keeps_cls(clip_patch):
    encoder = _clip(select_feature="cls_patch")
    assert encoder.num_tokens == 17
    images = _images(1)
    with_cls = encoder.encode(images)
    assert with_cls.shape == (1, 17, 32)
    # the same layer, with the CLS token in front
    assert torch.allclose(with_cls[:, 1:], clip_patch.encode(images), atol=1e-6)


def test_select_layer_picks_a_different_hidden_state(clip_patch):
    last = _clip(select_layer=-1)
    images = _images(1)
    assert not torch.allclose(last.encode(images), clip_patch.encode(images))
    with pytest.raises(ConfigError, match="select_layer"):
        _clip(select_layer=7)


def test_siglip_has_no_cls_token_to_drop(tmp_path):
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, image_size=32, patch_size=8)
    SiglipVisionModel(config).save_pretrained(tmp_path)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    encoder = build_image_encoder(ImageEncoderSpec(kind="hf_vision", source=str(tmp_path), device="cpu"))
    assert (encoder.num_prefix_tokens, encoder.num_tokens) == (0, 16)
    assert encoder.encode(_images(1)).shape == (1, 16, 32)


def test_image_encoder_is_frozen_and_stays_frozen(clip_patch):
    assert _frozen(clip_patch)
    clip_patch.train()  # as a parent module's .train() would
    assert _frozen(clip_patch)
    assert not clip_patch.encode(_images(1)).requires_grad


def test_unfrozen_image_encoder_trains():
    encoder = _clip(freeze=False)
    assert all(p.requires_grad for p in encoder.parameters())
    assert encoder.encode(_images(1)).requires_grad


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        build_image_encoder(ImageEncoderSpec(kind="hf_vision", source=str(tmp_path), device="cpu"))


# --- video ------------------------------------------------------------------------------------


def test_video_tokens_are_frames_times_image_tokens(clip_patch):
    video = VideoEncoder(clip_patch, frames=3)
    assert video.num_tokens == 3 * 16 and video.hidden_size == 32
    frames = _images(3)
    features = video.encode([frames, frames[::-1]])
    assert features.shape == (2, 48, 32)
    # frame tokens in time order: the reversed video's first frame is the first video's last
    per_frame = clip_patch.encode(frames)
    assert torch.allclose(features[0, :16], per_frame[0], atol=1e-5)
    assert torch.allclose(features[1, :16], per_frame[2], atol=1e-5)
    with pytest.raises(ValueError, match="same"):
        video.encode([frames, frames[:2]])


# --- audio ------------------------------------------------------------------------------------


def _speech_builders_ready() -> bool:
    try:
        import models.tiny.speech  # noqa: F401  (written by another part of the project)
    except ImportError:
        return False
    return True


needs_tiny_whisper = pytest.mark.skipif(not _speech_builders_ready(), reason="models.tiny.speech is not written yet")


@needs_tiny_whisper
@pytest.mark.parametrize("source", ["tiny:whisper-pt", "tiny:whisper-hf"])
def test_tiny_whisper_encoders(source):
    encoder = build_audio_encoder(AudioEncoderSpec(source=source, device="cpu"))
    assert (encoder.hidden_size, encoder.num_tokens) == (32, 1500)
    assert _frozen(encoder)
    rate = encoder.sample_rate
    short = (0.1 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)  # padded to 30 s
    long = np.zeros(31 * rate, dtype=np.float32)  # cut to 30 s
    features = encoder.encode([short, long])
    assert features.shape == (2, 1500, 32)
    assert torch.isfinite(features).all() and not features.requires_grad


@needs_tiny_whisper
def test_whisper_pt_file_and_folder_agree():
    from models.assets import resolve

    folder = resolve("tiny:whisper-pt")
    from_folder = build_audio_encoder(AudioEncoderSpec(source=str(folder), device="cpu"))
    from_file = build_audio_encoder(AudioEncoderSpec(source=str(folder / "tiny.pt"), device="cpu"))
    wave = np.zeros(16000, dtype=np.float32)
    assert torch.equal(from_folder.encode([wave]), from_file.encode([wave]))


def test_audio_source_that_is_not_whisper(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="not Whisper"):
        build_audio_encoder(AudioEncoderSpec(source=str(tmp_path), device="cpu"))
    with pytest.raises(ConfigError, match=r"holds no \.pt"):
        build_audio_encoder(AudioEncoderSpec(source=str(tmp_path / ".."), device="cpu"))


# --- the real EfficientNet-lite0 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def efficientnet():
    spec = ImageEncoderSpec(kind="efficientnet_lite0", source="shipped:efficientnet-lite0", device="cpu")
    return build_image_encoder(spec)


@pytest.mark.smoke
def test_efficientnet_features(efficientnet):
    assert (efficientnet.hidden_size, efficientnet.num_tokens) == (1280, 49)
    assert _frozen(efficientnet)
    features = efficientnet.encode(_images(1, size=(300, 200)))
    assert features.shape == (1, 49, 1280)
    assert torch.isfinite(features).all()


@pytest.mark.smoke
def test_efficientnet_pooled_token_is_the_mean_of_the_grid(efficientnet):
    spec = ImageEncoderSpec(kind="efficientnet_lite0", source="shipped:efficientnet-lite0", device="cpu",
                            pooled_token=True)
    pooled = build_image_encoder(spec)
    images = _images(2, size=(64, 64))
    grid, with_pooled = efficientnet.encode(images), pooled.encode(images)
    assert pooled.num_tokens == 50 and with_pooled.shape == (2, 50, 1280)
    assert torch.allclose(with_pooled[:, :49], grid)
    assert torch.allclose(with_pooled[:, 49], grid.mean(1), atol=1e-6)


@pytest.mark.smoke
def test_efficientnet_sees_a_cat(efficientnet):
    from skimage.data import chelsea

    top = efficientnet.classify([Image.fromarray(chelsea())], top_k=5)[0]
    assert len(top) == 5 and all(0.0 <= score <= 1.0 for _, score in top)
    assert [score for _, score in top] == sorted((score for _, score in top), reverse=True)
    assert CAT_CLASSES & {label for label, _ in top}, top
