"""Training data: JSONL manifests, their validation, and tokenization with loss on assistant turns.

The manifest format
-------------------

One JSON object per line (blank lines are skipped)::

    {"messages": [{"role": "user", "content": "<image>\\nWhat shape is this?"},
                  {"role": "assistant", "content": "circle"}],
     "images": ["shapes/0001.png"]}

    {"messages": [{"role": "user", "content": "Draw a red circle."},
                  {"role": "assistant", "content": "Here it is: [IMG0][IMG1][IMG2][IMG3]"}],
     "captions": {"image": ["a red circle"]}}

- `messages` (required): a list of `{"role": "system"|"user"|"assistant", "content": str}`, with at
  least one assistant message, and not starting with one. The loss is on assistant tokens only
  (each assistant turn's text and its end-of-turn token); system and user tokens are context.
- `images`, `audios`, `videos` (optional): media files, one per `<image>`, `<audio>`, `<video>`
  placeholder in the messages, in the order the placeholders appear. Relative paths are taken
  from the manifest's folder; absolute paths are allowed.
- `captions` (optional): `{"image": [...], "audio": [...]}`, one caption per signal span
  (`[IMG0]..[IMGn]`, `[AUD0]..[AUDn]`, all of the profile's signal tokens in order) in the
  assistant turns, in order of appearance. Each caption's conditioning from the generator's own
  text encoder is the target the output projector is aligned to (NExT-GPT's decoding-side
  alignment). Signal tokens belong in assistant turns only.

The same format serves both stages: X-text pairs for PT (a placeholder in the user turn, the
caption as the answer; or a caption request answered by a signal span with its `captions`), and
multi-turn conversations for IT.

Every problem is reported as `FILE:LINE: what is wrong` (a `DatasetError`), all problems of a file
at once (up to 20): bad JSON, a missing or unknown key, an unknown role, a placeholder count that
does not match the media list, a media file that does not exist, captions that do not match the
signal spans.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from models.backbone import PLACEHOLDERS, SIGNAL_PREFIXES
from models.errors import SignalgraphError

MEDIA_KEYS = {"images": "image", "audios": "audio", "videos": "video"}
ROLES = ("system", "user", "assistant")
KEYS = {"messages", "captions", *MEDIA_KEYS}
MAX_REPORTED = 20


class DatasetError(SignalgraphError):
    """A training or evaluation manifest that cannot be used; the message names file and line."""


@dataclass
class Record:
    """One validated manifest line. Media paths are absolute, per modality in placeholder order."""

    messages: list[dict[str, str]]
    media: dict[str, list[Path]]
    captions: dict[str, list[str]]
    source: Path
    line: int
    _tokens: dict = field(default_factory=dict, repr=False, compare=False)  # per tokenizer

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def modalities(self) -> set[str]:
        return {m for m, paths in self.media.items() if paths}

    def approximate_length(self) -> int:
        """Roughly its token count, without a tokenizer: ~4 characters a token, ~50 per media item."""
        text = sum(len(m["content"]) for m in self.messages) // 4
        return text + 50 * sum(len(paths) for paths in self.media.values())


def _signal_starts(text: str, modality: str) -> int:
    return text.count(f"[{SIGNAL_PREFIXES[modality]}0]")


def _has_signal(text: str) -> bool:
    return bool(re.search(r"\[(" + "|".join(SIGNAL_PREFIXES.values()) + r")\d+\]", text))


def _problems(obj: object, base: Path, check_files: bool) -> tuple[list[str], Record | None]:
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"], None
    problems = []
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        problems.append(f"unknown key(s) {unknown}; a line holds {sorted(KEYS)}")
    messages = obj.get("messages")
    if messages is None:
        return problems + ["missing key 'messages' (a list of {role, content})"], None
    if not isinstance(messages, list) or not messages:
        return problems + ["'messages' must be a non-empty list of {role, content}"], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            problems.append(f"message {i} must be an object with 'role' and 'content'")
            continue
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            problems.append(f"message {i} has unknown key(s) {extra}")
        if m["role"] not in ROLES:
            problems.append(f"message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            problems.append(f"message {i}'s content must be a string")
    if problems:
        return problems, None
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        problems.append("no assistant message: there is nothing to learn (the loss is on assistant turns)")
    elif roles[0] == "assistant":
        problems.append("the conversation starts with an assistant message; put a user message first")
    text = "".join(m["content"] for m in messages)

    media: dict[str, list[Path]] = {}
    for key, modality in MEDIA_KEYS.items():
        items = obj.get(key, [])
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            problems.append(f"'{key}' must be a list of file paths")
            continue
        placeholders = text.count(PLACEHOLDERS[modality])
        if placeholders != len(items):
            problems.append(f"{placeholders} {PLACEHOLDERS[modality]} placeholder(s) but {len(items)} "
                            f"file(s) in '{key}'; give one file per placeholder")
        paths = [(base / Path(x).expanduser()) for x in items]
        if check_files:
            for x, p in zip(items, paths):
                if not p.is_file():
                    problems.append(f"{modality} file {x!r} does not exist ({p})")
        media[modality] = paths

    captions = obj.get("captions", {})
    if not isinstance(captions, dict):
        problems.append("'captions' must be an object like {\"image\": [\"a caption\", ...]}")
        captions = {}
    for m in messages:
        if m["role"] != "assistant" and _has_signal(m["content"]):
            problems.append(f"a {m['role']} message holds signal tokens ([IMG0], [AUD0], ...); "
                            "they belong in assistant turns")
    assistant = "".join(m["content"] for m in messages if m["role"] == "assistant")
    for modality, items in captions.items():
        if modality not in SIGNAL_PREFIXES:
            problems.append(f"captions for {modality!r}: only {', '.join(SIGNAL_PREFIXES)} have signal tokens")
            continue
        if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
            problems.append(f"captions.{modality} must be a list of non-empty strings")
            continue
        spans = _signal_starts(assistant, modality)
        if spans != len(items):
            problems.append(f"{len(items)} {modality} caption(s) but {spans} {modality} signal span(s) "
                            f"([{SIGNAL_PREFIXES[modality]}0]...) in the assistant turns; give one caption per span")
    if problems:
        return problems, None
    return [], Record(messages=[dict(m) for m in messages], media=media,
                      captions={m: list(c) for m, c in captions.items()}, source=Path(), line=0)


def read_manifest(path: str | Path, *, check_files: bool = True) -> list[Record]:
    """Every line of a JSONL manifest, validated; a `DatasetError` lists each bad line as FILE:LINE."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"the manifest {str(path)!r} does not exist")
    base = path.resolve().parent
    records: list[Record] = []
    errors: list[str] = []
    with open(path, encoding="utf-8") as fp:
        for number, raw in enumerate(fp, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            problems, record = _problems(obj, base, check_files)
            if problems:
                errors += [f"{path}:{number}: {p}" for p in problems]
                continue
            record.source, record.line = path, number
            records.append(record)
    if errors:
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise DatasetError(f"{len(errors)} problem(s) in the manifest {path}:\n  "
                           + "\n  ".join(errors[:MAX_REPORTED]) + more)
    if not records:
        raise DatasetError(f"the manifest {path} holds no examples")
    return records


def read_manifests(paths: Iterable[str | Path], *, check_files: bool = True) -> list[Record]:
    records: list[Record] = []
    for path in paths:
        records += read_manifest(path, check_files=check_files)
    return records


# --- tokenization ---------------------------------------------------------------------------------


def tokenize(record: Record, backbone) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole conversation; labels are -100 except on assistant tokens.

    Each assistant turn's tokens are found by templating prefixes: the conversation up to the
    turn with the generation prompt, and up to and including it. Tokens after the turn's
    end-of-turn token (a template's trailing newline) carry no loss: generation stops there.
    """
    key = (backbone.tokenizer.name_or_path, len(backbone.tokenizer), backbone.spec.system_prompt)
    if key in record._tokens:
        return record._tokens[key]
    messages = record.messages
    full = backbone.chat_ids(messages, add_generation_prompt=False)
    labels = [-100] * len(full)
    eos = backbone.tokenizer.eos_token_id
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = backbone.chat_ids(messages[:k], add_generation_prompt=True)
        after = backbone.chat_ids(messages[: k + 1], add_generation_prompt=False)
        if full[: len(before)] != before or full[: len(after)] != after:
            raise DatasetError(
                f"{record.where}: the backbone's chat template does not render this conversation "
                "turn by turn (a prefix changes when later turns are added), so assistant tokens "
                "cannot be located; use a model whose template renders earlier turns unchanged"
            )
        span = list(range(len(before), len(after)))
        ends = [i for i in span if full[i] == eos]
        if ends:
            span = [i for i in span if i <= ends[-1]]
        for i in span:
            labels[i] = full[i]
    _check_signal_spans(record, backbone, full)
    record._tokens[key] = (full, labels)
    return full, labels


def _check_signal_spans(record: Record, backbone, ids: list[int]) -> None:
    """Captions need complete spans: `[IMG0][IMG1]` alone is no span for a 4-token profile."""
    for modality, captions in record.captions.items():
        signal = backbone.signal_ids.get(modality)
        if not signal:
            raise DatasetError(f"{record.where}: the profile has no {modality} signal tokens for its captions")
        n = len(signal)
        complete = sum(1 for i in range(len(ids) - n + 1) if ids[i: i + n] == signal)
        if complete != len(captions):
            expected = "".join(f"[{SIGNAL_PREFIXES[modality]}{i}]" for i in range(n))
            raise DatasetError(
                f"{record.where}: {len(captions)} {modality} caption(s) but {complete} complete signal "
                f"span(s); this profile's span is {expected}"
            )


# --- easy-vqa -------------------------------------------------------------------------------------


def easy_vqa_manifest(split: str, out_dir: str | Path, limit: int | None = None, *,
                      prompt: str = "{question} Answer with one word.", per_image: int = 1,
                      balance_yes_no: bool = False, reason_yes_no: bool = False, seed: int = 0) -> Path:
    """Write the `easy-vqa` package's questions for `split` ("train" or "test") as a manifest.

    Each line is one question about one image (shapes of one colour); the answer is one word of
    `easy_vqa.get_answers()`. With `per_image` > 1 each line is instead a conversation of up to
    that many of one image's questions, shuffled with `seed`, as LLaVA's instruction data asks
    several questions of one image: the image's tokens are paid for once per conversation rather
    than once per question, so a training step carries several times the answers.
    `balance_yes_no` keeps, of each kind of yes/no question (about a colour or a shape, asking or
    denying), as many "yes" as "no" answers: in easy-vqa "is there a red shape?" is "no" 7 times
    in 8, and a model trained on that answers from the question and never looks at the image.
    `reason_yes_no` asks yes/no questions with `REASONED_PROMPT`, and in the train split answers
    them by naming what the image shows, then comparing it with the question's word ("is there a
    red shape?" -> "Blue is not red, so no."): seeing becomes naming, and the yes/no a comparison
    in text; its train turns whose colour or shape the split never tells are dropped.
    The test split keeps the bare answer, the reply's last word being what is scored.
    Image paths are absolute paths inside the installed package. Returns the manifest's path,
    `out_dir/easy-vqa-{split}[-{limit}][-x{per_image}][-balanced][-reasoned].jsonl`.
    """
    try:
        import easy_vqa
    except ImportError:
        raise DatasetError("the easy-vqa package is not installed; install it with "
                           "`python -m pip install easy-vqa`") from None
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise DatasetError(f"easy-vqa has splits 'train' and 'test', not {split!r}")
    if per_image < 1:
        raise DatasetError(f"per_image must be at least 1, not {per_image}")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (f"easy-vqa-{split}{'' if limit is None else f'-{limit}'}{'' if per_image == 1 else f'-x{per_image}'}"
            f"{'-balanced' if balance_yes_no else ''}{'-reasoned' if reason_yes_no else ''}")
    manifest = out_dir / f"{name}.jsonl"
    count = len(questions) if limit is None else min(limit, len(questions))
    turns = [(image_id, (REASONED_PROMPT if reason_yes_no and answer in ("yes", "no") else prompt).format(
                 question=question[:1].upper() + question[1:]), answer)
             for question, answer, image_id in zip(questions[:count], answers[:count], image_ids[:count])]
    if balance_yes_no:
        turns = balanced_yes_no(turns, random.Random(seed))
    if reason_yes_no and split == "train":
        turns = _reasoned_yes_no(turns, easy_vqa_facts(questions, answers, image_ids))
    if per_image == 1:
        conversations = [[turn] for turn in turns]
    else:
        by_image: dict[int, list] = {}
        for turn in turns:
            by_image.setdefault(turn[0], []).append(turn)
        rng = random.Random(seed)
        conversations = []
        for image_turns in by_image.values():
            rng.shuffle(image_turns)
            conversations += [image_turns[i: i + per_image] for i in range(0, len(image_turns), per_image)]
        rng.shuffle(conversations)
    with open(manifest, "w", encoding="utf-8") as fp:
        for conversation in conversations:
            messages = []
            for k, (_, text, answer) in enumerate(conversation):
                messages += [{"role": "user", "content": ("<image>\n" if k == 0 else "") + text},
                             {"role": "assistant", "content": answer}]
            line = {"messages": messages, "images": [str(Path(paths[conversation[0][0]]).resolve())]}
            fp.write(json.dumps(line) + "\n")
    return manifest


def yes_no_kind(question: str) -> tuple[bool, bool]:
    """(names a colour, denies) of an easy-vqa yes/no question: "is there not a red shape?" is
    (True, True). Asking questions are mostly "no" in easy-vqa, denying ones mostly "yes"."""
    from models.training.shape_judge import COLORS

    words = set(question.lower().split("?")[0].split())  # the question itself, not the instruction after it
    return bool(words & set(COLORS)), bool(words & {"no", "not"})


def balanced_yes_no(turns: list[tuple[int, str, str]], rng: random.Random) -> list[tuple[int, str, str]]:
    """Yes/no questions subsampled so each kind has as many of each answer; the rest kept."""
    kinds: dict[tuple[bool, bool], dict[str, list[int]]] = {}
    for i, (_, text, answer) in enumerate(turns):
        if answer in ("yes", "no"):
            kinds.setdefault(yes_no_kind(text), {"yes": [], "no": []})[answer].append(i)
    dropped: set[int] = set()
    for by_answer in kinds.values():
        fewer = min(len(by_answer["yes"]), len(by_answer["no"]))
        for indices in by_answer.values():
            dropped.update(set(indices) - set(rng.sample(indices, fewer)))
    return [turn for i, turn in enumerate(turns) if i not in dropped]


def easy_vqa_shapes(split: str) -> list[tuple[str, str, str]]:
    """(image path, colour, shape) for each easy-vqa image of `split` whose questions and answers
    name both; an image shows one shape of one colour, so its caption is "a <colour> <shape>"."""
    import easy_vqa


    if split not in ("train", "test"):
        raise DatasetError(f"easy-vqa has splits 'train' and 'test', not {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    known = easy_vqa_facts(questions, answers, image_ids)
    return [(str(Path(paths[i]).resolve()), f["color"], f["shape"])
            for i, f in sorted(known.items()) if {"color", "shape"} <= f.keys()]


def easy_vqa_facts(questions: list[str], answers: list[str], image_ids: list[int]) -> dict[int, dict[str, str]]:
    """{image: {"color": ..., "shape": ...}} as far as the image's questions and answers tell."""
    from models.training.shape_judge import COLORS, SHAPES

    known: dict[int, dict[str, str]] = {}
    for question, answer, image in zip(questions, answers, image_ids):
        words = set(question.rstrip("?").split())
        facts = known.setdefault(image, {})
        named = {"color": words & set(COLORS), "shape": words & set(SHAPES)}
        if answer in COLORS or answer in SHAPES:  # "what color is the circle?" red; "what is the blue shape?"
            named["color" if answer in COLORS else "shape"] = {answer}
        elif (answer == "yes") == yes_no_kind(question)[1]:  # a denial: "is there not a red shape?" yes
            continue
        facts.update({kind: next(iter(found)) for kind, found in named.items() if len(found) == 1})
    return known


REASONED_PROMPT = "{question} Say what you see, then answer yes or no."


def compared_answer(seen: str, asked: str, answer: str) -> str:
    """A yes/no answer that spells out the comparison behind it: "Blue is not red, so no."
    (to "is there a red shape?" of a blue one; "so yes." to "is there not a red shape?")."""
    return f"{seen.capitalize()} {'is' if seen == asked else 'is not'} {asked}, so {answer}."


def asked_word(question: str) -> str | None:
    """The one colour or shape an easy-vqa yes/no question asks about, if it names exactly one."""
    from models.training.shape_judge import COLORS, SHAPES

    about_colour, _ = yes_no_kind(question)
    asked = [w for w in question.lower().split("?")[0].split() if w in (COLORS if about_colour else SHAPES)]
    return asked[0] if len(asked) == 1 else None


def _reasoned_yes_no(turns: list[tuple[int, str, str]], facts: dict[int, dict[str, str]]) -> list[tuple[int, str, str]]:
    """Yes/no turns answered "Blue is not red, so no.", dropping those whose colour or shape is
    unknown: the first word names what the image shows, the rest compares it with the question's."""
    out = []
    for image_id, text, answer in turns:
        if answer not in ("yes", "no"):
            out.append((image_id, text, answer))
            continue
        fact = facts.get(image_id, {}).get("color" if yes_no_kind(text)[0] else "shape")
        asked = asked_word(text)
        if fact is not None and asked is not None:
            out.append((image_id, text, compared_answer(fact, asked, answer)))
    return out
