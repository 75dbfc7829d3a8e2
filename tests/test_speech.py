"""Speech in and out on tiny Whisper models built in code (and the shipped piper voice for TTS errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import AssetMissingError, MediaError, SignalgraphError
from models.specs import SpeechSpec, TranscriberSpec
from models.tiny.speech import build_hf_whisper, build_openai_whisper
from models.transcriber import SAMPLE_RATE, Segment, Transcript, build_transcriber, prepare_audio


def _tone(seconds: float = 1.0, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def whisper_pt(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("whisper-pt")
    build_openai_whisper(dest)
    return dest


@pytest.fixture(scope="module")
def whisper_hf(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("whisper-hf")
    build_hf_whisper(dest)
    return dest


def test_tiny_openai_whisper_checkpoint_loads_without_nans(whisper_pt):
    import whisper

    model = whisper.load_model(str(whisper_pt / "tiny.pt"), device="cpu")
    assert not model.is_multilingual  # the english-only tokenizer fits its vocabulary
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the empty positional embedding was filled


def test_tiny_openai_whisper_is_deterministic(tmp_path, whisper_pt):
    build_openai_whisper(tmp_path)
    first = torch.load(whisper_pt / "tiny.pt", weights_only=True)["model_state_dict"]
    second = torch.load(tmp_path / "tiny.pt", weights_only=True)["model_state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_openai_whisper_transcriber_returns_a_transcript(whisper_pt):
    transcriber = build_transcriber(TranscriberSpec(kind="openai_whisper", source=str(whisper_pt), device="cpu"))
    transcript = transcriber.transcribe(_tone(1.0))
    assert isinstance(transcript, Transcript)
    assert isinstance(transcript.text, str)  # random weights: words, but not meaningful ones
    assert transcript.language == "en"
    assert transcript.duration == pytest.approx(1.0)
    assert all(isinstance(s, Segment) and s.start <= s.end for s in transcript.segments)


def test_tiny_whisper_pt_resolves_through_the_registry(tmp_path, monkeypatch):
    from models.assets import resolve

    monkeypatch.setenv("SIGNALGRAPH_HOME", str(tmp_path))
    assert (resolve("tiny:whisper-pt") / "tiny.pt").is_file()


def test_transcriber_resamples_other_rates(whisper_pt):
    transcriber = build_transcriber(TranscriberSpec(kind="openai_whisper", source=str(whisper_pt), device="cpu"))
    transcript = transcriber.transcribe(_tone(1.0, rate=22050), sample_rate=22050)
    assert transcript.duration == pytest.approx(1.0, abs=1e-3)


def test_tiny_hf_whisper_loads_with_from_pretrained(whisper_hf):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(whisper_hf)
    extractor = WhisperFeatureExtractor.from_pretrained(whisper_hf)
    features = extractor(_tone(1.0), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    assert features.shape == (1, 80, 3000)
    with torch.no_grad():
        hidden = model.model.encoder(features).last_hidden_state
    assert hidden.shape == (1, 1500, 32)
    assert torch.isfinite(hidden).all()


def test_known_whisper_name_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty whisper cache
    with pytest.raises(AssetMissingError, match=r"tiny\.en\.pt"):
        build_transcriber(TranscriberSpec(kind="openai_whisper", source="tiny.en"))


def test_faster_whisper_refuses_a_folder_without_a_ctranslate2_model(whisper_hf):
    with pytest.raises(AssetMissingError, match="model.bin"):
        build_transcriber(TranscriberSpec(kind="faster_whisper", source=str(whisper_hf)))


@pytest.mark.parametrize(
    "audio", [np.zeros((2, 16000), np.float32), np.zeros(0, np.float32), np.full(100, np.nan, np.float32)],
    ids=["stereo", "empty", "nan"],
)
def test_unusable_audio_is_a_media_error(audio):
    with pytest.raises(MediaError):
        prepare_audio(audio)


def test_empty_text_to_speech_is_a_typed_error():
    from models.speech import EmptyTextError, build_speech

    voice = build_speech(SpeechSpec(source="shipped:piper-joe-medium", device="cpu"))
    for text in ("", "   ", "..."):
        with pytest.raises(EmptyTextError) as caught:
            voice.synthesize(text)
        assert isinstance(caught.value, SignalgraphError)  # the CLI shows its message, not a traceback


def test_save_wav_writes_16_bit_pcm(tmp_path):
    import soundfile

    from models.speech import save_wav

    path = save_wav(tmp_path / "out" / "tone.wav", _tone(0.5, 22050), 22050)
    info = soundfile.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
    samples, _ = soundfile.read(path, dtype="float32")
    assert np.abs(samples - _tone(0.5, 22050)).max() < 1e-3
