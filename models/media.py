"""Load and validate user media: images, audio and video, each checked against `MediaLimits`.

Every failure a user can cause is a typed error (`models.errors`) whose message says what was
wrong and what to do. Limits are checked from headers before pixels or samples are decoded, so
a 20000x20000 PNG or a ten-hour WAV is refused without allocating it.

Sources are a path (`str` or `Path`) or the file's bytes (an upload). Heavy decoders (Pillow,
soundfile, PyAV, scipy) are imported inside the functions so that importing this module is cheap.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from models.errors import CorruptMediaError, MediaError, MediaTooLargeError
from models.specs import MediaLimits

if TYPE_CHECKING:
    import av
    from PIL import Image

MediaSource = str | Path | bytes

_MB = 2**20


# --- sources ----------------------------------------------------------------------------------


def _describe(source: MediaSource, kind: str) -> str:
    return f"the uploaded {kind}" if isinstance(source, bytes) else f"the {kind} file {str(source)!r}"


def _checked_source(source: MediaSource, limits: MediaLimits, kind: str) -> Path | bytes:
    """The path or bytes to decode, after the existence and byte-size checks."""
    name = _describe(source, kind)
    if isinstance(source, bytes):
        size = len(source)
        found: Path | bytes = source
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise MediaError(f"{name} {what}; check the path (or attach the {kind} again)")
        size = path.stat().st_size
        found = path
    if size == 0:
        raise CorruptMediaError(f"{name} is empty (0 bytes); send the {kind} again")
    if size > limits.max_bytes:
        raise MediaTooLargeError(
            f"{name} is {size / _MB:.1f} MB, over the {limits.max_bytes / _MB:.1f} MB limit; "
            f"send a smaller {kind} or raise limits.max_bytes in the profile"
        )
    return found


def _open_binary(source: Path | bytes) -> IO[bytes]:
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


# --- images -----------------------------------------------------------------------------------


def load_image(source: MediaSource, limits: MediaLimits = MediaLimits()) -> Image.Image:
    """An RGB image, after the byte, pixel-count and integrity checks.

    The pixel count comes from the header (`Image.open` reads no pixel data), so an image over
    `limits.max_image_pixels` is refused before it is decoded. Pillow's own bomb guard (a
    ceiling at twice `PIL.Image.MAX_IMAGE_PIXELS`) still applies and is reported the same way.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    checked = _checked_source(source, limits, "image")
    name = _describe(source, "image")
    too_large = "send a smaller image (or downscale it), or raise limits.max_image_pixels in the profile"
    # We own the file handle, so it is closed on every path, errors included.
    with _open_binary(checked) as fp, warnings.catch_warnings():
        # Pillow warns past its global limit; ours is the one that decides, checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp)
        except Image.DecompressionBombError as exc:
            raise MediaTooLargeError(f"{name} is too large to decode safely ({exc}); {too_large}") from None
        except UnidentifiedImageError:
            raise CorruptMediaError(
                f"{name} is not an image format this system reads (PNG, JPEG, GIF, WebP, BMP, TIFF, ...); "
                "check that it is really an image and send it again"
            ) from None
        except Exception as exc:  # any decoder failure on untrusted bytes means a broken file
            raise CorruptMediaError(f"{name} could not be read as an image ({exc}); send it again") from None

        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise MediaTooLargeError(
                f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{limits.max_image_pixels:,}; {too_large}"
            )
        try:
            image.load()  # decode now, inside the try: truncation surfaces here, not later
        except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than the canvas
            raise MediaTooLargeError(f"{name} is too large to decode safely ({exc}); {too_large}") from None
        except Exception as exc:
            raise CorruptMediaError(
                f"{name} is damaged or truncated ({exc}); the download or upload may have been cut "
                "short, send it again"
            ) from None
    # Phone photos store their rotation in EXIF; apply it so the model sees what the user saw.
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block is no reason to refuse good pixels
        pass
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas on white (a plain convert would turn them black)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --- audio ------------------------------------------------------------------------------------


def load_audio(
    source: MediaSource, limits: MediaLimits = MediaLimits(), sample_rate: int = 16000
) -> np.ndarray:
    """Mono float32 samples at `sample_rate`, after the byte, duration and integrity checks.

    libsndfile reads uncompressed and lossless formats (WAV, FLAC, OGG, MP3, ...); anything else
    (AAC/M4A, Opus in WebM, audio tracks of videos) is decoded with PyAV (FFmpeg).
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    checked = _checked_source(source, limits, "audio")
    name = _describe(source, "audio")
    with _open_binary(checked) as fp:
        _check_wav_complete(fp, name)
    try:
        samples, rate = _read_soundfile(checked, name, limits)
    except _NotForSoundfile as soundfile_error:
        samples, rate = _read_pyav(checked, name, limits, soundfile_error)
    if samples.size == 0:
        raise MediaError(f"{name} holds no audio samples; send a recording that is not empty")
    if not np.isfinite(samples).all():
        raise CorruptMediaError(f"{name} contains NaN or infinite samples; re-export it and send it again")
    return _resample(samples, rate, sample_rate)


class _NotForSoundfile(Exception):
    """libsndfile does not read this container; PyAV gets a turn."""


def _too_long(name: str, seconds: float, limits: MediaLimits, kind: str = "audio") -> MediaTooLargeError:
    limit = limits.max_audio_seconds if kind == "audio" else limits.max_video_seconds
    field = "max_audio_seconds" if kind == "audio" else "max_video_seconds"
    return MediaTooLargeError(
        f"{name} is {seconds:.1f} s long, over the {limit:g} s limit; trim it, send a shorter clip, "
        f"or raise limits.{field} in the profile"
    )


_MAX_WAV_CHUNKS = 1000  # real WAVs have a handful (fmt, LIST, fact, ...); don't walk millions


def _check_wav_complete(fp: IO[bytes], name: str) -> None:
    """Refuse a RIFF/WAVE file whose data chunk is shorter than its header says.

    libsndfile (1.2) opens such a file without complaint and reports only the frames present,
    so a recording cut off mid-upload would silently lose its end. Streaming writers that do not
    know the length in advance write 0 or 0xFFFFFFFF as the size; those are not flagged.
    """
    fp.seek(0, io.SEEK_END)
    size = fp.tell()
    fp.seek(0)
    head = fp.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return  # not a plain RIFF WAV (RF64, W64, other formats): nothing to check here
    offset = 12
    for _ in range(_MAX_WAV_CHUNKS):
        fp.seek(offset)
        chunk = fp.read(8)
        if len(chunk) < 8:
            raise CorruptMediaError(
                f"{name} is a WAV file with no audio data chunk (it ends after {size} bytes of headers); "
                "it is truncated or damaged, send the recording again"
            )
        chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        offset += 8
        if chunk_id == b"data":
            present = size - offset
            if chunk_size not in (0, 0xFFFFFFFF) and present < chunk_size:
                raise CorruptMediaError(
                    f"{name} is a truncated WAV file: its header promises {chunk_size:,} bytes of audio but "
                    f"only {present:,} are present ({100 * present / chunk_size:.0f}%); the recording or "
                    "upload was cut short, send it again"
                )
            return
        offset += chunk_size + (chunk_size & 1)  # chunks are padded to even sizes
    raise CorruptMediaError(
        f"{name} is a WAV file with over {_MAX_WAV_CHUNKS} chunks before its audio data; it is damaged "
        "or not a real recording, re-export it and send it again"
    )


def _cut_short(name: str, exc: Exception) -> CorruptMediaError:
    return CorruptMediaError(f"{name} is damaged and stops decoding part-way ({exc}); send it again")


def _read_soundfile(source: Path | bytes, name: str, limits: MediaLimits) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with _open_binary(source) as fp:
        try:
            handle = sf.SoundFile(fp)
        except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
            raise _NotForSoundfile(str(exc)) from None
        with handle:
            rate, frames = handle.samplerate, handle.frames
            if rate <= 0:
                raise CorruptMediaError(f"{name} declares a sample rate of {rate} Hz; re-export it and send it again")
            if frames / rate > limits.max_audio_seconds:  # from the header, before reading samples
                raise _too_long(name, frames / rate, limits)
            try:
                data = handle.read(dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise _cut_short(name, exc) from None
    if len(data) < frames:
        raise CorruptMediaError(
            f"{name} is truncated: its header promises {frames:,} frames but only {len(data):,} decode; "
            "send the recording again"
        )
    return data.mean(axis=1, dtype=np.float32), rate


def _read_pyav(
    source: Path | bytes, name: str, limits: MediaLimits, soundfile_error: Exception
) -> tuple[np.ndarray, int]:
    import av

    chunks: list[np.ndarray] = []
    with _open_binary(source) as fp:
        try:
            container = av.open(fp, mode="r")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise CorruptMediaError(
                f"{name} could not be read as audio (libsndfile: {soundfile_error}; FFmpeg: {exc}); "
                "send a WAV, FLAC, MP3, OGG or M4A file"
            ) from None
        with container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise CorruptMediaError(f"{name} has no audio track; send a file that contains sound")
            rate = stream.codec_context.sample_rate or stream.rate
            if not rate:
                raise CorruptMediaError(f"{name} does not declare a sample rate; re-export it and send it again")
            declared = _declared_seconds(container, stream)
            if declared is not None and declared > limits.max_audio_seconds:
                raise _too_long(name, declared, limits)
            # Same-rate conversion only: float32, downmixed to mono. Rate changes use scipy below.
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            max_samples = math.ceil(limits.max_audio_seconds * rate)
            total = 0
            try:
                for frame in container.decode(stream):
                    for converted in resampler.resample(frame):
                        chunk = converted.to_ndarray().reshape(-1)
                        chunks.append(chunk)
                        total += len(chunk)
                    if total > max_samples:  # the header lied or had no duration
                        raise _too_long(name, total / rate, limits)
                for converted in resampler.resample(None):
                    chunks.append(converted.to_ndarray().reshape(-1))
            except (av.FFmpegError, OSError, ValueError) as exc:
                raise _cut_short(name, exc) from None
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    return samples, int(rate)


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return np.ascontiguousarray(samples, dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(samples, target // g, rate // g).astype(np.float32)


def _declared_seconds(container, stream) -> float | None:
    """Duration from the container or stream header, or None where neither states one."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


# --- video ------------------------------------------------------------------------------------


def load_video_frames(
    source: MediaSource, limits: MediaLimits = MediaLimits(), frames: int = 5
) -> list[Image.Image]:
    """`frames` RGB frames sampled uniformly across the video (the middle of each equal segment)."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    checked = _checked_source(source, limits, "video")
    name = _describe(source, "video")
    duration, packets = _probe_video(checked, name, limits)
    with _open_video(checked, name) as (container, stream):
        return _sample_frames(container, stream, name, limits, frames, duration, packets)


@contextmanager
def _open_video(source: Path | bytes, name: str) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    import av

    with _open_binary(source) as fp:
        try:
            container = av.open(fp, mode="r")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise CorruptMediaError(
                f"{name} could not be read as a video ({exc}); it is damaged, truncated or not a "
                "video, send an MP4, WebM, MKV or MOV file"
            ) from None
        with container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise CorruptMediaError(f"{name} has no video track; send a file that contains video")
            stream.thread_type = "AUTO"
            yield container, stream


def _probe_video(source: Path | bytes, name: str, limits: MediaLimits) -> tuple[float | None, int | None]:
    """(duration in seconds, packet count), refusing over-long or over-sized videos before decoding.

    Containers that state no duration (raw streams, some WebM) are measured by reading packet
    timestamps, which demuxes but does not decode; the packet count is then kept too, for
    sampling by frame index when even the timestamps are missing.
    """
    import av

    packets = None
    with _open_video(source, name) as (container, stream):
        if stream.codec_context is None:  # PyAV found a track but no codec for it: a cut-off header
            raise CorruptMediaError(f"{name}'s video track cannot be decoded; the file is damaged or truncated, "
                                    "send the whole MP4, WebM, MKV or MOV file")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_image_pixels:
            raise MediaTooLargeError(
                f"{name} has {width}x{height} frames, over the limit of {limits.max_image_pixels:,} pixels; "
                "send a lower-resolution video or raise limits.max_image_pixels in the profile"
            )
        duration = _declared_seconds(container, stream)
        if duration is None:
            end, packets = None, 0
            try:
                for packet in container.demux(stream):
                    if packet.size == 0:  # the flush packet at the end of the stream
                        continue
                    packets += 1
                    if packet.pts is not None and stream.time_base is not None:
                        stop = float((packet.pts + (packet.duration or 0)) * stream.time_base)
                        end = stop if end is None else max(end, stop)
                        if end > limits.max_video_seconds:
                            break
            except (av.FFmpegError, OSError, ValueError) as exc:
                raise CorruptMediaError(f"{name} is damaged ({exc}); send the video again") from None
            duration = end
    if duration is not None and duration > limits.max_video_seconds:
        raise _too_long(name, duration, limits, kind="video")
    return duration, packets


def _sample_frames(
    container, stream, name: str, limits: MediaLimits, count: int, duration: float | None, packets: int | None
) -> list[Image.Image]:
    """Decode once, keeping the first frame at or after each target (no seeking, so exact).

    Targets are times (the middle of each of `count` equal segments of the duration), or frame
    indices when the video states no times at all.
    """
    import av

    by_time = bool(duration)
    span = duration if by_time else float(packets or 0)
    targets = [(i + 0.5) * span / count for i in range(count)]
    picked: list[Image.Image] = []
    last = None
    start: float | None = None
    rate = float(stream.average_rate or 0)
    try:
        for index, frame in enumerate(container.decode(stream)):
            time = frame.time if frame.time is not None else (index / rate if rate else None)
            if time is not None:
                start = time if start is None else start
                if time - start > limits.max_video_seconds:  # the header understated the length
                    raise _too_long(name, time - start, limits, kind="video")
            position = (time - start) if by_time and time is not None else float(index)
            last = frame
            while len(picked) < count and position >= targets[len(picked)] - 1e-6:
                picked.append(frame.to_image())
            if len(picked) == count:
                break
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _cut_short(name, exc) from None
    if last is None:
        raise CorruptMediaError(f"{name} has a video track but no frame decodes; it is damaged, send it again")
    if len(picked) < count:
        # The frames ran out before the last targets. Within a frame or so of the stated length
        # that is rounding (or a video shorter than `count` frames); far short of it, the file was
        # cut off: Matroska/WebM and fast-start MP4 decode up to the cut without an error.
        period = 1.0 / rate if rate else 0.0
        if by_time and position + period < 0.9 * duration - period:
            raise CorruptMediaError(
                f"{name} is truncated: its frames stop at {position + period:.1f} s of a stated "
                f"{duration:.1f} s; the upload or recording was cut short, send it again"
            )
        tail = last.to_image()  # the last targets fall after the last frame: repeat it
        picked.extend(tail.copy() for _ in range(count - len(picked)))
    return [image.convert("RGB") for image in picked]
