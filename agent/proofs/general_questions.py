"""General prompts, to keep what the backbone knew while it learns new skills.

`training_prompts` are everyday requests whose answers, in the IT mix, are the untrained backbone's
own (self-distillation: VILA's lesson that re-mixing text-only data keeps text skills).
`HELD_OUT` are questions with known answers (capitals, arithmetic, authors, units) that no training
prompt asks: the trained model is scored on them beside the untrained backbone.
"""

from __future__ import annotations

import random

# (question, accepted answers: any of them in the reply, case-insensitive)
HELD_OUT: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of Ireland?", ("dublin",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("What is the capital of China?", ("beijing",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("What is the capital of Greece?", ("athens",)),
    ("What is the capital of Portugal?", ("lisbon",)),
    ("What is 2 + 2?", ("4", "four")),
    ("What is 3 + 5?", ("8", "eight")),
    ("What is 10 + 7?", ("17", "seventeen")),
    ("What is 9 - 4?", ("5", "five")),
    ("What is 6 times 7?", ("42", "forty-two", "forty two")),
    ("What is 5 times 5?", ("25", "twenty-five", "twenty five")),
    ("What is 100 divided by 4?", ("25", "twenty-five", "twenty five")),
    ("What is 12 + 12?", ("24", "twenty-four", "twenty four")),
    ("What is half of 50?", ("25", "twenty-five", "twenty five")),
    ("What is 3 times 3?", ("9", "nine")),
    ("Who wrote Hamlet?", ("shakespeare",)),
    ("Who wrote Pride and Prejudice?", ("austen",)),
    ("Who wrote War and Peace?", ("tolstoy",)),
    ("Who wrote The Odyssey?", ("homer",)),
    ("Who wrote 1984?", ("orwell",)),
    ("Who wrote Don Quixote?", ("cervantes",)),
    ("Who wrote Oliver Twist?", ("dickens",)),
    ("Who wrote The Origin of Species?", ("darwin",)),
    ("Who painted the Sistine Chapel ceiling?", ("michelangelo",)),
    ("Who developed the theory of relativity?", ("einstein",)),
    ("How many centimetres are in a metre?", ("100", "hundred")),
    ("How many grams are in a kilogram?", ("1000", "1,000", "thousand")),
    ("How many minutes are in an hour?", ("60", "sixty")),
    ("How many seconds are in a minute?", ("60", "sixty")),
    ("How many days are in a year?", ("365",)),
    ("How many months are in a year?", ("12", "twelve")),
    ("How many metres are in a kilometre?", ("1000", "1,000", "thousand")),
    ("How many millilitres are in a litre?", ("1000", "1,000", "thousand")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("How many sides does a hexagon have?", ("6", "six")),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("What gas do plants take in from the air?", ("carbon dioxide", "co2")),
    ("What is the largest planet in the solar system?", ("jupiter",)),
    ("What planet is known as the red planet?", ("mars",)),
    ("What is the closest star to the Earth?", ("sun",)),
    ("What is the largest mammal?", ("whale",)),
    ("What is the tallest mountain in the world?", ("everest",)),
    ("What is the longest river in Africa?", ("nile",)),
    ("In which continent is Kenya?", ("africa",)),
    ("What language is spoken in Mexico?", ("spanish",)),
    ("What is the main language of Australia?", ("english",)),
    ("What do caterpillars turn into?", ("butterfl", "moth")),
    ("What is frozen water called?", ("ice",)),
    ("How many legs does an insect have?", ("6", "six")),
]

_TEMPLATES = [
    "What is {concept}?", "Explain {concept} in simple words.", "Can you tell me about {concept}?",
    "Give me a short definition of {concept}.", "Why is {concept} important?",
    "Give me a tip for {activity}.", "How do I get better at {activity}?", "What do I need for {activity}?",
    "Write one sentence about {thing}.", "Describe {thing} in a few words.", "Tell me a fact about {thing}.",
    "What is the capital of {country}?", "Which language is spoken in {country}?",
    "What is {a} plus {b}?", "What is {a} minus {b}?", "Add {a} and {b}.",
    "Who wrote {book}?", "Summarise what {book} is about.",
    "Suggest a name for a {pet}.", "Write a short poem about {thing}.", "What rhymes with {word}?",
    "Give me a synonym for {word}.", "What is the opposite of {word}?", "Use the word '{word}' in a sentence.",
]
_FILLS = {
    "concept": ["gravity", "photosynthesis", "democracy", "a noun", "a verb", "an atom", "electricity", "inflation",
                "evolution", "a prime number", "the water cycle", "friction", "an ecosystem", "a fraction"],
    "activity": ["cooking rice", "running", "learning a language", "gardening", "writing an essay", "saving money",
                 "sleeping well", "public speaking", "swimming", "painting"],
    "thing": ["the moon", "autumn", "the ocean", "a library", "coffee", "rainy days", "mountains", "a city at night",
              "bicycles", "the desert"],
    "country": ["Norway", "Brazil", "India", "Argentina", "Sweden", "Turkey", "Kenya", "Peru", "Poland", "Chile"],
    "a": [str(n) for n in range(11, 40)],
    "b": [str(n) for n in range(2, 10)],
    "book": ["Moby Dick", "Frankenstein", "Dracula", "Jane Eyre", "Little Women", "The Hobbit", "Emma",
             "Treasure Island"],
    "pet": ["cat", "dog", "goldfish", "parrot", "rabbit", "hamster"],
    "word": ["happy", "fast", "light", "cold", "bright", "quiet", "strong", "early"],
}


def training_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct everyday requests; none of them is a held-out question."""
    rng = random.Random(seed)
    held = {q.lower() for q, _ in HELD_OUT}
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(count * 50):
        if len(out) == count:
            break
        prompt = rng.choice(_TEMPLATES).format(**{k: rng.choice(v) for k, v in _FILLS.items()})
        if prompt.lower() not in held and prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def correct(reply: str, answers: tuple[str, ...]) -> bool:
    text = reply.lower()
    return any(answer in text for answer in answers)
