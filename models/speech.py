"""Text to speech with a piper voice (an ONNX model with its `.onnx.json` config beside it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.assets import resolve
from models.errors import AssetMissingError, SignalgraphError
from models.specs import SpeechSpec

if TYPE_CHECKING:
    from piper import PiperVoice


class EmptyTextError(SignalgraphError):
    """There is nothing to say: the text is empty or has no speakable characters."""


class SpeechSynthesizer:
    """One loaded voice. `synthesize` returns float32 mono samples in [-1, 1] and their sample rate."""

    def __init__(self, voice: PiperVoice, *, sentence_silence: float = 0.2) -> None:
        self.voice = voice
        # piper renders one chunk per sentence; a short pause between them keeps sentences
        # apart for listeners and for speech recognisers alike
        self.sentence_silence = sentence_silence

    @property
    def sample_rate(self) -> int:
        return int(self.voice.config.sample_rate)

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        if not text or not text.strip():
            raise EmptyTextError("text to speech got empty text; give it at least one word to say")
        pause = np.zeros(int(self.sentence_silence * self.sample_rate), dtype=np.float32)
        pieces: list[np.ndarray] = []
        for chunk in self.voice.synthesize(text):
            if pieces:
                pieces.append(pause)
            pieces.append(chunk.audio_float_array.astype(np.float32, copy=False))
        if not pieces:  # e.g. only punctuation: nothing phonemizes
            raise EmptyTextError(f"text to speech found nothing speakable in {text!r}; give it words")
        return np.concatenate(pieces), self.sample_rate


def load_piper_voice(onnx_path: Path, *, use_cuda: bool = False) -> PiperVoice:
    from piper import PiperVoice

    if onnx_path.is_dir():  # a folder holding one voice
        voices = sorted(onnx_path.glob("*.onnx"))
        if len(voices) != 1:
            raise AssetMissingError(
                f"expected one piper .onnx voice in {str(onnx_path)!r}, found {len(voices)}; "
                "point the source at the file"
            )
        onnx_path = voices[0]
    config = onnx_path.with_name(onnx_path.name + ".json")
    if not onnx_path.is_file():
        raise AssetMissingError(f"the piper voice {str(onnx_path)!r} is not a file; point the source at the .onnx")
    if not config.is_file():
        raise AssetMissingError(
            f"the piper voice config {str(config)!r} is missing; put the voice's .onnx.json beside the .onnx"
        )
    return PiperVoice.load(onnx_path, config_path=config, use_cuda=use_cuda)


def _cuda_for_onnx(device: str) -> bool:
    """CUDA only when asked (or auto) and onnxruntime can actually run there; else piper uses CPU."""
    from models.device import resolve_device  # imports torch: only when building

    if resolve_device(device).type != "cuda":
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def build_speech(spec: SpeechSpec) -> SpeechSynthesizer:
    return SpeechSynthesizer(load_piper_voice(resolve(spec.source), use_cuda=_cuda_for_onnx(spec.device)))


def save_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> Path:
    """Write mono or (frames, channels) float samples in [-1, 1] as 16-bit PCM WAV."""
    import soundfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), int(sample_rate),
                    subtype="PCM_16", format="WAV")
    return path
