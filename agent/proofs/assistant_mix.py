"""The assistant's instruction-tuning mix: every skill in the phrasings and the prompt format people
meet it in.

- seeing: easy-vqa questions in many styles and wordings (models/training/vqa_phrasings.py);
- tools: sessions of requests, each call followed by the tool's own sentence and the reply that
  states it (the turn after a result, HuggingGPT's response stage), and single requests;
- drawing: requests answered with the model's own signal tokens;
- plans: multi-step requests answered with a plan call (agent/proofs/plan_requests.py);
- self-description: "what can you do?" answered from the tools and skills the prompt lists;
- kept knowledge: everyday prompts answered by the untrained backbone itself (self-distillation).

Most lines are in the controller's own prompt format (system prompt with skills, tools and
attachments, `[attached: image-1]` after the user's words), so what is trained is what a person
meets through the CLI and the API.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from agent.proofs.choosing import tool_conversation_lines, tool_use_lines
from agent.proofs.plan_requests import plan_requests
from graphs.capabilities import SKILL_WORDS, describe
from graphs.thinker import system_prompt

# training phrasings of "what can you do?"; the held-out ones are in CAPABILITY_HELD_OUT
CAPABILITY_QUESTIONS = [
    "What can you do?", "Hi! What can you do?", "What are you able to help with?", "What are your skills?",
    "Tell me what you can do.", "How can you help me?", "What kinds of things can you do for me?",
    "Which tools do you have?", "What are you capable of?", "Hello, what can I ask you to do?",
    "Can you list what you can do?", "What do you do?",
]
CAPABILITY_HELD_OUT = ["Hey, what sort of tasks can you handle?", "What are you good at?",
                       "Could you tell me your abilities?", "What help can you give me?"]
# tools other people register, so that self-description reads descriptions, not one fixed list
OTHER_TOOLS = [
    {"name": "send_email", "description": "Send an email to a colleague.",
     "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
                    "required": ["to", "body"]}},
    {"name": "get_weather", "description": "Get the weather forecast for a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "set_timer", "description": "Set a timer for some minutes.",
     "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"]}},
]
ALL_SKILLS = list(SKILL_WORDS.values())


def _controller_format(line: dict, schemas: list[dict], skills: list[str]) -> dict:
    """A manifest line as the controller would show it: its system prompt, and the attachment
    note after the words of the message that carries the image."""
    messages = [dict(m) for m in line["messages"]]
    media = [{"id": f"image-{i + 1}", "kind": "image"} for i in range(len(line.get("images", [])))]
    for m in messages:
        if m["role"] == "user" and "<image>" in m["content"]:
            m["content"] += "\n[attached: " + ", ".join(x["id"] for x in media) + "]"
    messages.insert(0, {"role": "system", "content": system_prompt(schemas, media, skills)})
    return {**line, "messages": messages}


def capability_lines(schemas: list[dict], count: int, rng: random.Random) -> list[dict]:
    lines = []
    for _ in range(count):
        tools = rng.sample(schemas, rng.randint(0, len(schemas)))
        if rng.random() < 0.3:
            tools.append(rng.choice(OTHER_TOOLS))
        skills = [s for s in ALL_SKILLS if rng.random() < 0.5]
        lines.append({"messages": [{"role": "system", "content": system_prompt(tools, [], skills)},
                                   {"role": "user", "content": rng.choice(CAPABILITY_QUESTIONS)},
                                   {"role": "assistant", "content": describe(tools, skills)}]})
    return lines


def plan_lines(schemas: list[dict], count: int, skills: list[str], seed: int) -> list[dict]:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from graphs.planner import PLAN_TOOL, plan_tool, planner_prompt
    from graphs.prompting import to_chat

    system = system_prompt([plan_tool(schemas)], [], skills)
    lines = []
    for i, item in enumerate(plan_requests(count, seed=seed)):
        call = {"id": f"p{i}", "name": PLAN_TOOL, "args": {"tasks": item["tasks"]}}
        chat, _ = to_chat([SystemMessage(planner_prompt(schemas)), HumanMessage(item["request"]),
                           AIMessage(content="", tool_calls=[call])], system_prefix=system)
        lines.append({"messages": chat})
    return lines


def general_lines(teacher_answers: list[tuple[str, str]], schemas: list[dict], skills: list[str],
                  rng: random.Random) -> list[dict]:
    """Everyday prompts with the untrained backbone's own answers; half under the controller's
    system prompt, so that listing tools does not change how it answers a plain question."""
    lines = []
    for prompt, answer in teacher_answers:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": system_prompt(schemas, [], skills)})
        lines.append({"messages": messages})
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


def assistant_mix(data: Path, *, schemas: list[dict], skills: list[str], draw_it: Path,
                  teacher: list[tuple[str, str]], counts: dict[str, int], seed: int = 0) -> list[dict]:
    """The mixed, shuffled manifest lines. `counts` has seeing, tool_sessions, tool_lines, drawing,
    plans, capabilities (general comes from `teacher`)."""
    from agent.proofs.tool_requests import own_drawing, requests
    from models.training.vqa_phrasings import varied_vqa_manifest

    rng = random.Random(seed)
    vqa = [json.loads(x) for x in varied_vqa_manifest(data, counts["seeing"], seed=seed).read_text().splitlines()]
    # two in three in the controller's format: the API and the CLI are where seeing is used
    vqa = [_controller_format(x, schemas, skills) if rng.random() < 2 / 3 else x for x in vqa]
    draw = [json.loads(x) for x in draw_it.read_text().splitlines()[: counts["drawing"]]]
    draw = [_controller_format(x, schemas, skills) if rng.random() < 0.5 else x for x in draw]
    system = system_prompt(schemas, [], skills)
    wanted = counts["tool_sessions"] * 2 + counts["tool_lines"]
    tool_items = [item for item in requests(wanted * 2, split="train", seed=seed, mix=(50, 35, 15))
                  if not own_drawing(item["request"])][:wanted]
    sessions = tool_conversation_lines(system, tool_items[: counts["tool_sessions"] * 2], 2, seed=seed)
    singles = tool_use_lines(system, tool_items[counts["tool_sessions"] * 2:])
    lines = (vqa + draw + sessions + singles + plan_lines(schemas, counts["plans"], skills, seed)
             + capability_lines(schemas, counts["capabilities"], rng) + general_lines(teacher, schemas, skills, rng))
    rng.shuffle(lines)
    return lines
