"""Real shipped weights: piper speaks, Whisper (tiny.en and base) hears it back, MiniLM ranks meaning.

Run with `pytest -m smoke -s` to see the transcripts, word error rates and timings.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from models.specs import EmbedderSpec, SpeechSpec, TranscriberSpec

pytestmark = pytest.mark.smoke

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send the weekly report to the team before Friday morning.",
]
MAX_WER = 0.20


def _normalise(text: str) -> str:
    """Case and punctuation do not count as recognition errors."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def spoken() -> list[tuple[str, np.ndarray, int]]:
    from models.speech import build_speech

    voice = build_speech(SpeechSpec(source="shipped:piper-joe-medium", device="cpu"))
    clips = []
    for sentence in SENTENCES:
        start = time.perf_counter()
        samples, rate = voice.synthesize(sentence)
        seconds = time.perf_counter() - start
        print(f"\n[tts] {seconds:.2f}s for {len(samples) / rate:.2f}s of audio at {rate} Hz: {sentence!r}")
        assert samples.dtype == np.float32 and samples.ndim == 1
        assert 0.05 < np.abs(samples).max() <= 1.0  # audible, in range
        clips.append((sentence, samples, rate))
    return clips


@pytest.mark.parametrize("source", ["shipped:whisper-tiny.en", "shipped:whisper-base"])
def test_whisper_hears_what_piper_said(spoken, source):
    import jiwer
    from scipy.signal import resample_poly

    from models.transcriber import SAMPLE_RATE, build_transcriber

    transcriber = build_transcriber(TranscriberSpec(kind="faster_whisper", source=source, device="cpu"))
    transcriber.transcribe(np.zeros(SAMPLE_RATE, np.float32))  # warm-up, so timings show steady state
    references, hypotheses = [], []
    for sentence, samples, rate in spoken:
        # resample here, as a caller with a file at another rate would (22050 -> 16000 is 320/441)
        audio = resample_poly(samples, SAMPLE_RATE // 50, rate // 50).astype(np.float32)
        start = time.perf_counter()
        transcript = transcriber.transcribe(audio)
        seconds = time.perf_counter() - start
        duration = len(audio) / SAMPLE_RATE
        wer = jiwer.wer(_normalise(sentence), _normalise(transcript.text))
        print(f"\n[{source}] {seconds:.2f}s for {duration:.2f}s (real-time factor {seconds / duration:.3f}) "
              f"WER {wer:.3f}: {transcript.text!r}")
        assert transcript.language == "en"
        assert transcript.duration == pytest.approx(duration, abs=0.05)
        references.append(_normalise(sentence))
        hypotheses.append(_normalise(transcript.text))
    wer = jiwer.wer(references, hypotheses)
    print(f"[{source}] corpus WER {wer:.3f}")
    assert wer <= MAX_WER


def test_two_sentences_in_one_call_are_both_heard(spoken):
    """piper renders sentence by sentence; the joined clip must still read as one passage."""
    import jiwer

    from models.speech import build_speech
    from models.transcriber import build_transcriber

    passage = " ".join(SENTENCES)
    samples, rate = build_speech(SpeechSpec(source="shipped:piper-joe-medium", device="cpu")).synthesize(passage)
    transcriber = build_transcriber(
        TranscriberSpec(kind="faster_whisper", source="shipped:whisper-tiny.en", device="cpu"))
    transcript = transcriber.transcribe(samples, sample_rate=rate)  # the transcriber resamples
    wer = jiwer.wer(_normalise(passage), _normalise(transcript.text))
    print(f"\n[passage] WER {wer:.3f}: {transcript.text!r}")
    assert wer <= MAX_WER


def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence():
    from models.embedder import build_embedder

    embedder = build_embedder(EmbedderSpec(source="shipped:all-minilm-l6-v2", device="cpu"))
    texts = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."]
    vectors = embedder.embed(texts)  # also the warm-up: the first call pays for lazy initialisation
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        embedder.embed(texts)
        timings.append(time.perf_counter() - start)
    seconds = float(np.median(timings))
    assert vectors.shape == (3, embedder.dim) == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    print(f"\n[minilm] {seconds * 1000:.1f} ms (median of 5) for 3 sentences; cosine paraphrase {paraphrase:.3f}, "
          f"unrelated {unrelated:.3f}")
    assert paraphrase > unrelated + 0.3
