"""Modality generators driven by conditioning tensors, the last stage of the survey's pipeline.

NExT-GPT style: the output projector maps the backbone's signal-token states into a generator's
own conditioning space, so a generator here is fed tensors, not text. Each generator says
which tensors it takes and their per-example shapes (`conditioning_shapes`), produces the
same tensors from captions with its own text encoders (`text_conditioning`, the target of the
output projector's alignment loss), and denoises from them (`generate`).

- `ImageGenerator`: Stable Diffusion; conditioning `prompt_embeds` (77 CLIP tokens x width).
- `AudioGenerator`: AudioLDM-2; conditioning `prompt_embeds` (T5 states, padded to a fixed
  `text_tokens` length), `generated_prompt_embeds` (GPT-2 states, `max_new_tokens` long) and an
  optional `attention_mask` over the T5 positions.

Seeds: example i of a batch is drawn from its own CPU generator seeded `seed + i`, so an output
depends only on its conditioning and seed (not on batch size or device).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AudioLDM2Pipeline, StableDiffusionPipeline
from PIL import Image

from models.assets import resolve
from models.device import resolve_device, resolve_dtype
from models.errors import AssetMissingError, ConfigError
from models.specs import AudioGeneratorSpec, ImageGeneratorSpec

# T5 positions kept for AudioLDM-2's `prompt_embeds` when the caller does not choose: captions
# are short, and a fixed length keeps the output projector's target shape static.
DEFAULT_AUDIO_TEXT_TOKENS = 128

_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_AUDIOLDM2_COMPONENTS = (
    "unet", "vae", "text_encoder", "text_encoder_2", "projection_model", "language_model",
    "tokenizer", "tokenizer_2", "scheduler", "vocoder",
)


class ConditioningShapeError(ConfigError):
    """Conditioning tensors that do not fit the generator (usually a projector built for another one)."""


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_folder(path: Path, pipeline_class: str, components: Sequence[str]) -> dict[str, Any]:
    """Fail before diffusers does, with a message naming the folder and the missing piece."""
    if not path.is_dir():
        raise AssetMissingError(
            f"{path} is not a folder; a {pipeline_class} is a diffusers pipeline folder with a model_index.json"
        )
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise AssetMissingError(
            f"{path} has no model_index.json, so it is not a diffusers pipeline folder; "
            f"point the source at a folder written by {pipeline_class}.save_pretrained"
        )
    index = json.loads(index_file.read_text())
    found = index.get("_class_name")
    if found != pipeline_class:
        raise ConfigError(f"{path} holds a {found}, but this generator needs a {pipeline_class}")
    for name in components:
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise AssetMissingError(f"{index_file} lists no {name!r} component, which a {pipeline_class} needs")
        if not (path / name).is_dir():
            raise AssetMissingError(
                f"the pipeline folder {path} is incomplete: its {name!r} component ({path / name}) is missing; "
                "re-download or re-save the pipeline"
            )
    return index


def _load(pipeline_class: type, path: Path, components: Sequence[str], dtype: torch.dtype, **overrides: Any):
    _check_folder(path, pipeline_class.__name__, components)
    try:
        return pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, **overrides)
    except (OSError, ValueError) as exc:  # diffusers' ways of saying "a file is not there"
        message = str(exc)
        culprit = next((name for name in components if f"/{name}" in message or f"'{name}'" in message), None)
        where = f"its {culprit!r} component" if culprit else "one of its components"
        raise AssetMissingError(
            f"could not load the {pipeline_class.__name__} in {path}: {where} is missing or incomplete "
            f"({type(exc).__name__}: {message.strip().splitlines()[0] if message.strip() else ''}); "
            "re-download or re-save the pipeline"
        ) from exc


def _captions(captions: str | Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        return [captions]
    captions = list(captions)
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ConfigError("captions must be a non-empty list of strings")
    return captions


def _validate(
    conditioning: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    who: str,
    optional: Sequence[str] = (),
) -> int:
    """Every expected tensor present, shaped (batch, *per-example shape), one batch size. Returns it."""
    missing = [k for k in shapes if k not in conditioning]
    extra = [k for k in conditioning if k not in shapes and k not in optional]
    if missing or extra:
        raise ConditioningShapeError(
            f"{who} expected conditioning {sorted(shapes)}, got {sorted(conditioning)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra})" if extra else "")
        )
    batch = None
    for name, per_example in shapes.items():
        tensor = conditioning[name]
        if not isinstance(tensor, torch.Tensor):
            raise ConditioningShapeError(
                f"{who}: conditioning {name!r} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        got = tuple(tensor.shape)
        if len(got) != 3 or got[1:] != tuple(per_example):
            raise ConditioningShapeError(
                f"{who}: conditioning {name!r} must have shape (batch, {per_example[0]}, {per_example[1]}), "
                f"got {got}; the output projector must be built for this generator's conditioning_shapes()"
            )
        if batch is not None and got[0] != batch:
            raise ConditioningShapeError(f"{who}: conditioning tensors disagree on batch size ({batch} vs {got[0]})")
        batch = got[0]
    if not batch:
        raise ConditioningShapeError(f"{who}: conditioning has an empty batch")
    return batch


def _generators(seed: int, batch: int) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same noise on any device.
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]


def _steps_and_guidance(steps: int | None, guidance: float | None, default_steps: int, default_guidance: float):
    steps = default_steps if steps is None else steps
    guidance = default_guidance if guidance is None else guidance
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if guidance < 0:
        raise ConfigError(f"guidance must be at least 0, got {guidance}")
    return steps, guidance


def _placement(spec: ImageGeneratorSpec | AudioGeneratorSpec) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(spec.device)
    return device, resolve_dtype(spec.dtype, device)


# ---------------------------------------------------------------------------------------------
# images


class _PipelineGenerator:
    """What both generators share: a diffusers pipeline whose progress bar can be switched."""

    pipeline: Any

    @property
    def progress(self) -> bool:
        return self._progress

    @progress.setter
    def progress(self, value: bool) -> None:
        self._progress = value
        self.pipeline.set_progress_bar_config(disable=not value)

    @property
    def device(self) -> torch.device:
        return self.pipeline.device



class ImageGenerator(_PipelineGenerator):
    """Stable Diffusion fed with `prompt_embeds` (CLIP text-encoder states)."""

    def __init__(
        self, pipeline: StableDiffusionPipeline, *, steps: int = 25, guidance: float = 7.5, progress: bool = False
    ) -> None:
        self.pipeline = pipeline
        self.steps = steps
        self.guidance = guidance
        self.progress = progress

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.text_encoder.dtype

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the UNet was trained at."""
        side = self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor
        return side, side

    def conditioning_shapes(self) -> dict[str, tuple[int, int]]:
        # encode_prompt pads every prompt to the tokenizer's max length (77 for CLIP)
        return {
            "prompt_embeds": (
                int(self.pipeline.tokenizer.model_max_length),
                int(self.pipeline.text_encoder.config.hidden_size),
            )
        }

    @torch.no_grad()
    def text_conditioning(self, captions: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own `encode_prompt` output: what it would denoise from for these captions."""
        prompt_embeds, _ = self.pipeline.encode_prompt(_captions(captions), self.device, 1, False)
        return {"prompt_embeds": prompt_embeds}

    @torch.no_grad()
    def generate(
        self,
        conditioning: Mapping[str, torch.Tensor],
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> list[Image.Image]:
        """One image per conditioning row. With guidance > 1 the pipeline adds the empty prompt's
        embeddings as the unconditional branch (classifier-free guidance)."""
        batch = _validate(conditioning, self.conditioning_shapes(), "the image generator")
        steps, guidance = _steps_and_guidance(steps, guidance, self.steps, self.guidance)
        default_h, default_w = self.default_size
        height, width = height or default_h, width or default_w
        if height % 8 or width % 8:
            raise ConfigError(f"image height and width must be multiples of 8, got {height}x{width}")
        output = self.pipeline(
            prompt_embeds=conditioning["prompt_embeds"].to(self.device, self.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=_generators(seed, batch),
            output_type="pil",
        )
        return list(output.images)


def build_image_generator(spec: ImageGeneratorSpec, *, progress: bool = False) -> ImageGenerator:
    """Load the Stable Diffusion pipeline that `spec.source` names (resolved by models.assets)."""
    device, dtype = _placement(spec)
    pipeline = _load(StableDiffusionPipeline, resolve(spec.source), _SD_COMPONENTS, dtype)
    return ImageGenerator(pipeline.to(device), steps=spec.steps, guidance=spec.guidance, progress=progress)


# ---------------------------------------------------------------------------------------------
# audio


class AudioGenerator(_PipelineGenerator):
    """AudioLDM-2 fed with T5 `prompt_embeds` and GPT-2 `generated_prompt_embeds`.

    AudioLDM-2 pads T5 input to the longest caption of a batch, so its length varies. Here it is
    fixed at `text_tokens`: the tokenizer truncates captions there (the pipeline's own prompt
    path too), and `text_conditioning` pads with zero vectors that `attention_mask` marks as
    padding. The UNet ignores masked positions, so padding does not change the audio.
    """

    def __init__(
        self,
        pipeline: AudioLDM2Pipeline,
        *,
        steps: int = 50,
        guidance: float = 3.5,
        seconds: float = 5.0,
        text_tokens: int | None = None,
        progress: bool = False,
    ) -> None:
        if pipeline.text_encoder_2.config.model_type == "vits":
            raise ConfigError("the text-to-speech AudioLDM-2 variant (VITS encoder) is not supported as a generator")
        self.pipeline = pipeline
        self.steps, self.guidance, self.seconds = steps, guidance, seconds
        tokenizer = pipeline.tokenizer_2
        self.text_tokens = int(text_tokens or min(tokenizer.model_max_length, DEFAULT_AUDIO_TEXT_TOKENS))
        tokenizer.model_max_length = self.text_tokens
        # GPT-2 writes this many states; AudioLDM-2 checkpoints store it in the LM's config (8)
        self.max_new_tokens = int(getattr(pipeline.language_model.config, "max_new_tokens", None) or 8)
        self._empty: dict[str, torch.Tensor] | None = None
        self.progress = progress

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.text_encoder_2.dtype

    @property
    def sample_rate(self) -> int:
        return int(self.pipeline.vocoder.config.sampling_rate)

    @property
    def min_seconds(self) -> float:
        """The shortest clip the VAE can decode (one latent row)."""
        config = self.pipeline.vocoder.config
        return float(np.prod(config.upsample_rates) / config.sampling_rate * self.pipeline.vae_scale_factor)

    def conditioning_shapes(self) -> dict[str, tuple[int, int]]:
        return {
            "prompt_embeds": (self.text_tokens, int(self.pipeline.text_encoder_2.config.hidden_size)),
            "generated_prompt_embeds": (self.max_new_tokens, int(self.pipeline.language_model.config.hidden_size)),
        }

    def _unconditional(self) -> dict[str, torch.Tensor]:
        """The empty caption's conditioning, encoded once. Left to itself the pipeline would encode
        "" padded to the batch's T5 length, and GPT-2 (which has no position ids for padding)
        would give a different unconditional branch for each length; this one is canonical."""
        if self._empty is None or self._empty["prompt_embeds"].device != self.device:
            self._empty = self.text_conditioning([""])
        return self._empty

    @torch.no_grad()
    def text_conditioning(self, captions: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """The pipeline's `encode_prompt` output for these captions, T5 part padded to `text_tokens`.

        Returns `prompt_embeds` (B, text_tokens, T5 width), `attention_mask` (B, text_tokens; 0 at
        padding, where an alignment loss should not look) and `generated_prompt_embeds`
        (B, max_new_tokens, GPT-2 width)."""
        prompt_embeds, attention_mask, generated = self.pipeline.encode_prompt(
            _captions(captions), self.device, 1, False, max_new_tokens=self.max_new_tokens
        )
        pad = self.text_tokens - prompt_embeds.shape[1]
        return {
            "prompt_embeds": F.pad(prompt_embeds, (0, 0, 0, pad)),
            "attention_mask": F.pad(attention_mask, (0, pad)),
            "generated_prompt_embeds": generated,
        }

    @torch.no_grad()
    def generate(
        self,
        conditioning: Mapping[str, torch.Tensor],
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        seconds: float | None = None,
    ) -> list[np.ndarray]:
        """One float32 mono waveform at `sample_rate` per conditioning row. `attention_mask` is
        optional (all positions attended when absent: what a projector's output wants). With
        guidance > 1 the empty caption's conditioning is the unconditional branch."""
        shapes = self.conditioning_shapes()
        batch = _validate(conditioning, shapes, "the audio generator", optional=("attention_mask",))
        steps, guidance = _steps_and_guidance(steps, guidance, self.steps, self.guidance)
        seconds = self.seconds if seconds is None else seconds
        if seconds < self.min_seconds:
            raise ConfigError(f"audio must be at least {self.min_seconds:g} s long for this model, got {seconds:g} s")
        mask = conditioning.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, self.text_tokens, dtype=torch.long)
        elif tuple(mask.shape) != (batch, self.text_tokens):
            raise ConditioningShapeError(
                f"the audio generator: conditioning 'attention_mask' must have shape ({batch}, {self.text_tokens}), "
                f"got {tuple(mask.shape)}"
            )
        negative: dict[str, Any] = {}
        if guidance > 1.0:
            empty = self._unconditional()
            negative = {
                "negative_prompt_embeds": empty["prompt_embeds"].expand(batch, -1, -1),
                "negative_attention_mask": empty["attention_mask"].expand(batch, -1),
                "negative_generated_prompt_embeds": empty["generated_prompt_embeds"].expand(batch, -1, -1),
            }
        output = self.pipeline(
            prompt_embeds=conditioning["prompt_embeds"].to(self.device, self.dtype),
            generated_prompt_embeds=conditioning["generated_prompt_embeds"].to(
                self.device, self.pipeline.language_model.dtype
            ),
            attention_mask=mask.to(self.device, torch.long),
            **negative,
            num_inference_steps=steps,
            guidance_scale=guidance,
            audio_length_in_s=seconds,
            max_new_tokens=self.max_new_tokens,
            generator=_generators(seed, batch),
            output_type="np",
        )
        return [np.asarray(audio, dtype=np.float32) for audio in output.audios]


def _language_model_override(path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """AudioLDM-2 checkpoints (cvssp/audioldm2 included) save a bare GPT2Model, but diffusers'
    generate_language_model calls GenerationMixin methods that transformers 5 only puts on
    GPT2LMHeadModel (diffusers #12630). Load the same weights into GPT2LMHeadModel instead: the
    hidden states the pipeline reads are identical; its head is tied to the embeddings."""
    index = json.loads((path / "model_index.json").read_text())
    library, class_name = index.get("language_model", [None, None])
    if library != "transformers" or class_name != "GPT2Model":
        return {}
    from transformers import GPT2LMHeadModel

    try:
        return {"language_model": GPT2LMHeadModel.from_pretrained(path / "language_model", dtype=dtype)}
    except OSError as exc:
        raise AssetMissingError(
            f"could not load the 'language_model' component of {path}: {exc}; re-download or re-save the pipeline"
        ) from exc


def build_audio_generator(
    spec: AudioGeneratorSpec, *, text_tokens: int | None = None, progress: bool = False
) -> AudioGenerator:
    """Load the AudioLDM-2 pipeline that `spec.source` names (resolved by models.assets).

    `text_tokens` fixes the T5 length of the conditioning (default: the tokenizer's maximum,
    capped at DEFAULT_AUDIO_TEXT_TOKENS)."""
    device, dtype = _placement(spec)
    path = resolve(spec.source)
    _check_folder(path, "AudioLDM2Pipeline", _AUDIOLDM2_COMPONENTS)
    pipeline = _load(AudioLDM2Pipeline, path, _AUDIOLDM2_COMPONENTS, dtype, **_language_model_override(path, dtype))
    return AudioGenerator(
        pipeline.to(device),
        steps=spec.steps,
        guidance=spec.guidance,
        seconds=spec.seconds,
        text_tokens=text_tokens,
        progress=progress,
    )
