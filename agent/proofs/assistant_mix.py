"""The assistant's instruction-tuning mix: every skill in the phrasings and the prompt format people
meet it in.

- seeing: easy-vqa questions in many styles and wordings (models/training/vqa_phrasings.py);
- tools: sessions of requests, each call followed by the tool's own sentence and the reply that
  states it (the turn after a result, HuggingGPT's response stage), and single requests;
- drawing: requests answered with the model's own signal tokens;
- plans: multi-step requests answered with a plan call (agent/proofs/plan_requests.py);
- callers' tools: function calling with tools an app brings through the API
  (agent/proofs/caller_tool_requests.py);
- kept knowledge: everyday prompts answered by the untrained backbone itself (self-distillation).

Most lines are rendered by the controller's own `render_prompt` (system prompt with the `local`
profile's runnable tools, this turn's attachments, retrieved notes after the
user's words), so what is trained is exactly what a person meets through the CLI and the API.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from agent.proofs.plan_requests import plan_requests
from graphs.thinker import render_prompt, system_prompt

# held-out wordings of "what can you do?", for the evaluation of the controller's own answer
CAPABILITY_HELD_OUT = ["Hey, what sort of tasks can you handle?", "What are you good at?",
                       "Could you tell me your abilities?", "What help can you give me?"]


MEDIA_ID = re.compile(r"\b(image|audio|video)-\d+\b")


def served(messages: list, *, schemas: list[dict], media: list[dict] = (), passages: list[dict] = ()) -> dict:
    """LangChain messages as the controller's think step shows them to the backbone (the same
    `render_prompt`), as one manifest line."""
    return {"messages": render_prompt(messages, tools=schemas, passages=list(passages), media=list(media))}


def _attached(text: str, rng: random.Random, p: float = 0.6) -> tuple[str, list[dict]]:
    """With probability `p`, the media a request names were attached this turn: the controller then
    lists them in the system prompt and notes them after the user's words."""
    ids = list(dict.fromkeys(m.group(0) for m in MEDIA_ID.finditer(text)))
    if not ids or rng.random() >= p:
        return text, []
    return f"{text}\n[attached: {', '.join(ids)}]", [{"id": i, "kind": i.split("-")[0]} for i in ids]


def note_passages(texts: list[str], rng: random.Random, p: float = 0.4) -> list[dict]:
    """With probability `p`, three retrieved notes, as a knowledge base with notes in it adds to every
    turn (they may have nothing to do with the request)."""
    if not texts or rng.random() >= p:
        return []
    return [{"source": rng.choice(["notes.md", "handbook.pdf", "meeting.txt"]), "position": rng.randint(0, 9),
             "text": " ".join(t.split()[:40])} for t in rng.sample(texts, min(3, len(texts)))]


def seeing_lines(data: Path, count: int, *, schemas: list[dict], notes: list[str],
                 served_share: float, rng: random.Random, seed: int) -> list[dict]:
    """Easy-vqa questions in every style's training wordings; `served_share` of them one question
    with its image attached, as a person asks through the CLI or the API, the rest conversations of
    up to three questions in the plain chat format."""
    from langchain_core.messages import HumanMessage

    from models.training.vqa_phrasings import varied_vqa_manifest

    single = round(count * served_share)
    one = varied_vqa_manifest(data, single, seed=seed, max_turns=1, word_answers=True).read_text().splitlines()
    lines = []
    for raw in one:
        line = json.loads(raw)
        question, answer = (m["content"] for m in line["messages"])
        media = [{"id": "image-1", "kind": "image"}]
        lines.append({**served([HumanMessage(question + "\n[attached: image-1]")], schemas=schemas,
                               media=media, passages=note_passages(notes, rng, 0.25))
                      | {"images": line["images"]}})
        lines[-1]["messages"].append({"role": "assistant", "content": answer})
    many = varied_vqa_manifest(data, count - single, seed=seed + 1, word_answers=True).read_text().splitlines()
    return lines + [json.loads(x) for x in many]


def drawing_lines(draw_it: Path, count: int, *, schemas: list[dict],
                  rng: random.Random) -> list[dict]:
    """Drawing requests answered with the model's own signal tokens, half of them as served."""
    from langchain_core.messages import HumanMessage

    lines = []
    for raw in draw_it.read_text().splitlines()[:count]:
        line = json.loads(raw)
        if rng.random() < 0.5:
            request, reply = line["messages"][0]["content"], line["messages"][-1]["content"]
            framed = served([HumanMessage(request)], schemas=schemas)
            line = {**line, "messages": framed["messages"] + [{"role": "assistant", "content": reply}]}
        lines.append(line)
    return lines


def tool_lines(items: list[dict], *, schemas: list[dict], notes: list[str],
               per_conversation: int, rng: random.Random) -> list[dict]:
    """Tool requests as served: media attached or named from earlier turns, notes retrieved or not;
    with `per_conversation` > 0, sessions where each call is followed by its result and the reply
    that states it (the response stage), else one request answered by its calls."""
    from langchain_core.messages import AIMessage, HumanMessage

    from agent.proofs.choosing import _episode
    from graphs.prompting import render_tool_calls

    lines = []
    if not per_conversation:
        for i, item in enumerate(items):
            text, media = _attached(item["request"], rng)
            calls = [{"id": f"c{i}{j}", "name": c["name"], "args": c["arguments"]} for j, c in enumerate(item["calls"])]
            answer = item["answer"] or render_tool_calls(AIMessage(content="", tool_calls=calls))
            line = served([HumanMessage(text)], schemas=schemas, media=media,
                          passages=note_passages(notes, rng))
            line["messages"].append({"role": "assistant", "content": answer})
            lines.append(line)
        return lines
    for first in range(0, len(items), per_conversation):
        messages, media = [], []
        for item in items[first: first + per_conversation]:
            episode = _episode(item, rng, len(messages))
            text, media = _attached(episode[0].content, rng)
            messages += [HumanMessage(text), *episode[1:]]
        # the last turn's attachments and notes, as the controller renders its last think step
        lines.append(served(messages, schemas=schemas, media=media, passages=note_passages(notes, rng)))
    return lines


def plan_lines(schemas: list[dict], count: int, seed: int) -> list[dict]:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from graphs.planner import PLAN_TOOL, plan_tool, planner_prompt
    from graphs.prompting import to_chat

    system = system_prompt([plan_tool(schemas)], [])
    lines = []
    for i, item in enumerate(plan_requests(count, seed=seed)):
        call = {"id": f"p{i}", "name": PLAN_TOOL, "args": {"tasks": item["tasks"]}}
        chat, _ = to_chat([SystemMessage(planner_prompt(schemas)), HumanMessage(item["request"]),
                           AIMessage(content="", tool_calls=[call])], system_prefix=system)
        lines.append({"messages": chat})
    return lines


def general_lines(teacher_answers: list[tuple[str, str]], schemas: list[dict],
                  notes: list[str], rng: random.Random) -> list[dict]:
    """Everyday prompts with the untrained backbone's own answers; half as served (tools,
    retrieved notes), so that what the controller adds does not change how it answers."""
    from langchain_core.messages import HumanMessage

    lines = []
    for prompt, answer in teacher_answers:
        if rng.random() < 0.5:
            line = served([HumanMessage(prompt)], schemas=schemas, passages=note_passages(notes, rng))
        else:
            line = {"messages": [{"role": "user", "content": prompt}]}
        line["messages"].append({"role": "assistant", "content": answer})
        lines.append(line)
    return lines


def teacher_answers(mm, prompts: list[str], max_new_tokens: int = 96) -> list[tuple[str, str]]:
    """The backbone's own greedy answers, kept only where it finished within the budget (a cut
    answer would teach stopping mid-sentence)."""
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(prompts), 16), desc="the backbone's own answers"):
        chunk = prompts[start:start + 16]
        made = mm.generate_many([([{"role": "user", "content": p}], {}) for p in chunk],
                                max_new_tokens=max_new_tokens)
        for prompt, generation in zip(chunk, made):
            text = generation.text.strip()
            if text and len(mm.backbone.tokenizer(text)["input_ids"]) < max_new_tokens - 2:
                out.append((prompt, text))
    return out


def assistant_mix(data: Path, *, schemas: list[dict], draw_it: Path,
                  teacher: list[tuple[str, str]], counts: dict[str, int], seed: int = 0) -> list[dict]:
    """The mixed, shuffled manifest lines. `counts` has seeing, tool_sessions (two requests each),
    tool_lines, drawing, plans and caller_tools (general comes from `teacher`)."""
    from agent.proofs.caller_tool_requests import caller_tool_lines
    from agent.proofs.tool_requests import own_drawing, requests

    rng = random.Random(seed)
    notes = [answer for _, answer in teacher]  # what retrieved notes look like: everyday prose
    wanted = counts["tool_sessions"] * 2 + counts["tool_lines"]
    offered = {t["name"] for t in schemas}
    tool_items = [item for item in requests(wanted * 3, split="train", seed=seed, mix=(50, 35, 15))
                  if not own_drawing(item["request"]) and all(c["name"] in offered for c in item["calls"])][:wanted]
    cut = counts["tool_sessions"] * 2
    lines = (seeing_lines(data, counts["seeing"], schemas=schemas, notes=notes, served_share=0.6,
                          rng=rng, seed=seed)
             + drawing_lines(draw_it, counts["drawing"], schemas=schemas, rng=rng)
             + tool_lines(tool_items[:cut], schemas=schemas, notes=notes, per_conversation=2, rng=rng)
             + tool_lines(tool_items[cut:], schemas=schemas, notes=notes, per_conversation=0, rng=rng)
             + plan_lines(schemas, counts["plans"], seed)
             + caller_tool_lines(counts.get("caller_tools", 0), seed=seed)
             + general_lines(teacher, schemas, notes, rng))
    rng.shuffle(lines)
    return lines
