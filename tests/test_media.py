"""Media loading: real files written into tmp_path, each broken the way user uploads break."""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from models.errors import CorruptMediaError, MediaError, MediaTooLargeError
from models.media import load_audio, load_image, load_video_frames
from models.specs import MediaLimits

# --- helpers ----------------------------------------------------------------------------------


def _png(path: Path, size=(40, 30), color=(200, 30, 60)) -> Path:
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def _with_png_dims(data: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming other dimensions (and a valid CRC, so it parses)."""
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return data[:16] + ihdr + crc + data[33:]


def _tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def _write_video(path: Path, frames: int = 20, fps: int = 10, size: int = 32, codec: str = "mpeg4") -> Path:
    """Frame i is a flat grey of level 10*i, so a sampled frame tells which index it came from."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for i in range(frames):
            pixels = np.full((size, size, 3), 10 * i, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --- images -----------------------------------------------------------------------------------


def test_image_loads_as_rgb_from_path_and_bytes(tmp_path):
    path = _png(tmp_path / "red.png")
    for source in (path, str(path), path.read_bytes()):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (40, 30)
        assert image.getpixel((0, 0)) == (200, 30, 60)


def test_transparent_image_is_put_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((3, 3)) == (255, 255, 255)


def test_missing_image_file(tmp_path):
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_corrupt_image(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(CorruptMediaError, match="not an image format"):
        load_image(path)


def test_truncated_image(tmp_path):
    rng = np.random.default_rng(0)  # noise does not compress, so half the file is half the pixels
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptMediaError, match="truncated"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    with pytest.raises(CorruptMediaError):
        load_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    # A 40x30 PNG whose header claims 20000x20000: past Pillow's own ceiling. It is refused as too
    # large, not as corrupt, which shows the pixels were never decoded.
    bomb = _with_png_dims(_png(tmp_path / "small.png").read_bytes(), 20000, 20000)
    with pytest.raises(MediaTooLargeError, match="max_image_pixels"):
        load_image(bomb)


def test_our_pixel_limit_applies_below_pillows(tmp_path):
    # 8000x6000 = 48 MP: under Pillow's ceiling, over the default limit of 40 MP
    data = _with_png_dims(_png(tmp_path / "small.png").read_bytes(), 8000, 6000)
    with pytest.raises(MediaTooLargeError, match="8000x6000"):
        load_image(data)
    with pytest.raises(MediaTooLargeError, match="40x30"):
        load_image(tmp_path / "small.png", MediaLimits(max_image_pixels=1000))


def test_image_over_max_bytes(tmp_path):
    path = _png(tmp_path / "red.png")
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_image(path, MediaLimits(max_bytes=50))


# --- audio ------------------------------------------------------------------------------------


def test_wav_loads_mono_float32_resampled(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, _tone(0.5, 8000, channels=2), 8000, subtype="PCM_16")
    samples = load_audio(path, sample_rate=16000)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == 8000  # 0.5 s at 16 kHz
    assert 0.45 < np.abs(samples).max() < 0.55


def test_compressed_audio_goes_through_pyav(tmp_path):
    import av

    path = tmp_path / "tone.m4a"  # AAC in MP4: a container libsndfile does not read
    rate = 16000
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        tone = _tone(1.0, rate)
        for start in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    samples = load_audio(path)
    assert samples.dtype == np.float32
    assert abs(len(samples) - rate) < 0.1 * rate
    assert np.abs(samples).max() > 0.2


def test_truncated_wav_is_corrupt_not_shorter(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, _tone(1.0, 16000), 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # libsndfile itself opens it and reports just the frames present
    assert sf.info(str(path)).frames < 16000
    with pytest.raises(CorruptMediaError, match="truncated"):
        load_audio(path)


def test_wav_cut_inside_its_header(tmp_path):
    path = tmp_path / "head.wav"
    sf.write(path, _tone(0.1, 16000), 16000)
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(CorruptMediaError):
        load_audio(path)


def test_truncated_flac(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, _tone(1.0, 16000), 16000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptMediaError):
        load_audio(path)


def test_audio_over_the_duration_limit(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, _tone(2.0, 8000), 8000)
    with pytest.raises(MediaTooLargeError, match="2.0 s long"):
        load_audio(path, MediaLimits(max_audio_seconds=1.0))


def test_not_audio(tmp_path):
    path = tmp_path / "text.wav"
    path.write_bytes(b"hello, this is text pretending to be a recording" * 20)
    with pytest.raises(CorruptMediaError, match="could not be read as audio"):
        load_audio(path)


# --- video ------------------------------------------------------------------------------------


def test_video_sampling_is_uniform(tmp_path):
    path = _write_video(tmp_path / "ramp.mp4", frames=20, fps=10)
    frames = load_video_frames(path, frames=5)
    assert len(frames) == 5
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    # the middles of five 0.4 s segments of a 2 s video: frames 2, 6, 10, 14, 18
    levels = [np.asarray(f, dtype=np.float32).mean() for f in frames]
    assert levels == sorted(levels)
    assert np.allclose(levels, [20, 60, 100, 140, 180], atol=8)


def test_video_from_bytes_and_more_samples_than_frames(tmp_path):
    path = _write_video(tmp_path / "short.mp4", frames=3, fps=10)
    frames = load_video_frames(path.read_bytes(), frames=6)
    assert len(frames) == 6


def test_video_over_the_duration_limit(tmp_path):
    path = _write_video(tmp_path / "ramp.mp4", frames=20, fps=10)
    with pytest.raises(MediaTooLargeError, match="max_video_seconds"):
        load_video_frames(path, MediaLimits(max_video_seconds=1.0))


def test_corrupt_video(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptMediaError):
        load_video_frames(path)


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_truncated_video(tmp_path, suffix):
    # MP4 loses its index (written last); Matroska decodes up to the cut without an error,
    # so the loader must notice that the frames stop long before the stated duration.
    data = _write_video(tmp_path / f"ramp.{suffix}").read_bytes()
    with pytest.raises(CorruptMediaError):
        load_video_frames(data[: int(len(data) * 0.6)])


def test_audio_file_is_not_a_video(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, _tone(0.2, 8000), 8000)
    with pytest.raises(CorruptMediaError, match="no video track"):
        load_video_frames(path)
