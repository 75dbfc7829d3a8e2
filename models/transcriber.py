"""Speech to text with Whisper: CTranslate2 folders through faster-whisper, or openai-whisper `.pt` files.

Audio goes in as arrays, never as file names: both libraries would hand a file to ffmpeg,
which need not be installed. Decoding the file is the media store's job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from models.assets import kind_of, resolve
from models.errors import AssetMissingError, ConfigError, MediaError
from models.specs import TranscriberSpec

SAMPLE_RATE = 16_000  # what every Whisper expects


class Segment(NamedTuple):
    start: float  # seconds
    end: float
    text: str


@dataclass
class Transcript:
    text: str
    language: str
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0  # seconds of audio heard


def prepare_audio(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Check a mono clip and bring it to 16 kHz float32, the one format Whisper reads."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise MediaError(f"speech to text needs mono audio (one channel), got an array of shape {audio.shape}")
    if audio.size == 0:
        raise MediaError("speech to text got empty audio; give it at least a fraction of a second")
    audio = audio.astype(np.float32, copy=False)
    if not np.isfinite(audio).all():
        raise MediaError("the audio holds NaN or infinite samples; it is corrupt")
    if sample_rate != SAMPLE_RATE:
        from math import gcd

        from scipy.signal import resample_poly

        common = gcd(int(sample_rate), SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // common, int(sample_rate) // common).astype(np.float32)
    return audio


class Transcriber:
    """A loaded speech recogniser. `transcribe` takes mono float samples (16 kHz unless told)."""

    def transcribe(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Transcript:
        raise NotImplementedError


class FasterWhisperTranscriber(Transcriber):
    def __init__(self, model: Any, *, language: str | None = "en", beam_size: int = 5) -> None:
        self.model = model
        self.language = language
        self.beam_size = beam_size

    def transcribe(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Transcript:
        audio = prepare_audio(audio, sample_rate)
        # vad off: clips here are short, and the VAD model would be one more thing to load
        segments, info = self.model.transcribe(
            audio, language=self.language, beam_size=self.beam_size, vad_filter=False
        )
        # `segments` is a generator: decoding happens here. Ends are clamped because the model's
        # predicted end timestamp can lie past the end of a short clip (2.0 s for a 1 s one).
        parts = [Segment(float(s.start), min(float(s.end), info.duration), s.text.strip()) for s in segments]
        return Transcript(
            text=" ".join(p.text for p in parts if p.text),
            language=info.language,
            segments=parts,
            duration=float(info.duration),
        )


class OpenAIWhisperTranscriber(Transcriber):
    def __init__(self, model: Any, *, language: str | None = "en", fp16: bool = False) -> None:
        self.model = model
        self.language = language
        self.fp16 = fp16

    def transcribe(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Transcript:
        audio = prepare_audio(audio, sample_rate)
        result = self.model.transcribe(audio, fp16=self.fp16, language=self.language, verbose=None)
        parts = [Segment(float(s["start"]), float(s["end"]), s["text"].strip()) for s in result["segments"]]
        return Transcript(
            text=result["text"].strip(),
            language=result.get("language") or (self.language or ""),
            segments=parts,
            duration=len(audio) / SAMPLE_RATE,
        )


def _compute_type(dtype: str, on_cuda: bool) -> str:
    if dtype == "auto":
        # int8 is CTranslate2's fast CPU path; float16 is the usual GPU one
        return "float16" if on_cuda else "int8"
    return dtype


def _build_faster_whisper(spec: TranscriberSpec) -> FasterWhisperTranscriber:
    from faster_whisper import WhisperModel

    from models.device import resolve_device  # imports torch: only when building

    folder = resolve(spec.source)
    if not (folder / "model.bin").is_file():
        raise AssetMissingError(
            f"{str(folder)!r} is not a CTranslate2 Whisper folder (no model.bin); "
            "faster_whisper needs a converted model such as shipped:whisper-tiny.en"
        )
    device = resolve_device(spec.device)
    on_cuda = device.type == "cuda"
    model = WhisperModel(
        str(folder),
        device="cuda" if on_cuda else "cpu",
        device_index=device.index or 0,
        compute_type=_compute_type(spec.dtype, on_cuda),
        local_files_only=True,  # a folder, never the hub
    )
    return FasterWhisperTranscriber(model, language=spec.language)


def _whisper_cache() -> Path:
    """Where openai-whisper keeps (and would download) its named checkpoints."""
    default = Path.home() / ".cache"
    return Path(os.getenv("XDG_CACHE_HOME", default)) / "whisper"


def _openai_checkpoint(source: str) -> tuple[Path, str | None]:
    """The `.pt` file for a source, and the official model name when it is one (for alignment heads)."""
    import whisper

    if source in whisper._MODELS and kind_of(source) != "local":
        # a known name: use the cached file, never download behind the user's back
        path = _whisper_cache() / os.path.basename(whisper._MODELS[source])
        if not path.is_file():
            raise AssetMissingError(
                f"openai-whisper model {source!r} is not downloaded; put {path.name} at {path} "
                "(whisper.load_model downloads it there on a connected machine), "
                "or set the source to a .pt file"
            )
        return path, source
    path = resolve(source)
    if path.is_dir():  # e.g. tiny:whisper-pt, or a folder holding one checkpoint
        checkpoints = sorted(path.glob("*.pt"))
        if not checkpoints:
            raise AssetMissingError(f"no openai-whisper .pt checkpoint in {str(path)!r}")
        if len(checkpoints) > 1:
            names = ", ".join(p.name for p in checkpoints)
            raise ConfigError(f"{str(path)!r} holds several .pt checkpoints ({names}); name one file as the source")
        path = checkpoints[0]
    return path, None


def _build_openai_whisper(spec: TranscriberSpec) -> OpenAIWhisperTranscriber:
    import whisper

    from models.device import resolve_device

    path, name = _openai_checkpoint(spec.source)
    device = resolve_device(spec.device)
    model = whisper.load_model(str(path), device=device)
    if name is not None and name in whisper._ALIGNMENT_HEADS:
        # loading by path skips these; word timestamps need them
        model.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])
    # openai-whisper runs fp16 or fp32 only (no bf16); fp16 needs a GPU
    fp16 = device.type == "cuda" and spec.dtype in ("auto", "float16")
    return OpenAIWhisperTranscriber(model, language=spec.language, fp16=fp16)


def build_transcriber(spec: TranscriberSpec) -> Transcriber:
    if spec.kind == "faster_whisper":
        return _build_faster_whisper(spec)
    return _build_openai_whisper(spec)
