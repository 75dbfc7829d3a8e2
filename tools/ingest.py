"""Put notes, documents and media into the knowledge base as searchable chunks.

`ingest_paths(kb, paths)` walks files and folders (recursively, sorted, hidden entries skipped)
and turns each supported file into chunks of at most `chunk_chars` characters, the next one
starting with the last ~`overlap` characters of the one before:

| files | how | metadata beside `source`, `position`, `kind` |
|---|---|---|
| `.txt` | UTF-8 text, split on paragraphs, lines, sentences, words | — |
| `.md`, `.markdown` | on `#` headings first (not inside code fences), then by size | `heading` ("A > B") |
| `.pdf` | text of each page (pypdf), split by size within the page | `page` (1-based) |
| `.wav .flac .mp3 .ogg` | `transcribe(path)`, if given | `media` |
| `.png .jpg .jpeg .webp` | `describe(path)`, if given | `media` |

`source` is the file's absolute path and `position` the chunk's index within the file. A chunk's
id is a hash of source, position, metadata and text, so ingesting a file again keeps the chunks
that did not change (without embedding them again), adds the new ones and removes the stale ones
— it never duplicates.

Media callbacks belong to the caller, which owns the media store: `transcribe(path)` and
`describe(path)` store the file and return `(media_id, text)` (a plain `str` is taken as text
without a media id). They may raise; the file is then skipped with the error's message.

Nothing one file does stops the others: unsupported, unreadable, corrupt or empty files end up in
`IngestReport.skipped` with a reason. Errors of the knowledge base itself (for example embeddings
of another dimension) are not about a file and are raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import SignalgraphError
from tools.knowledge_base import KnowledgeBase

MediaCallback = Callable[[Path], "tuple[str | None, str] | str"]

TEXT_SUFFIXES = frozenset({".txt"})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
PDF_SUFFIXES = frozenset({".pdf"})
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | MARKDOWN_SUFFIXES | PDF_SUFFIXES | AUDIO_SUFFIXES | IMAGE_SUFFIXES

_MB = 2**20


class IngestError(SignalgraphError):
    """Ingestion was asked for something it cannot do (e.g. chunk sizes that make no sense)."""


class _Skip(Exception):
    """This file cannot be ingested; the message says why (internal to a file's processing)."""


# --- the report -------------------------------------------------------------------------------


@dataclass
class IngestedFile:
    source: str
    kind: str  # text, markdown, pdf, audio, image
    chunks: int  # chunks the file has in the knowledge base now
    added: int  # of those, newly embedded
    removed: int = 0  # stale chunks from an earlier ingest of the file, now deleted
    media: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def unchanged(self) -> int:
        return self.chunks - self.added


@dataclass
class SkippedFile:
    source: str
    reason: str


@dataclass
class IngestReport:
    files: list[IngestedFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def chunks_added(self) -> int:
        return sum(f.added for f in self.files)

    @property
    def chunks(self) -> dict[str, int]:
        """Chunks per ingested file (source → count)."""
        return {f.source: f.chunks for f in self.files}

    def summary(self) -> str:
        lines = []
        for f in self.files:
            what = f"{f.chunks} chunks ({f.added} new"
            what += f", {f.unchanged} unchanged" if f.unchanged else ""
            what += f", {f.removed} removed" if f.removed else ""
            lines.append(f"+ {f.source}: {what})" + "".join(f"; {n}" for n in f.notes))
        lines += [f"- {s.source}: skipped, {s.reason}" for s in self.skipped]
        lines.append(
            f"{len(self.files)} files ingested ({self.chunks_added} chunks embedded), {len(self.skipped)} skipped"
        )
        return "\n".join(lines)


# --- splitting --------------------------------------------------------------------------------

_SEPARATORS = ("\n\n", "\n", ". ", " ")


def _pieces(text: str, size: int, separators: tuple[str, ...]) -> list[str]:
    """Cut text into pieces of at most `size` characters at the coarsest separator that works."""
    if len(text) <= size:
        return [text]
    if not separators:
        return [text[i : i + size] for i in range(0, len(text), size)]
    sep, finer = separators[0], separators[1:]
    parts = text.split(sep)
    if len(parts) == 1:
        return _pieces(text, size, finer)
    out: list[str] = []
    for i, part in enumerate(parts):
        part = part + sep if i < len(parts) - 1 else part  # the separator stays with what it ends
        if part:
            out.extend(_pieces(part, size, finer))
    return out


def _tail(text: str, overlap: int) -> str:
    """The last ~`overlap` characters of text, starting at a word."""
    if overlap <= 0:
        return ""
    tail = text[-overlap:]
    if len(tail) < len(text) and not text[-overlap - 1].isspace():
        cut = re.search(r"\s", tail)
        tail = tail[cut.end() :] if cut else ""
    return tail.lstrip()


def split_text(text: str, chunk_chars: int = 800, overlap: int = 120) -> list[str]:
    """Chunks of at most `chunk_chars` characters, cut at paragraphs, lines, sentences, then words;
    each chunk after the first starts with the last ~`overlap` characters of the one before."""
    if chunk_chars < 1 or not 0 <= overlap < chunk_chars:
        raise IngestError(
            f"chunk_chars={chunk_chars}, overlap={overlap}: need chunk_chars >= 1 and 0 <= overlap < chunk_chars"
        )
    chunks: list[str] = []
    current = ""
    for piece in _pieces(text, chunk_chars, _SEPARATORS):
        if current and len(current) + len(piece) > chunk_chars:
            if current.strip():
                chunks.append(current.strip())
            carry = _tail(current.rstrip(), overlap)
            current = carry + " " if carry and len(carry) + 1 + len(piece) <= chunk_chars else ""
        current += piece
    if current.strip():
        chunks.append(current.strip())
    return chunks


_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def markdown_sections(text: str) -> list[tuple[str | None, str]]:
    """(heading trail, section text) in order; a section's text starts with its heading line.

    The trail names the enclosing headings ("Setup > Install"). A heading with no text of its
    own before the next heading is folded into the next section rather than left as a chunk.
    """
    sections: list[tuple[str | None, str]] = []
    trail: list[tuple[int, str]] = []
    lines: list[str] = []
    heading: str | None = None
    body = False  # has the current section text besides headings?
    fence: str | None = None
    for line in text.splitlines():
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
            lines.append(line)
            body = True
            continue
        if opened:
            fence = opened.group(1)
        found = None if opened else _HEADING.match(line)
        if found:
            if body:
                sections.append((heading, "\n".join(lines)))
                lines, body = [], False
            level, title = len(found.group(1)), found.group(2).strip()
            trail = [(lvl, t) for lvl, t in trail if lvl < level] + [(level, title)]
            heading = " > ".join(t for _, t in trail if t) or None
        elif line.strip():
            body = True
        lines.append(line)
    if any(line.strip() for line in lines):
        sections.append((heading, "\n".join(lines)))
    return sections


# --- reading files ----------------------------------------------------------------------------

Piece = tuple[str, dict[str, Any]]  # chunk text, metadata beyond source/position/kind


def _read_text(path: Path, max_bytes: int) -> str:
    size = path.stat().st_size
    if size > max_bytes:
        raise _Skip(f"{size / _MB:.1f} MB is over the {max_bytes / _MB:.0f} MB limit for text files; split it")
    data = path.read_bytes()
    if b"\x00" in data:
        raise _Skip("it looks binary (contains NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Skip(f"it is not UTF-8 text (bad byte at offset {exc.start}); re-save it as UTF-8") from None


def _text_pieces(path: Path, chunk_chars: int, overlap: int, max_bytes: int) -> list[Piece]:
    return [(c, {}) for c in split_text(_read_text(path, max_bytes), chunk_chars, overlap)]


def _markdown_pieces(path: Path, chunk_chars: int, overlap: int, max_bytes: int) -> list[Piece]:
    pieces: list[Piece] = []
    for heading, section in markdown_sections(_read_text(path, max_bytes)):
        extra = {"heading": heading} if heading else {}
        pieces += [(c, dict(extra)) for c in split_text(section, chunk_chars, overlap)]
    return pieces


def _pdf_pieces(path: Path, chunk_chars: int, overlap: int, max_bytes: int, notes: list[str]) -> list[Piece]:
    from pypdf import PdfReader

    size = path.stat().st_size
    if size > max_bytes:
        raise _Skip(f"{size / _MB:.1f} MB is over the {max_bytes / _MB:.0f} MB limit for PDFs")
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Skip("the PDF is encrypted with a password; save an unlocked copy and ingest that")
        pages = [page.extract_text() or "" for page in reader.pages]
    except _Skip:
        raise
    except Exception as exc:  # pypdf raises many types for broken files
        raise _Skip(f"it is not a readable PDF ({type(exc).__name__}: {exc})") from None
    pieces: list[Piece] = []
    empty = []
    for number, text in enumerate(pages, start=1):
        chunks = split_text(text, chunk_chars, overlap)
        if not chunks:
            empty.append(number)
        pieces += [(c, {"page": number}) for c in chunks]
    if empty and pieces:
        notes.append(f"no text on page{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} (scanned?)")
    if not pieces and pages:
        raise _Skip("no extractable text in the PDF (scanned pages need OCR first)")
    return pieces


def _media_pieces(
    path: Path, callback: MediaCallback, chunk_chars: int, overlap: int, what: str
) -> tuple[list[Piece], str | None]:
    try:
        result = callback(path)
    except SignalgraphError as exc:
        raise _Skip(str(exc)) from None
    except Exception as exc:
        raise _Skip(f"{what} failed ({type(exc).__name__}: {exc})") from None
    media_id, text = (None, result) if isinstance(result, str) else result
    extra = {"media": media_id} if media_id else {}
    pieces = [(c, dict(extra)) for c in split_text(text or "", chunk_chars, overlap)]
    if not pieces:
        raise _Skip(f"the {what} is empty")
    return pieces, media_id


# --- walking paths ----------------------------------------------------------------------------


def _files(paths: Iterable[str | Path], report: IngestReport, own: set[Path]) -> list[Path]:
    """Files to ingest, in order, each once: given files as they are, folders walked (hidden entries
    and the knowledge base's own files skipped)."""
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file():
            found[path.resolve()] = None
        elif path.is_dir():
            inside = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files = (Path(root, n).resolve() for n in sorted(names) if not n.startswith("."))
                inside += [f for f in files if f not in own]
            if not inside:
                report.skipped.append(SkippedFile(str(path.resolve()), "the folder has no files"))
            found.update(dict.fromkeys(inside))
        elif path.exists():
            report.skipped.append(SkippedFile(str(path), "not a regular file or folder"))
        else:
            report.skipped.append(SkippedFile(str(path), "does not exist; check the path"))
    return list(found)


def chunk_id(source: str, position: int, text: str, metadata: dict[str, Any]) -> str:
    key = "\x00".join([source, str(position), json.dumps(metadata, sort_keys=True, default=str), text])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def ingest_paths(
    kb: KnowledgeBase,
    paths: Iterable[str | Path] | str | Path,
    *,
    transcribe: MediaCallback | None = None,
    describe: MediaCallback | None = None,
    chunk_chars: int = 800,
    overlap: int = 120,
    max_bytes: int = 50 * _MB,
    progress: Callable[[Path], None] | None = None,
) -> IngestReport:
    """Ingest files and folders into `kb`; see the module docstring for what becomes what.

    `progress(path)` is called before each file, for a progress bar.
    """
    split_text("", chunk_chars, overlap)  # refuse bad sizes before touching anything
    if isinstance(paths, str | Path):
        paths = [paths]
    report = IngestReport()
    own = set()
    if isinstance(kb.path, Path):  # a knowledge base kept inside the folder it indexes
        own = {Path(str(kb.path.resolve()) + end) for end in ("", "-journal", "-wal", "-shm")}
    for path in _files(paths, report, own):
        if progress is not None:
            progress(path)
        _ingest_file(kb, path, report, transcribe, describe, chunk_chars, overlap, max_bytes)
    return report


def _ingest_file(
    kb: KnowledgeBase,
    path: Path,
    report: IngestReport,
    transcribe: MediaCallback | None,
    describe: MediaCallback | None,
    chunk_chars: int,
    overlap: int,
    max_bytes: int,
) -> None:
    source, suffix = str(path), path.suffix.lower()
    notes: list[str] = []
    media_id = None
    try:
        if suffix in TEXT_SUFFIXES:
            kind, pieces = "text", _text_pieces(path, chunk_chars, overlap, max_bytes)
        elif suffix in MARKDOWN_SUFFIXES:
            kind, pieces = "markdown", _markdown_pieces(path, chunk_chars, overlap, max_bytes)
        elif suffix in PDF_SUFFIXES:
            kind, pieces = "pdf", _pdf_pieces(path, chunk_chars, overlap, max_bytes, notes)
        elif suffix in AUDIO_SUFFIXES:
            if transcribe is None:
                raise _Skip("audio, and no transcriber was given (ingest it where speech-to-text is set up)")
            kind = "audio"
            pieces, media_id = _media_pieces(path, transcribe, chunk_chars, overlap, "transcript")
        elif suffix in IMAGE_SUFFIXES:
            if describe is None:
                raise _Skip("an image, and no describer was given (ingest it where image description is set up)")
            kind = "image"
            pieces, media_id = _media_pieces(path, describe, chunk_chars, overlap, "description")
        else:
            supported = " ".join(sorted(SUPPORTED_SUFFIXES))
            raise _Skip(f"unsupported file type {suffix or '(no extension)'!r}; supported: {supported}")
    except _Skip as skip:
        report.skipped.append(SkippedFile(source, str(skip)))
        return
    except OSError as exc:
        report.skipped.append(SkippedFile(source, f"cannot read it ({exc.strerror or exc})"))
        return

    if not pieces:
        removed = kb.delete_where({"source": source})
        also = f" (its {removed} chunks from an earlier ingest were removed)" if removed else ""
        report.skipped.append(SkippedFile(source, f"there is no text in it{also}"))
        return

    texts, metadatas, ids = [], [], []
    for position, (text, extra) in enumerate(pieces):
        metadata = {"source": source, "position": position, "kind": kind, **extra}
        texts.append(text)
        metadatas.append(metadata)
        ids.append(chunk_id(source, position, text, metadata))
    before = set(kb.ids_where({"source": source}))
    new = [i for i, id_ in enumerate(ids) if id_ not in before]
    if new:  # add before removing, so a failure leaves the earlier version searchable
        kb.add_texts([texts[i] for i in new], [metadatas[i] for i in new], ids=[ids[i] for i in new])
    stale = sorted(before - set(ids))
    kb.delete(stale)
    report.files.append(IngestedFile(source, kind, len(ids), len(new), len(stale), media_id, notes))
