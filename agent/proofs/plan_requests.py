"""Synthesised multi-step requests and the plans that answer them: for `signalgraph plan`.

Each kind of request is a chain or a fan-out of the project's tools, with its own phrasings; the
last phrasing of each kind is held out, so a held-out score measures wordings never trained on.
A plan is what the planner's `plan` call carries: tasks with ids, tools, arguments and deps, an
argument reading an earlier task's output through `<task-N.field>`.
"""

from __future__ import annotations

import random

from agent.proofs.tool_requests import FILLS

# kind -> (phrasings, tasks); the last phrasing of each kind is held out
KINDS: dict[str, tuple[list[str], list[dict]]] = {
    "draw then describe": (
        ["Draw {thing} and then tell me what the drawing shows.", "Make a picture of {thing}, then describe it.",
         "Generate an image of {thing} and label what is in it.", "Sketch {thing}; afterwards say what you see in it.",
         "Create {thing} as an image and check what it depicts."],
        [{"id": 1, "tool": "generate_image", "args": {"prompt": "{thing}"}, "deps": []},
         {"id": 2, "tool": "describe_image", "args": {"image": "<task-1.image>"}, "deps": [1]}]),
    "transcribe then speak": (
        ["Transcribe {audio} and read the transcript aloud.", "Write down what {audio} says, then say it out loud.",
         "Turn {audio} into text and speak that text.", "Get the words of {audio} and read them back to me.",
         "Listen to {audio}, then repeat its words in your voice."],
        [{"id": 1, "tool": "transcribe", "args": {"audio": "{audio}"}, "deps": []},
         {"id": 2, "tool": "speak", "args": {"text": "<task-1.text>"}, "deps": [1]}]),
    "transcribe then search": (
        ["Transcribe {audio} and search my notes for what it says.",
         "Find out what is said in {audio}, then look it up in the knowledge base.",
         "Write down {audio} and check my documents for it.", "Get the text of {audio} and search the notes with it.",
         "What does {audio} say? Look that up in my files."],
        [{"id": 1, "tool": "transcribe", "args": {"audio": "{audio}"}, "deps": []},
         {"id": 2, "tool": "search_knowledge", "args": {"query": "<task-1.text>"}, "deps": [1]}]),
    "describe and transcribe": (
        ["Describe {image} and transcribe {audio}.", "Tell me what is in {image}, and write down {audio}.",
         "Label {image}; also give me the transcript of {audio}.",
         "Two jobs: name what {image} shows and transcribe {audio}.",
         "I need a caption for {image} and the words of {audio}."],
        [{"id": 1, "tool": "describe_image", "args": {"image": "{image}"}, "deps": []},
         {"id": 2, "tool": "transcribe", "args": {"audio": "{audio}"}, "deps": []}]),
    "draw and sound": (
        ["Draw {thing} and make the sound of {noise}.", "Make a picture of {thing} and a sound of {noise}.",
         "Generate an image of {thing} plus audio of {noise}.", "I want {thing} as a picture and {noise} as a sound.",
         "Create art of {thing} and a sound effect of {noise}."],
        [{"id": 1, "tool": "generate_image", "args": {"prompt": "{thing}"}, "deps": []},
         {"id": 2, "tool": "generate_audio", "args": {"prompt": "{noise}"}, "deps": []}]),
    "transcribe, speak, draw": (
        ["Transcribe {audio}, read the transcript aloud, and draw {thing}.",
         "Write down what {audio} says and say it out loud; also make a picture of {thing}.",
         "Three things: the text of {audio}, that text spoken, and an image of {thing}.",
         "Turn {audio} into text, speak it, and sketch {thing}.",
         "Get the words of {audio}, repeat them in your voice, then paint {thing}."],
        [{"id": 1, "tool": "transcribe", "args": {"audio": "{audio}"}, "deps": []},
         {"id": 2, "tool": "speak", "args": {"text": "<task-1.text>"}, "deps": [1]},
         {"id": 3, "tool": "generate_image", "args": {"prompt": "{thing}"}, "deps": []}]),
}
HELD_OUT = 1


def _fill(value, fills: dict):
    if isinstance(value, str):
        return value.format(**fills)
    if isinstance(value, dict):
        return {k: _fill(v, fills) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, fills) for v in value]
    return value


def plan_requests(count: int, *, split: str = "train", seed: int = 0) -> list[dict]:
    """[{"request", "tasks"}], the kinds in turn, phrasings and fillers drawn with `seed`."""
    rng = random.Random(f"plan-{split}-{seed}")
    kinds = sorted(KINDS)
    out = []
    for i in range(count):
        phrasings, tasks = KINDS[kinds[i % len(kinds)]]
        pool = phrasings[:-HELD_OUT] if split == "train" else phrasings[-HELD_OUT:]
        fills = {key: rng.choice(values) for key, values in FILLS.items()}
        out.append({"request": rng.choice(pool).format(**fills), "tasks": _fill(tasks, fills)})
    return out


def right_tools(plan: list[dict], expected: list[dict]) -> bool:
    """A plan picks the right tools when it runs the expected tools, each as often, in any order."""
    return sorted(t["tool"] for t in plan) == sorted(t["tool"] for t in expected)
