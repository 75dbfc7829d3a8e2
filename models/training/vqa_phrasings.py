"""Instruction variety for seeing (LLaVA-1.5's lesson): the same easy-vqa question asked in many
ways, with the answer in the form the instruction asks for.

A style is how a person asks: the bare question, an answer-format instruction after it ("Answer
in one word.", "Please answer briefly.", "Explain your answer.") or before it. Each style has
training wordings and held-out wordings that no training line uses, so an evaluation in a style
measures phrasings the model never saw. Colour and shape questions are also paraphrased.

Answer forms: `word` is the bare answer ("blue", "circle", "no"); `sentence` says what the image
shows ("It is blue.", "It is a circle.") and, for yes/no, spells out the comparison ("Blue is not
red, so no."). Both end in the answer, so the reply's last word is what is scored.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from models.training.data import DatasetError, asked_word, balanced_yes_no, compared_answer, easy_vqa_facts, yes_no_kind

# style -> (answer form, training wordings, held-out wordings); {q} is the question
STYLES: dict[str, tuple[str, list[str], list[str]]] = {
    "bare": ("sentence", ["{q}"], ["{q}"]),
    "one word": ("word", ["{q} Answer in one word.", "{q} Answer with one word.",
                          "{q} Answer the question using a single word or phrase.", "{q} One word, please.",
                          "{q} Use one word."],
                 ["{q} Reply with a single word."]),
    "short answer": ("sentence", ["{q} Please answer briefly.", "{q} Keep your answer short.", "{q} Be brief.",
                                  "{q} A short answer, please."],
                     ["{q} Give a short answer."]),
    "explain": ("sentence", ["{q} Explain your answer.", "{q} Say why.", "{q} Tell me what you see, then answer."],
                ["{q} How do you know?"]),
    "instruction first": ("word", ["Answer in one word. {q}", "Using a single word or phrase, answer: {q}",
                                   "One word only: {q}", "Answer with one word: {q}"],
                          ["In one word, tell me: {q}"]),
}
EVALUATED_STYLES = ("bare", "one word", "short answer", "instruction first")

PARAPHRASES = {  # (training, held-out) rewordings of easy-vqa's colour and shape questions
    "colour": (["What colour is the shape?", "Which colour is the shape?", "What is the colour of the figure?",
                "Tell me the colour of the shape.", "Which color do you see?", "What color is it?"],
               ["Can you tell me which colour the shape has?", "Name the color of the object."]),
    "shape": (["What shape is this?", "Which shape do you see?", "What kind of shape is in the picture?",
               "Name the shape.", "What is drawn here?", "Which shape is shown?"],
              ["Which geometric figure is in the image?", "Can you tell me what shape this is?"]),
}


def _kind(answer: str) -> str:
    from models.training.shape_judge import COLORS, SHAPES

    return "colour" if answer in COLORS else "shape" if answer in SHAPES else "yes/no"


def answer_in(form: str, question: str, answer: str, facts: dict[str, str]) -> str | None:
    """The answer as `form` asks; None when a sentence would need a fact the data does not tell."""
    kind = _kind(answer)
    if form == "word":
        return answer
    if kind == "colour":
        return f"It is {answer}."
    if kind == "shape":
        return f"It is a {answer}."
    seen = facts.get("color" if yes_no_kind(question)[0] else "shape")
    asked = asked_word(question)
    return compared_answer(seen, asked, answer) if seen and asked else None


def ask(style: str, question: str, *, held_out: bool, rng: random.Random) -> str:
    _, train, heldout = STYLES[style]
    q = question[:1].upper() + question[1:]
    return rng.choice(heldout if held_out else train).format(q=q)


def varied_vqa_manifest(out_dir: str | Path, count: int, *, seed: int = 0, max_turns: int = 3,
                        paraphrase: float = 0.5, word_answers: bool = False) -> Path:
    """`count` conversations about easy-vqa train images, 1 to `max_turns` questions each, every
    question in a random style with its training wordings, colour and shape questions reworded with
    probability `paraphrase`, yes/no answers balanced (as many "yes" as "no" of each kind).
    `word_answers`: the bare answer in every style but "explain" (the form one-word-trained weights
    already give, so continuing from them teaches wordings, not a new answer form)."""
    import easy_vqa

    rng = random.Random(seed)
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    facts = easy_vqa_facts(questions, answers, image_ids)
    turns = balanced_yes_no(list(zip(image_ids, questions, answers)), rng)
    by_image: dict[int, list] = {}
    for image_id, question, answer in turns:
        by_image.setdefault(image_id, []).append((question, answer))
    images = list(by_image)
    rng.shuffle(images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"easy-vqa-varied-{count}-t{max_turns}-s{seed}{'-words' if word_answers else ''}.jsonl"
    written = 0
    with open(manifest, "w", encoding="utf-8") as fp:
        for image_id in images:
            if written == count:
                break
            asked = by_image[image_id]
            rng.shuffle(asked)
            messages = []
            for question, answer in asked[: rng.randint(1, max_turns)]:
                kind = _kind(answer)
                if kind != "yes/no" and rng.random() < paraphrase:
                    question = rng.choice(PARAPHRASES[kind][0])
                style = rng.choice(list(STYLES))
                form = "word" if word_answers and style != "explain" else STYLES[style][0]
                reply = answer_in(form, question, answer, facts.get(image_id, {}))
                if reply is None:
                    continue
                text = ask(style, question, held_out=False, rng=rng)
                messages += [{"role": "user", "content": ("<image>\n" if not messages else "") + text},
                             {"role": "assistant", "content": reply}]
            if messages:
                fp.write(json.dumps({"messages": messages, "images": [str(Path(paths[image_id]).resolve())]}) + "\n")
                written += 1
    if written < count:
        raise DatasetError(f"easy-vqa's train split gave {written} conversations, fewer than the {count} asked for")
    return manifest


def styled_test_lines(sample: list[dict], style: str, seed: int = 0) -> list[dict]:
    """The fixed test questions (`{"image", "question", "answer"}`) asked in `style`'s held-out
    wording: what an evaluation in that style sends."""
    rng = random.Random(f"{style}-{seed}")
    return [{**item, "prompt": ask(style, item["question"], held_out=True, rng=rng)} for item in sample]
