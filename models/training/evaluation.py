"""Evaluation: the held-out loss, and VQA-style exact-match accuracy (greedy answers, normalised);
with `blind=True` the media are dropped, the baseline a model that really looks must beat."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.training.data import Record, read_manifest
from models.training.features import ExampleDataset, load_media


@torch.no_grad()
def eval_loss(mm, dataset: ExampleDataset, batch_size: int = 8, alignment_weight: float = 1.0) -> dict[str, float]:
    """Mean losses over a dataset, no gradients, dropout off."""
    was_training = mm.training
    mm.eval()
    sums = {"eval_loss": 0.0, "eval_text": 0.0, "eval_alignment": 0.0}
    batches, aligned = 0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))
            out = mm(batch, alignment_weight=alignment_weight)
            sums["eval_loss"] += out.loss.item()
            sums["eval_text"] += out.text.item()
            if out.alignment is not None:
                sums["eval_alignment"] += out.alignment.item()
                aligned += 1
            batches += 1
    finally:
        mm.train(was_training)
    result = {"eval_loss": sums["eval_loss"] / max(batches, 1), "eval_text": sums["eval_text"] / max(batches, 1)}
    result["eval_alignment"] = sums["eval_alignment"] / aligned if aligned else None
    return result


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces (the usual VQA/SQuAD normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def answers_match(answer: str, expected: str, *, last_word: bool = False) -> bool:
    """Normalised exact match, of the whole answers or (`last_word`) of their last words."""
    said, wanted = normalise_answer(answer), normalise_answer(expected)
    return said.split()[-1:] == wanted.split()[-1:] if last_word else said == wanted


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    blind: bool
    predictions: list[dict] = field(default_factory=list)  # question, expected, answer, correct


def evaluate(mm, manifest: str | Path | list[Record], *, blind: bool = False, limit: int | None = None,
             max_new_tokens: int = 16, batch_size: int = 16, last_word: bool = False,
             progress: bool = True) -> EvalResult:
    """Exact-match accuracy of greedy answers to each line's last assistant turn (with `last_word`,
    of the answer's last word: for replies that say what they see before answering).

    The prompt is the conversation before that turn, with its media. `blind=True` drops the media
    and their placeholders: the text-only baseline (how far the questions alone get). Questions
    are answered `batch_size` at a time.
    """
    from tqdm.auto import tqdm

    from models.backbone import PLACEHOLDERS

    records = manifest if isinstance(manifest, list) else read_manifest(manifest)
    records = records[:limit] if limit is not None else records
    was_training = mm.training
    mm.eval()
    correct, predictions = 0, []

    def request(record: Record) -> tuple[list[dict], dict]:
        last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
        prompt = [dict(m) for m in record.messages[:last]]
        media: dict[str, list] = {}
        if blind:
            for m in prompt:
                for placeholder in PLACEHOLDERS.values():
                    m["content"] = m["content"].replace(placeholder + "\n", "").replace(placeholder, "")
        else:
            for modality, paths in record.media.items():
                if paths:
                    media[modality] = [load_media(modality, p, mm.profile, record.where) for p in paths]
        return prompt, media

    try:
        bar = tqdm(total=len(records), desc="evaluating" + (" (blind)" if blind else ""), disable=not progress)
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            asked = [request(r) for r in chunk]
            outs = mm.generate_many(asked, max_new_tokens=max_new_tokens)
            for record, (prompt, _), out in zip(chunk, asked, outs, strict=True):
                answer = out.text.split(mm.backbone.tokenizer.eos_token or "\0")[0]
                expected = record.messages[len(prompt)]["content"]
                ok = answers_match(answer, expected, last_word=last_word)
                correct += ok
                question = prompt[-1]["content"] if prompt else ""
                predictions.append({"where": record.where, "question": question, "expected": expected,
                                    "answer": answer, "correct": ok})
            bar.update(len(chunk))
        bar.close()
    finally:
        mm.train(was_training)
    total = len(records)
    return EvalResult(correct / total if total else 0.0, correct, total, blind, predictions)
