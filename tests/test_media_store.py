"""The content-addressed media store: allowed folders, ids per session and kind, dedupe, no overwrites.

Real files only (small PNGs, WAVs and an MPEG-4 clip written here); no models are loaded.
"""

from __future__ import annotations

import stat
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import CorruptMediaError, MediaError, MediaTooLargeError, SignalgraphError
from models.media import load_audio, load_image
from models.specs import MediaLimits
from tools.media_store import MediaNotFoundError, MediaStore, PathNotAllowedError


def _png_bytes(color=(200, 30, 60), size=(24, 16)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _wav(path: Path, seconds: float = 0.25, rate: int = 16_000, freq: float = 440.0) -> Path:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, subtype="PCM_16")
    return path


def _video(path: Path, frames: int = 6, fps: int = 10, size: int = 32) -> Path:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * i, dtype=np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    folder = tmp_path / "allowed"
    folder.mkdir()
    (folder / "red.png").write_bytes(_png_bytes())
    (folder / "red-copy.png").write_bytes(_png_bytes())
    (folder / "blue.png").write_bytes(_png_bytes((10, 20, 230)))
    _wav(folder / "tone.wav")
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.png").write_bytes(_png_bytes((0, 255, 0)))  # a valid image: refusal is about the path
    return folder


@pytest.fixture
def store(tmp_path: Path, allowed: Path):
    with MediaStore(tmp_path / "store", allowed_dirs=[allowed]) as s:
        yield s


def _blobs(store: MediaStore) -> list[Path]:
    return sorted(p for p in (store.root / "blobs").rglob("*") if p.is_file())


# --- adding user files ------------------------------------------------------------------------


def test_add_file_stores_the_bytes_once_by_sha256(store, allowed):
    record = store.add_file("s1", allowed / "red.png")
    assert record.id == "image-1" and record.kind == "image" and record.origin == "user"
    assert record.suffix == ".png" and record.meta == {"width": 24, "height": 16}
    assert record.path == store.root / "blobs" / record.sha256[:2] / f"{record.sha256}.png"
    assert record.path.read_bytes() == (allowed / "red.png").read_bytes()
    assert load_image(record.path).size == (24, 16)
    assert store.get("s1", "image-1") == record


def test_ids_count_per_session_and_per_kind(store, allowed):
    ids = [store.add_file("s1", allowed / name).id for name in ("red.png", "tone.wav", "blue.png")]
    assert ids == ["image-1", "audio-1", "image-2"]
    assert store.add_file("s2", allowed / "blue.png").id == "image-1"  # another session counts from 1
    assert [r.id for r in store.list("s1")] == ["image-1", "audio-1", "image-2"]
    assert store.get("s1", "audio-1").meta["seconds"] == pytest.approx(0.25)


def test_kind_comes_from_the_suffix_or_is_given(store, allowed):
    (allowed / "noext").write_bytes(_png_bytes())
    with pytest.raises(MediaError, match="give the kind"):
        store.add_file("s1", allowed / "noext")
    assert store.add_file("s1", allowed / "noext", kind="image").kind == "image"


def test_video_is_validated_and_gets_a_video_id(store, allowed):
    record = store.add_file("s1", _video(allowed / "clip.mp4"))
    assert record.id == "video-1" and record.meta == {"width": 32, "height": 32}


def test_relative_paths_are_taken_from_the_allowed_folder(store, allowed):
    assert store.add_file("s1", "red.png").path.read_bytes() == (allowed / "red.png").read_bytes()


def test_same_bytes_are_stored_once_and_keep_their_id_in_a_session(store, allowed):
    first = store.add_file("s1", allowed / "red.png")
    again = store.add_file("s1", allowed / "red-copy.png")  # other name, same bytes
    assert again.id == first.id == "image-1"  # re-attaching does not multiply ids
    other = store.add_file("s2", allowed / "red-copy.png")
    assert other.id == "image-1" and other.sha256 == first.sha256 and other.path == first.path
    assert len(_blobs(store)) == 1


def test_uploaded_bytes(store):
    record = store.add_bytes("s1", _png_bytes(), "image", "PNG")
    assert record.id == "image-1" and record.suffix == ".png"
    with pytest.raises(CorruptMediaError):
        store.add_bytes("s1", b"not an image at all", "image", ".png")
    with pytest.raises(MediaError, match="suffix"):
        store.add_bytes("s1", _png_bytes(), "image", "../../x")
    with pytest.raises(MediaError, match="unknown media kind"):
        store.add_bytes("s1", _png_bytes(), "text", ".png")


# --- refusals ---------------------------------------------------------------------------------


def test_dot_dot_escape_is_refused(store, allowed, outside):
    with pytest.raises(PathNotAllowedError, match="outside the folders"):
        store.add_file("s1", allowed / ".." / "outside" / "secret.png")
    with pytest.raises(PathNotAllowedError):
        store.add_file("s1", "../outside/secret.png")  # relative to the allowed folder
    assert store.list("s1") == []


def test_absolute_path_outside_is_refused(store, outside):
    with pytest.raises(PathNotAllowedError):
        store.add_file("s1", outside / "secret.png")
    with pytest.raises(PathNotAllowedError):
        store.add_file("s1", "/etc/passwd")


def test_symlink_pointing_outside_is_refused(store, allowed, outside):
    (allowed / "innocent.png").symlink_to(outside / "secret.png")
    (allowed / "linked-dir").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathNotAllowedError):
        store.add_file("s1", allowed / "innocent.png")
    with pytest.raises(PathNotAllowedError):
        store.add_file("s1", allowed / "linked-dir" / "secret.png")


def test_symlink_inside_the_allowed_folder_is_fine(store, allowed):
    (allowed / "alias.png").symlink_to(allowed / "blue.png")
    assert store.add_file("s1", allowed / "alias.png").path.read_bytes() == (allowed / "blue.png").read_bytes()


def test_no_allowed_folders_means_no_paths(tmp_path, allowed):
    with MediaStore(tmp_path / "closed") as closed:
        with pytest.raises(PathNotAllowedError, match="upload the file instead"):
            closed.add_file("s1", allowed / "red.png")
        assert closed.add_bytes("s1", _png_bytes(), "image", ".png").id == "image-1"  # uploads still work


def test_corrupt_and_missing_files_raise_the_media_errors(store, allowed):
    (allowed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(CorruptMediaError):
        store.add_file("s1", allowed / "broken.png")
    with pytest.raises(MediaError, match="does not exist"):
        store.add_file("s1", allowed / "missing.png")
    assert store.list("s1") == [] and _blobs(store) == []


def test_limits_apply(tmp_path, allowed):
    with MediaStore(tmp_path / "small", allowed_dirs=[allowed], limits=MediaLimits(max_image_pixels=100)) as small:
        with pytest.raises(MediaTooLargeError):
            small.add_file("s1", allowed / "red.png")


# --- generated media --------------------------------------------------------------------------


def test_generated_media_always_get_new_ids_and_never_overwrite(store, allowed):
    user = store.add_file("s1", allowed / "red.png")
    same = store.add_generated("s1", "image", _png_bytes(), ".png", {"prompt": "red"})  # bytes of image-1
    twice = store.add_generated("s1", "image", _png_bytes(), ".png", {"prompt": "red"})
    assert [user.id, same.id, twice.id] == ["image-1", "image-2", "image-3"]
    assert same.origin == "generated" and same.meta == {"prompt": "red"}
    assert len(_blobs(store)) == 1  # still one blob for one content
    blue = store.add_generated("s1", "image", _png_bytes((10, 20, 230)), ".png")
    assert blue.id == "image-4" and blue.path != same.path
    assert store.get("s1", "image-2").path.read_bytes() == _png_bytes()  # earlier output untouched
    assert stat.S_IMODE(blue.path.stat().st_mode) == 0o444  # blobs are read-only


def test_meta_must_be_json(store):
    with pytest.raises(TypeError):
        store.add_generated("s1", "image", _png_bytes(), ".png", {"bad": object()})
    assert store.list("s1") == []


# --- lookups and sessions ---------------------------------------------------------------------


def test_missing_id_lists_the_known_ids(store, allowed):
    store.add_file("s1", allowed / "red.png")
    store.add_file("s1", allowed / "tone.wav")
    with pytest.raises(MediaNotFoundError, match=r"'image-7'.*known media ids: image-1, audio-1"):
        store.get("s1", "image-7")
    with pytest.raises(MediaNotFoundError, match="looks like a file path"):
        store.get("s1", "/tmp/cat.jpg")


def test_sessions_are_isolated(store, allowed):
    store.add_file("s1", allowed / "red.png")
    with pytest.raises(MediaNotFoundError, match="this session has no media yet"):
        store.get("s2", "image-1")
    assert store.list("s2") == []
    with pytest.raises(SignalgraphError):
        store.get("", "image-1")


def test_delete_session_keeps_blobs_other_sessions_use(store, allowed):
    shared = store.add_file("s1", allowed / "red.png")
    store.add_file("s2", allowed / "red.png")
    only_s1 = store.add_file("s1", allowed / "blue.png")
    assert store.delete_session("s1") == 2
    assert store.list("s1") == []
    assert shared.path.is_file() and not only_s1.path.exists()
    assert store.get("s2", "image-1").path.read_bytes() == (allowed / "red.png").read_bytes()
    assert store.add_file("s1", allowed / "blue.png").id == "image-1"  # a deleted session starts afresh


def test_the_index_survives_a_restart(tmp_path, allowed):
    with MediaStore(tmp_path / "store", allowed_dirs=[allowed]) as first:
        first.add_file("s1", allowed / "red.png")
    with MediaStore(tmp_path / "store", allowed_dirs=[allowed]) as second:
        assert second.get("s1", "image-1").path.is_file()
        assert second.add_generated("s1", "image", _png_bytes(), ".png").id == "image-2"


# --- threads ----------------------------------------------------------------------------------


def test_eight_threads_adding_at_once_get_eight_ids(store):
    uploads = [_png_bytes((30 * i, 10, 10)) for i in range(8)]
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def upload(data: bytes) -> None:
        try:
            barrier.wait()
            results.append(store.add_bytes("s1", data, "image", ".png").id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def generate() -> None:
        try:
            barrier.wait()
            results.append(store.add_generated("s1", "audio", b"same bytes", ".wav").id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(d,)) for d in uploads]
    threads += [threading.Thread(target=generate) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == sorted([f"image-{i}" for i in range(1, 9)] + [f"audio-{i}" for i in range(1, 9)])
    assert len(_blobs(store)) == 9  # eight images, one shared audio blob


def test_a_stored_wav_loads(store, allowed):
    record = store.add_file("s1", allowed / "tone.wav")
    assert len(load_audio(record.path)) == 4000
