"""Modality encoders: the survey's first component, turning pixels and waveforms into feature tokens.

Each encoder maps a batch of inputs to `(B, T, hidden_size)` features that an input projector
carries into the LLM's embedding space. Encoders are frozen by default (eval mode, no gradients),
as in LLaVA and NExT-GPT: only the projectors, and optionally LoRA on the backbone, are trained.

- `ImageEncoder`: a transformers vision tower (CLIP, SigLIP, ViT, ...) or EfficientNet-lite0
- `AudioEncoder`: a Whisper encoder, from an openai-whisper `.pt` or a transformers folder
- `VideoEncoder`: uniformly sampled frames through an image encoder, tokens concatenated
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from models.assets import resolve
from models.device import resolve_device, resolve_dtype
from models.errors import AssetMissingError, ConfigError
from models.specs import AudioEncoderSpec, ImageEncoderSpec

if TYPE_CHECKING:
    from PIL import Image

_IMAGENET_CLASSES = Path(__file__).with_name("imagenet_classes.txt")


class _Encoder(nn.Module):
    """Placement and freezing shared by all encoders."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    # Read from the weights, so they stay right after a caller's .to(...).
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def freeze(self) -> _Encoder:
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> _Encoder:
        # A parent's .train() must not wake a frozen encoder: dropout and BatchNorm statistics
        # would change the features the projectors were trained on.
        return super().train(mode and not self.frozen)

    def _grad(self) -> contextlib.AbstractContextManager:
        """No autograd graph through a frozen encoder (saves the activations' memory)."""
        return torch.no_grad() if self.frozen else contextlib.nullcontext()


# --- images -----------------------------------------------------------------------------------


class ImageEncoder(_Encoder):
    """Images -> `(B, num_tokens, hidden_size)` features."""

    hidden_size: int
    num_tokens: int  # tokens per image

    @classmethod
    def from_spec(cls, spec: ImageEncoderSpec, *, freeze: bool = True) -> ImageEncoder:
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        if spec.kind == "hf_vision":
            encoder: ImageEncoder = HFVisionEncoder(spec, device, dtype)
        elif spec.kind == "efficientnet_lite0":
            encoder = EfficientNetLite0Encoder(spec, device, dtype)
        else:  # the spec's Literal forbids this; kept for subclassed specs
            raise ConfigError(f"unknown image encoder kind {spec.kind!r}; use hf_vision or efficientnet_lite0")
        return encoder.freeze() if freeze else encoder

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        with self._grad():
            return self(self.preprocess(images))


def build_image_encoder(spec: ImageEncoderSpec, *, freeze: bool = True) -> ImageEncoder:
    return ImageEncoder.from_spec(spec, freeze=freeze)


def _vision_model_class(config):
    """The vision tower's class: CLIP and SigLIP checkpoints may hold the text tower too."""
    from transformers import AutoModel, CLIPVisionModel, SiglipVisionModel

    model_type = getattr(config, "model_type", "")
    if model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel
    if model_type in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel
    return AutoModel


class HFVisionEncoder(ImageEncoder):
    """A transformers vision tower; features are one hidden layer, as LLaVA takes them."""

    def __init__(self, spec: ImageEncoderSpec, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoConfig, AutoImageProcessor

        super().__init__()
        path = resolve(spec.source)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{spec.source!r} ({path}) is not a transformers model folder (no config.json); "
                "an hf_vision image encoder needs a vision model such as openai/clip-vit-large-patch14"
            )
        try:
            config = AutoConfig.from_pretrained(path)
            self.model = _vision_model_class(config).from_pretrained(path, dtype=dtype).to(device)
            self.processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise AssetMissingError(
                f"could not load the vision model at {path} ({exc}); check that the folder holds its "
                "weights and preprocessor_config.json, or run `signalgraph models prepare`"
            ) from None
        vision = getattr(config, "vision_config", config)
        layers = getattr(vision, "num_hidden_layers", None)  # convolutional towers may not say
        if layers is not None and not -(layers + 1) <= spec.select_layer <= layers:
            raise ConfigError(
                f"select_layer {spec.select_layer} is out of range for {spec.source!r}, whose hidden states "
                f"are numbered 0..{layers} (or -1..-{layers + 1}); LLaVA uses -2"
            )
        self.select_layer = spec.select_layer
        self.select_feature = spec.select_feature
        # One probe decides the token layout: how many tokens precede the patches (CLIP and ViT
        # have a CLS token, DeiT adds a distillation token, SigLIP has none).
        self.model.eval()
        with torch.no_grad():
            probe = self._hidden(self.preprocess([_blank_image()]))
        total = probe.shape[1]
        patches = _patch_count(vision)
        if patches is not None and total >= patches:
            self.num_prefix_tokens = total - patches
        else:
            names = (name for name, _ in self.model.named_parameters())
            self.num_prefix_tokens = int(any(name.endswith(("class_embedding", "cls_token")) for name in names))
        self.hidden_size = probe.shape[-1]
        self.num_tokens = total - (self.num_prefix_tokens if self.select_feature == "patch" else 0)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        return pixels.to(device=self.device, dtype=self.dtype)

    def _hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self._hidden(pixels)
        if self.select_feature == "patch":
            features = features[:, self.num_prefix_tokens :]
        return features


def _patch_count(vision_config) -> int | None:
    image, patch = getattr(vision_config, "image_size", None), getattr(vision_config, "patch_size", None)
    if image is None or patch is None:
        return None
    height, width = (image, image) if isinstance(image, int) else image
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return (height // ph) * (width // pw)


def _blank_image() -> Image.Image:
    from PIL import Image

    return Image.new("RGB", (224, 224), (127, 127, 127))


class EfficientNetLite0Encoder(ImageEncoder):
    """ImageNet EfficientNet-lite0: the 7x7 grid of its last conv layer as 49 tokens of 1280,
    plus their mean as a 50th with `pooled_token`."""

    image_size = 224
    hidden_size = 1280

    def __init__(self, spec: ImageEncoderSpec, device: torch.device, dtype: torch.dtype) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        super().__init__()
        weights = _single_file(resolve(spec.source), ".pth", spec.source)
        # The library prints a line on load; the weights path must be a str, or it downloads.
        with contextlib.redirect_stdout(io.StringIO()):
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
        self.model = model.to(device=device, dtype=dtype).eval()
        self.pooled_token = spec.pooled_token
        self.num_tokens = 49 + self.pooled_token

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        from PIL import Image

        size = self.image_size
        batch = []
        for image in images:
            image = image.convert("RGB")
            # TF EfficientNet's eval crop: the centre 224/(224+32) of the short side, then bicubic.
            side = size / (size + 32) * min(image.size)
            left, top = (image.width - side) / 2, (image.height - side) / 2
            resized = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
            batch.append(np.asarray(resized, dtype=np.float32))
        # EfficientNet-lite was trained on (x - 127) / 128 of 0..255 pixels, not ImageNet mean/std.
        pixels = (torch.from_numpy(np.stack(batch)) - 127.0) / 128.0
        return pixels.permute(0, 3, 1, 2).to(device=self.device, dtype=self.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = self.model.extract_features(pixels.to(device=self.device, dtype=self.dtype))  # (B, 1280, 7, 7)
        tokens = grid.flatten(2).transpose(1, 2)
        return torch.cat([tokens, tokens.mean(1, keepdim=True)], dim=1) if self.pooled_token else tokens

    @cached_property
    def labels(self) -> list[str]:
        return _IMAGENET_CLASSES.read_text().splitlines()

    def classify(self, images: list[Image.Image], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The `top_k` ImageNet classes of each image, with softmax probabilities."""
        with torch.no_grad():
            logits = self.model(self.preprocess(images)).float()
        scores, indices = logits.softmax(dim=-1).topk(top_k, dim=-1)
        return [
            [(self.labels[i], float(s)) for s, i in zip(row_scores.tolist(), row_indices.tolist(), strict=True)]
            for row_scores, row_indices in zip(scores, indices, strict=True)
        ]


def _single_file(path: Path, suffix: str, source: str) -> Path:
    """`path` itself, or the only `suffix` file in the folder `path`."""
    if path.is_file():
        return path
    found = sorted(path.glob(f"*{suffix}"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ConfigError(
            f"{source!r} ({path}) holds {what} {suffix} files; point the source at the one weights file"
        )
    return found[0]


# --- audio ------------------------------------------------------------------------------------


class AudioEncoder(_Encoder):
    """16 kHz mono waveforms -> `(B, num_tokens, hidden_size)` Whisper encoder states.

    Whisper reads 30 s windows: shorter audio is padded with silence, longer audio is cut at 30 s.
    """

    sample_rate = 16000
    hidden_size: int
    num_tokens: int

    def features(self, waveforms: list[np.ndarray]) -> torch.Tensor:
        """Log-mel spectrograms `(B, n_mels, 3000)` on the encoder's device and dtype."""
        raise NotImplementedError

    def forward(self, waveforms: list[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, waveforms: list[np.ndarray]) -> torch.Tensor:
        with self._grad():
            return self(waveforms)


def build_audio_encoder(spec: AudioEncoderSpec, *, freeze: bool = True) -> AudioEncoder:
    """openai-whisper for a `.pt` file (or a folder with exactly one), transformers for a Whisper folder."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    path = resolve(spec.source)
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "whisper":
            raise ConfigError(
                f"{spec.source!r} ({path}) is a transformers {model_type!r} model, not Whisper; "
                "the audio encoder needs a Whisper checkpoint"
            )
        encoder: AudioEncoder = HFWhisperEncoder(path, device, dtype)
    elif path.suffix == ".pt" or path.is_dir():
        encoder = OpenAIWhisperEncoder(_single_file(path, ".pt", spec.source), device, dtype)
    else:
        raise ConfigError(
            f"{spec.source!r} ({path}) is neither an openai-whisper .pt file nor a transformers Whisper "
            "folder; point the audio encoder's source at one of those"
        )
    return encoder.freeze() if freeze else encoder


def _as_mono_float(waveform: np.ndarray) -> np.ndarray:
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(
            f"expected a mono waveform (1-D, 16 kHz), got shape {waveform.shape}; load it with models.media.load_audio"
        )
    return waveform


class OpenAIWhisperEncoder(AudioEncoder):
    """The encoder half of an openai-whisper checkpoint (the decoder is dropped after loading)."""

    def __init__(self, checkpoint: Path, device: torch.device, dtype: torch.dtype) -> None:
        import whisper

        super().__init__()
        try:
            model = whisper.load_model(str(checkpoint), device=device)
        except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as exc:
            raise AssetMissingError(
                f"{checkpoint} is not a loadable openai-whisper checkpoint ({exc}); re-download it"
            ) from None
        self.encoder = model.encoder.to(dtype=dtype)
        self.n_mels = model.dims.n_mels
        self.hidden_size = model.dims.n_audio_state
        self.num_tokens = model.dims.n_audio_ctx

    def features(self, waveforms: list[np.ndarray]) -> torch.Tensor:
        import whisper

        mels = [
            whisper.log_mel_spectrogram(
                whisper.pad_or_trim(torch.from_numpy(_as_mono_float(w))), n_mels=self.n_mels, device=self.device
            )
            for w in waveforms
        ]
        return torch.stack(mels).to(dtype=self.dtype)

    def forward(self, waveforms: list[np.ndarray]) -> torch.Tensor:
        return self.encoder(self.features(waveforms))


class HFWhisperEncoder(AudioEncoder):
    """The encoder of a transformers Whisper model, with its own feature extractor."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import WhisperFeatureExtractor, WhisperModel

        super().__init__()
        try:
            self.encoder = WhisperModel.from_pretrained(folder, dtype=dtype).get_encoder().to(device)
            self.extractor = WhisperFeatureExtractor.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise AssetMissingError(
                f"could not load the Whisper model at {folder} ({exc}); check that the folder holds its "
                "weights and preprocessor_config.json"
            ) from None
        self.hidden_size = self.encoder.config.d_model
        self.num_tokens = self.encoder.config.max_source_positions

    def features(self, waveforms: list[np.ndarray]) -> torch.Tensor:
        batch = self.extractor(
            [_as_mono_float(w) for w in waveforms], sampling_rate=self.sample_rate, return_tensors="pt"
        )
        return batch["input_features"].to(device=self.device, dtype=self.dtype)

    def forward(self, waveforms: list[np.ndarray]) -> torch.Tensor:
        return self.encoder(input_features=self.features(waveforms)).last_hidden_state


# --- video ------------------------------------------------------------------------------------


class VideoEncoder(nn.Module):
    """Videos as uniformly sampled frames through an image encoder, frame tokens in time order.

    `num_tokens` is for `frames` frames per video; `encode` accepts any frame count as long as
    every video in the batch has the same one.
    """

    def __init__(self, image_encoder: ImageEncoder, frames: int = 5) -> None:
        super().__init__()
        if frames < 1:
            raise ConfigError(f"a video needs at least one frame, got frames={frames}")
        self.image_encoder = image_encoder
        self.frames = frames

    @property
    def hidden_size(self) -> int:
        return self.image_encoder.hidden_size

    @property
    def num_tokens(self) -> int:
        return self.frames * self.image_encoder.num_tokens

    def preprocess(self, videos: list[list[Image.Image]]) -> torch.Tensor:
        """`(B, F, C, H, W)` pixels."""
        counts = {len(video) for video in videos}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(
                f"every video in a batch needs the same, non-zero number of frames, got {sorted(counts)}; "
                "sample them with models.media.load_video_frames"
            )
        pixels = self.image_encoder.preprocess([frame for video in videos for frame in video])
        return pixels.reshape(len(videos), counts.pop(), *pixels.shape[1:])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, frames = pixels.shape[:2]
        features = self.image_encoder(pixels.flatten(0, 1))  # (B*F, T, D)
        return features.reshape(batch, frames * features.shape[1], features.shape[2])

    def encode(self, videos: list[list[Image.Image]]) -> torch.Tensor:
        with self.image_encoder._grad():
            return self(self.preprocess(videos))
