"""Synthesised requests for the project's own tools: what the tool-choice benchmark and proof use.

Each request comes with the calls it needs ({"name", "arguments"}), or none (a plain question).
Phrasings are split: `split="train"` and `split="heldout"` never share a template, so a held-out
score measures phrasings the model was not trained on.
"""

from __future__ import annotations

import random

# per tool: 14 training phrasings, then the 2 held-out ones
TEMPLATES: dict[str, list[str]] = {
    "transcribe": ["Transcribe {audio}.", "What is said in {audio}?", "Write down the words in recording {audio}.",
                   "Give me a transcript of {audio}.", "Turn the speech in {audio} into text.",
                   "What does the speaker say in {audio}?", "What are they saying in {audio}?",
                   "Could you transcribe the recording {audio} for me?", "Convert {audio} to text.",
                   "Type out what is spoken in {audio}.", "I need a written version of {audio}.",
                   "Listen to {audio} and tell me the words.", "What did the person in {audio} say?",
                   "Put the words of {audio} on the page.",
                   "Can you tell me what the speaker says in {audio}?", "I need the text of {audio}, please."],
    "speak": ["Say '{sentence}' out loud.", "Read this aloud: {sentence}", "Turn '{sentence}' into speech.",
              "Please speak the sentence: {sentence}", "Pronounce this for me: {sentence}",
              "Make an audio clip of you saying: {sentence}", "Say this in your voice: {sentence}",
              "Speak these words: {sentence}", "Can you read out '{sentence}'?", "Record yourself saying: {sentence}",
              "Use text to speech on: {sentence}", "Let me hear '{sentence}' spoken.",
              "Announce out loud: {sentence}", "Give me a spoken version of: {sentence}",
              "I want to hear you say: {sentence}", "Voice this line: {sentence}"],
    "describe_image": ["What is in {image}?", "Describe {image}.", "What does {image} show?",
                       "Name the objects in {image}.", "Label {image} for me.", "What can you see in {image}?",
                       "Look at {image} and tell me what it is.", "What's pictured in {image}?",
                       "Give me a caption for {image}.", "Explain what is shown in photo {image}.",
                       "Classify the picture {image}.", "Which things appear in {image}?",
                       "Can you recognise what {image} contains?", "Have a look at {image}: what is it?",
                       "Tell me what you see in picture {image}.", "Identify what {image} depicts."],
    "generate_image": ["Draw {thing}.", "Make a picture of {thing}.", "Generate an image of {thing}.",
                       "Paint {thing} for me.", "Sketch {thing}.", "Render {thing} as an image.",
                       "Can you draw {thing}?", "Show me a picture of {thing}.", "Design an image with {thing}.",
                       "Please produce artwork of {thing}.", "I want an image of {thing}.",
                       "Illustrate {thing}.", "Make me a painting of {thing}.", "Picture {thing} for me, as an image.",
                       "Create an illustration showing {thing}.", "I'd like a drawing of {thing}."],
    "generate_audio": ["Make the sound of {noise}.", "Generate audio of {noise}.", "Create a sound effect: {noise}.",
                       "Synthesize {noise} as audio.", "Give me a clip that sounds like {noise}.",
                       "Make some audio of {noise}.", "I need a sound effect of {noise}.",
                       "Can you make a sound like {noise}?", "Play me {noise}, as generated audio.",
                       "Create an ambient track of {noise}.", "Generate the noise of {noise}.",
                       "Make a soundscape of {noise}.", "I want to hear {noise}, please generate it.",
                       "Build an audio clip with {noise}.",
                       "Produce a recording of {noise}.", "Compose a short clip of {noise}."],
    "search_knowledge": ["Search my notes for {topic}.", "What do my notes say about {topic}?",
                         "Look up {topic} in the knowledge base.", "Find passages about {topic}.",
                         "Search the documents for {topic}.", "Is there anything in my notes on {topic}?",
                         "What did we document about {topic}?", "Find my notes on {topic}.",
                         "Query the knowledge base: {topic}.", "Pull up the documents about {topic}.",
                         "Do we have notes about {topic}?", "Retrieve what the docs say on {topic}.",
                         "Remind me what our notes say regarding {topic}.", "Search for {topic} in my files.",
                         "Check the documents for information on {topic}.", "Dig up what we wrote about {topic}."],
}
PAIRS = ["{a} Also, {b}", "{a} And then: {b}", "First: {a} Second: {b}", "Two things. {a} {b}"]
HELD_OUT = 2

FILLS = {
    "audio": [f"audio-{i}" for i in range(1, 10)],
    "image": [f"image-{i}" for i in range(1, 10)],
    "sentence": ["good morning everyone", "the meeting starts at ten", "thank you for coming",
                 "the train leaves at noon", "please close the door", "welcome to the lab",
                 "the results look promising", "lunch is ready"],
    "thing": ["a red circle", "a cat on a sofa", "a mountain at sunset", "a blue triangle", "a lighthouse in fog",
              "a bowl of fruit", "a robot reading a book", "a green square"],
    "noise": ["rain on a roof", "a dog barking", "ocean waves", "a busy street", "birds at dawn",
              "a crackling fire", "a ticking clock", "wind in trees"],
    "topic": ["the team offsite", "the release process", "the microscope calibration", "the cold room",
              "travel booking", "versioning", "the new hire checklist", "the budget review"],
}
ARGUMENT = {"transcribe": ("audio", "audio"), "speak": ("text", "sentence"), "describe_image": ("image", "image"),
            "generate_image": ("prompt", "thing"), "generate_audio": ("prompt", "noise"),
            "search_knowledge": ("query", "topic")}

NO_TOOL = [  # (question, a short answer): requests that need no tool
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "A week has seven days."),
    ("What colour is the sky on a clear day?", "It is blue."),
    ("Say hello.", "Hello!"),
    ("What is two plus three?", "Two plus three is five."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote it."),
    ("What do bees make?", "Bees make honey."),
    ("Thank you so much.", "You are welcome."),
    ("Good morning!", "Good morning! How can I help?"),
    ("Hi there, how are you?", "I am well, thank you. How can I help?"),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Which planet is closest to the sun?", "Mercury is closest to the sun."),
    ("Great, that is all for now.", "Glad to help. Goodbye!"),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("Can you explain what a noun is?", "A noun is a word that names a person, place or thing."),
    ("What is ten minus four?", "Ten minus four is six."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted it."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("Okay, thanks.", "You are welcome."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("Thanks for your help!", "You are welcome."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]
NO_TOOL_HELD_OUT = 3


def own_drawing(text: str) -> bool:
    """Colour-shape drawings ("a red circle") belong to the model's own generator, not to the
    generate_image tool: tool data and tool scores leave them out."""
    from models.training.shape_judge import COLORS, SHAPES

    return any(f"{c} {s}" in text for c in COLORS for s in SHAPES)


def _one(rng: random.Random, name: str, split: str) -> tuple[str, dict]:
    templates = TEMPLATES[name][:-HELD_OUT] if split == "train" else TEMPLATES[name][-HELD_OUT:]
    fills = {key: rng.choice(values) for key, values in FILLS.items()}
    argument, fill = ARGUMENT[name]
    return rng.choice(templates).format(**fills), {"name": name, "arguments": {argument: fills[fill]}}


def requests(count: int, *, split: str = "train", seed: int = 0, single_only: bool = False,
             mix: tuple[int, int, int] = (60, 25, 15)) -> list[dict]:
    """[{"request", "calls": [...], "answer": str | None}]: by default 60% one call, 25% two, 15% no
    tool (`mix` gives other weights, in that order)."""
    rng = random.Random(f"{split}-{seed}")
    names = sorted(TEMPLATES)
    questions = NO_TOOL[:-NO_TOOL_HELD_OUT] if split == "train" else NO_TOOL[-NO_TOOL_HELD_OUT:]
    out = []
    for i in range(count):
        kind = "one" if single_only else rng.choices(["one", "two", "none"], weights=mix)[0]
        if kind == "none":
            question, answer = rng.choice(questions)
            out.append({"request": question, "calls": [], "answer": answer})
        elif kind == "one":
            text, call = _one(rng, names[i % len(names)], split)
            out.append({"request": text, "calls": [call], "answer": None})
        else:
            first, second = rng.sample(names, 2)
            (a, call_a), (b, call_b) = _one(rng, first, split), _one(rng, second, split)
            out.append({"request": rng.choice(PAIRS).format(a=a, b=b), "calls": [call_a, call_b], "answer": None})
    return out


# What the tools give back, for training the turn after a result: the controller shows the backbone
# each result and asks for a short reply, and a model that never saw that turn calls tools again.
LABELS = ["tabby cat", "lighthouse", "sports car", "golden retriever", "pizza", "laptop", "mountain bike", "teapot"]
PASSAGES = {
    "the team offsite": "The offsite is on the 14th at the lake house.",
    "the release process": "Releases are cut on Tuesdays after the tests pass.",
    "the microscope calibration": "Calibrate the microscope every Monday with the grid slide.",
    "the cold room": "The cold room stays at four degrees; log every opening.",
    "travel booking": "Book travel through the portal two weeks ahead.",
    "versioning": "Versions follow major.minor.patch.",
    "the new hire checklist": "New hires get a laptop, a badge and a buddy.",
    "the budget review": "The budget review is due at the end of the quarter.",
}


def tool_result(call: dict, rng: random.Random) -> tuple[dict, str]:
    """A plausible result of `call` (the tool's own artifact) and the tool's own sentence about it."""
    from tools.summaries import summary

    name, args = call["name"], call["arguments"]
    new_audio, new_image = f"audio-{rng.randint(10, 40)}", f"image-{rng.randint(10, 40)}"
    if name == "transcribe":
        result = {"audio": args["audio"], "text": rng.choice(FILLS["sentence"]), "language": "en",
                  "seconds": round(rng.uniform(1, 9), 2)}
    elif name == "speak":
        result = {"audio": new_audio, "text": args["text"], "seconds": round(rng.uniform(1, 4), 2)}
    elif name == "describe_image":
        first, second = rng.sample(LABELS, 2)
        top = round(rng.uniform(0.3, 0.9), 4)
        result = {"image": args["image"], "labels": [{"label": first, "score": top},
                                                     {"label": second, "score": round((1 - top) / 2, 4)}]}
    elif name == "generate_image":
        result = {"image": new_image, "prompt": args["prompt"]}
    elif name == "generate_audio":
        result = {"audio": new_audio, "prompt": args["prompt"], "seconds": round(rng.uniform(3, 10), 2)}
    elif name == "search_knowledge":
        result = {"query": args["query"], "passages": [{"text": PASSAGES[args["query"]], "source": "notes.md",
                                                        "position": 0, "score": round(rng.uniform(0.5, 0.9), 4)}]}
    else:
        raise ValueError(f"no result is synthesised for the tool {name!r}")
    return result, summary(name, result)
