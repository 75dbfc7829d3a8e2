"""Speech to text: the real-time factor (processing time / audio duration) of the profile's
transcriber, on the clip that ships with the repo and, where the profile has a voice, on speech
its own text-to-speech synthesizes. Below 1.0 is faster than real time, the baseline."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

SHIPPED_CLIP = Path(__file__).resolve().parents[2] / "examples" / "data" / "question.wav"
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Please send the weekly report to the team before Friday morning."]


def _clips(profile) -> list[tuple[str, np.ndarray, int]]:
    import soundfile

    audio, rate = soundfile.read(SHIPPED_CLIP, dtype="float32", always_2d=True)
    clips = [(SHIPPED_CLIP.name, audio.mean(axis=1), rate)]
    if profile.speech is not None:
        from models.speech import build_speech

        voice = build_speech(profile.speech)
        for i, sentence in enumerate(SENTENCES):
            samples, rate = voice.synthesize(sentence)
            clips.append((f"piper sentence {i + 1}", samples, rate))
    return clips


def asr(profile_name: str, *, repeats: int = 3) -> dict:
    from models.profiles import load_profile
    from models.transcriber import build_transcriber

    profile = load_profile(profile_name)
    if profile.transcriber is None:
        from models.errors import ConfigError

        raise ConfigError(f"profile {profile.name!r} has no transcriber, so it has no ASR figure")
    start = time.perf_counter()
    transcriber = build_transcriber(profile.transcriber)
    load_s = time.perf_counter() - start
    clips = _clips(profile)
    transcriber.transcribe(*clips[0][1:])  # first-call set-up is load time, not transcription
    audio = sum(len(samples) / rate for _, samples, rate in clips)  # seconds of audio in one pass
    seconds = 0.0  # processing time over all passes
    texts = {}
    for name, samples, rate in clips:
        for _ in range(repeats):
            start = time.perf_counter()
            transcript = transcriber.transcribe(samples, rate)
            seconds += time.perf_counter() - start
        texts[name] = transcript.text
    return {"profile": profile.name, "transcriber": f"{profile.transcriber.kind} {profile.transcriber.source}",
            "clips": len(clips), "repeats": repeats, "audio_s": round(audio, 2), "processing_s": round(seconds, 3),
            "rtf": round(seconds / (audio * repeats), 4), "load_s": round(load_s, 2), "transcripts": texts}
