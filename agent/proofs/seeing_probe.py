"""Can a LoRA adapter teach SmolLM2-135M easy-vqa's yes/no comparison, with the fact given in text?

The seeing proof's yes/no questions ("is there a red shape?") need the answer compared with what
the image shows. This probe takes the image away and writes the fact into the question ("The
shape is blue. Is there a red shape? Answer yes or no."), on easy-vqa's own questions with as
many "yes" as "no" answers, so that only the comparison scores above chance. It trains one LoRA
shape for a few steps and scores held-out test questions: which adapter learns the comparison at
all, in minutes rather than a whole proof's hour.

    python -m agent.proofs.seeing_probe --out DIR [--lora attention|all] [--lr 2e-4] [--steps 120] [--explain]

`--lora attention`: rank 8 on q/k/v/o (the adapter's default shape); `all`: the seeing proof's
(rank 16 on every linear layer). `--explain` trains answers that spell the comparison out
("Blue is not red, so no."); the reply's last word is scored either way.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def probe_lines(split: str, count: int, *, explain: bool, seed: int = 0) -> list[dict]:
    """Up to `count` manifest lines of `split`'s yes/no questions, the fact stated in the question."""
    import easy_vqa

    from models.training.data import asked_word, balanced_yes_no, compared_answer, easy_vqa_facts, yes_no_kind

    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    facts = easy_vqa_facts(questions, answers, image_ids)
    turns = balanced_yes_no([(i, q, a) for q, a, i in zip(questions, answers, image_ids) if a in ("yes", "no")],
                            random.Random(seed))
    random.Random(seed).shuffle(turns)
    lines = []
    for image_id, question, answer in turns:
        about_colour, _ = yes_no_kind(question)
        fact = facts.get(image_id, {}).get("color" if about_colour else "shape")
        asked = asked_word(question)
        if fact is None or asked is None:
            continue
        said = compared_answer(fact, asked, answer) if explain and split == "train" else f"{answer.capitalize()}."
        user = f"The shape is {fact if about_colour else 'a ' + fact}. {question[:1].upper() + question[1:]} " \
               "Answer yes or no."
        lines.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": said}]})
        if len(lines) == count:
            break
    return lines


def probe(out: str, *, lora: dict, lr: float, steps: int, explain: bool, batch_size: int = 16,
          test_questions: int = 400) -> dict:
    from agent.proofs.seeing import seeing_profile
    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from models.training.evaluation import evaluate
    from models.training.stages import TrainConfig
    from models.training.trainer import train

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifests = {}
    for split, count in (("train", steps * batch_size), ("test", test_questions)):
        manifests[split] = out_dir / f"probe-{split}.jsonl"
        manifests[split].write_text("".join(json.dumps(line) + "\n"
                                            for line in probe_lines(split, count, explain=explain)))
    untrained = MMLLM.from_profile(load_profile("local-untrained"))
    before = evaluate(untrained, manifests["test"], max_new_tokens=12, last_word=True)
    del untrained
    config = TrainConfig.from_dict({
        "profile": seeing_profile(out_dir, lora), "out_dir": str(out_dir / "run"),
        "stages": [{"name": "it", "data": [str(manifests["train"])], "steps": steps, "batch_size": batch_size,
                    "lr": lr, "log_every": 10, "checkpoint_every": steps,
                    "train": {"input_projectors": False, "output_projectors": False, "backbone": "lora",
                              "new_token_embeddings": False}}]})
    result = train(config, overwrite=True)
    after = evaluate(MMLLM.from_profile(load_profile(str(result.profile))), manifests["test"],
                     max_new_tokens=12, last_word=True)
    report = {"lora": lora, "lr": lr, "steps": steps, "batch_size": batch_size, "explain": explain,
              "test_questions": after.total, "before": round(before.accuracy, 4), "after": round(after.accuracy, 4),
              "minutes": round((time.perf_counter() - started) / 60, 1),
              "examples": [p["answer"] for p in after.predictions[:6]]}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    from agent.proofs.seeing import SEEING_LORA
    from models.specs import LoraSpec

    parser = argparse.ArgumentParser(prog="python -m agent.proofs.seeing_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lora", choices=["attention", "all"], default="all")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--explain", action="store_true")
    args = parser.parse_args(argv)
    report = probe(args.out, lora=SEEING_LORA if args.lora == "all" else LoraSpec().model_dump(), lr=args.lr,
                   steps=args.steps, explain=args.explain)
    print(f"\nyes/no comparison, text only, {report['test_questions']} balanced test questions: "
          f"{report['before']:.1%} untrained -> {report['after']:.1%} after {args.steps} steps "
          f"({report['minutes']} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
