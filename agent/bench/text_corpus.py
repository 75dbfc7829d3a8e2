"""Real text embeddings for the retrieval benchmarks: up to about a million chunks of English prose
found on this machine, embedded by the shipped MiniLM, and held-out questions to search them with.

    python -m agent.bench.text_corpus --chunks 1000000   # embeds once; the benchmarks reuse the cache

Synthetic clustered vectors (agent/bench/retrieval.py) are the hard case for an approximate index:
inside a cluster they have no structure to follow. Embeddings of real text do, which is what a
knowledge base holds. The chunks are the sentences of the documentation installed with Python and
its packages (docstrings, README and reference files, /usr/share/doc), each once; past their number,
chunks of two consecutive sentences. The queries are sentences of Signalgraph's own docs, a
different subject, none of them among the chunks.

Embedding runs on the CPU in bf16 autocast over each chunk's first 64 tokens (cosine 0.997 to the
fp32 embedding of the whole sentence on a sample), in blocks of 50,000 saved as they finish, so an
interrupted run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np

SOURCES = (Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share/doc"))
QUERY_SOURCE = Path(__file__).resolve().parents[2] / "docs"
BLOCK = 50_000
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_DOCSTRING = re.compile(r'"""(.*?)"""', re.S)
_COMMENT = re.compile(r"^\s*# (.*)$", re.M)


def sentences(text: str) -> list[str]:
    """Sentences of 6 to 60 words that are mostly letters (prose, not code or tables)."""
    found = []
    for sentence in _SENTENCE_END.split(re.sub(r"\s+", " ", text)):
        if 6 <= len(sentence.split()) <= 60 and sum(c.isalpha() for c in sentence) > 0.7 * len(sentence):
            found.append(sentence)
    return found


def _prose(path: Path) -> str:
    text = path.read_text(errors="ignore")
    if path.suffix == ".py":  # only what is written for people
        return "\n".join(_DOCSTRING.findall(text) + _COMMENT.findall(text))
    return text


def chunks(n: int, sources: tuple[Path, ...] = SOURCES) -> list[str]:
    """`n` distinct chunks: every sentence once, in a fixed order, then consecutive pairs."""
    seen: set[str] = set()
    ordered: list[str] = []
    for root in sources:
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".md", ".rst", ".txt")):
            try:
                found = sentences(_prose(path)) if path.is_file() else []
            except OSError:
                continue
            for sentence in found:
                if sentence not in seen:
                    seen.add(sentence)
                    ordered.append(sentence)
    picked = ordered[:n]
    for first in range(len(ordered) - 1):
        if len(picked) >= n:
            break
        picked.append(f"{ordered[first]} {ordered[first + 1]}")
    if len(picked) < n:
        raise SystemExit(f"only {len(picked):,} chunks of text found on this machine; ask for fewer")
    return picked


def queries(n: int, exclude: set[str]) -> list[str]:
    """`n` sentences of Signalgraph's docs, spread evenly, none of them a chunk."""
    found = [s for path in sorted(QUERY_SOURCE.rglob("*.md")) for s in sentences(path.read_text())]
    found = [s for s in dict.fromkeys(found) if s not in exclude]  # once each, in order
    if len(found) < n:
        raise SystemExit(f"only {len(found)} query sentences in {QUERY_SOURCE}; ask for fewer")
    return [found[i * len(found) // n] for i in range(n)]


def _encoder():
    from models.embedder import build_embedder
    from models.profiles import load_profile

    model = build_embedder(load_profile("local").embedder).model  # the shipped MiniLM
    model.max_seq_length = 64
    return model


def embed(texts: list[str], cache: Path, *, progress: bool = True) -> np.ndarray:
    """Unit vectors of `texts`, block by block, each block cached under `cache` by its texts' hash."""
    import torch
    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    model = None
    blocks = []
    bar = tqdm(total=len(texts), desc="embedding text", unit="chunk", disable=not progress)
    for first in range(0, len(texts), BLOCK):
        block = texts[first:first + BLOCK]
        digest = hashlib.sha256("\n".join(block).encode()).hexdigest()[:16]
        path = cache / f"block-{first // BLOCK:03d}-{digest}.npy"
        if not path.is_file():
            model = model or _encoder()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                vectors = model.encode(block, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
            np.save(path.with_suffix(".partial.npy"), vectors.astype(np.float32))
            path.with_suffix(".partial.npy").replace(path)
        blocks.append(np.load(path))
        bar.update(len(block))
    bar.close()
    return np.concatenate(blocks)


def text_corpus(n: int, n_queries: int, cache: Path, *, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(`n` chunk vectors, `n_queries` query vectors), as agent/bench/retrieval.py's `corpus` gives."""
    texts = chunks(n)
    asked = queries(n_queries, set(texts))
    return embed(texts, cache / "chunks", progress=progress), embed(asked, cache / "queries", progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.bench.text_corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--cache", default="results/bench/text-corpus")
    args = parser.parse_args(argv)
    vectors, probes = text_corpus(args.chunks, args.queries, Path(args.cache))
    print(f"{len(vectors):,} chunk vectors and {len(probes)} query vectors in {args.cache}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
