"""`python -m agent.proofs.assistant_eval`: the assistant measured as a person meets it.

A real `signalgraph serve` (its own empty home, the example notes in its knowledge base) is asked
through the official `openai` client, on items and phrasings that no training line uses:

- seeing: the fixed easy-vqa test questions with the image, in each evaluated style's held-out
  wording (models/training/vqa_phrasings.py); the reply's last word is scored;
- drawing: "Draw a <colour> <shape>" in held-out wordings, the linked picture read by the judge;
- tools: held-out tool requests with real media attached and the real tools run; the right tools
  and arguments (from the turn's trace), and whether the reply states every result;
- plans: held-out multi-step requests planned by the backbone (`make_plan`, as `signalgraph plan`);
- caller's tools: function calling with tools the API's caller brings (`tools`), as an app would;
- general: questions with known answers (agent/proofs/general_questions.py), beside any baseline profile;
- self-description: held-out "what can you do?" questions, scored against the session's tools;
- every reply of every part: none may look like JSON or the controller's markup.

Requests go 8 at a time, as 8 users would; the server batches their decoding. Results go to
`--out` as results.json and per-part JSONL rows.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AUDIO = ROOT / "examples" / "data" / "question.wav"
IMAGE = ROOT / "examples" / "data" / "cat.jpg"
NOTES = ROOT / "examples" / "notes"
# the held-out tool requests' topics that the example notes cover
COVERED_TOPICS = ("the team offsite", "the release process")


@contextmanager
def served(profile: str, log: Path):
    """`signalgraph serve --profile PROFILE` in its own empty home with the example notes; yields
    its base URL and stops it afterwards."""
    home = tempfile.mkdtemp(prefix="signalgraph-eval-")
    env = {**os.environ, "SIGNALGRAPH_HOME": home}
    cli = [sys.executable, "-m", "agent.cli.main"]
    subprocess.run([*cli, "--profile", profile, "kb", "add", str(NOTES)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as out:
        server = subprocess.Popen([*cli, "--profile", profile, "serve", "--port", str(port), "--log-level",
                                   "warning", "--queue", "64"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(f"the server stopped; see {log}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def _data_url(path: Path) -> str:
    kind = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def _ask(client, user: str, text: str, *, image: Path | None = None, audio: Path | None = None) -> dict:
    parts: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": _data_url(image)}})
    if audio is not None:
        parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(audio.read_bytes()).decode(),
                                                             "format": "wav"}})
    completion = client.chat.completions.create(model=client.model_id, user=user,
                                                messages=[{"role": "user", "content": parts}])
    message = completion.choices[0].message
    extension = completion.model_extra.get("signalgraph") or {}
    return {"text": message.content or "", "trace": extension.get("trace", []), "media": extension.get("media", [])}


def _words(text: str) -> str:
    """The reply as a person reads it, without the media links the API appends."""
    return re.sub(r"!?\[[^\]]*\]\([^)]*\)", "", text).strip()


def _last_word(text: str) -> str:
    words = re.findall(r"[a-z]+", _words(text).lower())
    return words[-1] if words else ""


def _many(fn, items: list, desc: str, workers: int = 8) -> list:
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc))


def seeing(client, count: int, styles: list[str], seed: int = 0) -> dict:
    from agent.proofs.seeing import test_sample
    from models.training.data import read_manifest
    from models.training.vqa_phrasings import styled_test_lines

    records = read_manifest(test_sample(Path(tempfile.mkdtemp()), 1000, seed))[:count]
    sample = [{"image": r.media["image"][0], "question": r.messages[0]["content"].split("\n", 1)[1]
               .replace(" Answer with one word.", ""), "answer": r.messages[-1]["content"]} for r in records]
    out = {}
    for style in styles:
        rows = styled_test_lines(sample, style, seed)

        def one(item: dict, style=style) -> dict:
            reply = _ask(client, f"see-{style}-{random.random()}", item["prompt"], image=Path(item["image"]))
            return {**item, "image": str(item["image"]), "reply": reply["text"],
                    "correct": _last_word(reply["text"]) == item["answer"],
                    "one_word": len(_words(reply["text"]).split()) == 1}
        done = _many(one, rows, f"seeing: {style}")
        out[style] = {"accuracy": round(sum(r["correct"] for r in done) / len(done), 4), "of": len(done),
                      "one_word_replies": round(sum(r["one_word"] for r in done) / len(done), 4),
                      "example": done[0]["prompt"], "rows": done}
    return out


def _held_out_tool_items(count: int, offered: set[str]) -> list[dict]:
    """Held-out tool requests for the tools the server offers, their media ids mapped onto the
    attached ones (audio-1, image-1) and their topics onto the example notes."""
    from agent.proofs.tool_requests import own_drawing, requests

    items = []
    for item in requests(count * 3, split="heldout", seed=7, mix=(70, 30, 0)):
        text = item["request"]
        if own_drawing(text) or any(c["name"] not in offered for c in item["calls"]):
            continue  # the model's own drawings are not a tool's; a tool the profile cannot run is not offered
        calls = json.loads(re.sub(r"audio-\d", "audio-1", re.sub(r"image-\d", "image-1", json.dumps(item["calls"]))))
        text = re.sub(r"audio-\d", "audio-1", re.sub(r"image-\d", "image-1", text))
        for call in calls:
            if call["name"] == "search_knowledge" and call["arguments"]["query"] not in COVERED_TOPICS:
                topic = COVERED_TOPICS[len(items) % 2]
                text = text.replace(call["arguments"]["query"], topic)
                call["arguments"]["query"] = topic
        items.append({"request": text, "calls": calls})
    return items[:count]


def tools(client, count: int, offered: set[str]) -> dict:
    from graphs.reply import is_markup, states

    def one(item: dict) -> dict:
        media = {m for c in item["calls"] for m in c["arguments"].values() if isinstance(m, str)}
        reply = _ask(client, f"tools-{random.random()}", item["request"],
                     image=IMAGE if "image-1" in media else None, audio=AUDIO if "audio-1" in media else None)
        acts = [e for e in reply["trace"] if e["step"] == "act"]
        made = sorted(json.dumps({"name": e["tool"], "arguments": e["args"]}, sort_keys=True) for e in acts)
        wanted = sorted(json.dumps(c, sort_keys=True) for c in item["calls"])
        respond = next((e for e in reply["trace"] if e["step"] == "respond"), {})
        return {**item, "reply": reply["text"], "tools": sorted(e["tool"] for e in acts),
                "right_tool": sorted(e["tool"] for e in acts) == sorted(c["name"] for c in item["calls"]),
                "right_arguments": _same_arguments(made, wanted),
                "words": not is_markup(_words(reply["text"])) and bool(_words(reply["text"])),
                "model_wrote_reply": not respond.get("composed", True),
                "states_results": all(states(reply["text"], r) for r in _results(reply["trace"]))}
    done = _many(one, _held_out_tool_items(count, offered), "tools")
    rate = lambda key: round(sum(r[key] for r in done) / len(done), 4)  # noqa: E731
    return {"of": len(done), "right_tool": rate("right_tool"), "right_arguments": rate("right_arguments"),
            "replies_in_words": rate("words"), "replies_stating_results": rate("states_results"),
            "replies_written_by_the_model": rate("model_wrote_reply"), "rows": done}


def _offered(profile: str) -> set[str]:
    """The tools a server on `profile` offers (it has a knowledge base)."""
    from models.profiles import load_profile
    from tools.expert_tools import runnable_tools

    return set(runnable_tools(load_profile(profile), knowledge_base=True))


def _same_arguments(made: list[str], wanted: list[str]) -> bool:
    """Calls with the wanted arguments; arguments left at their defaults may be written or not."""
    defaults = {"top_k": 3, "seed": 0, "seconds": 5.0, "k": 4}
    strip = lambda s: json.dumps({**json.loads(s), "arguments": {k: v for k, v in json.loads(s)["arguments"].items()  # noqa: E731
                                                                 if defaults.get(k) != v}}, sort_keys=True)
    return sorted(map(strip, made)) == sorted(map(strip, wanted))


def _results(trace: list[dict]) -> list[dict]:
    """The turn's tool results as the response stage saw them, from the trace's act entries."""
    return [{"name": e["tool"], "error": e.get("error"), "artifact": e.get("result")} for e in trace
            if e["step"] == "act"]


DRAWING_HELD_OUT = ["Could you draw me a {c} {s}?", "Show me a {c} {s}, drawn by you."]


def drawing(client, judge_file: Path) -> dict:
    """"Draw a <colour> <shape>" in held-out wordings for all 24 pairs; the picture the reply links
    is fetched over HTTP and read back by the shapes judge (trained here once, then reused)."""
    import io
    import itertools

    import httpx
    from PIL import Image

    from models.training.data import easy_vqa_shapes
    from models.training.shape_judge import COLORS, SHAPES, load_judge, save_judge, train_judge

    if judge_file.is_file():
        judge = load_judge(judge_file)
    else:
        judge = train_judge(easy_vqa_shapes("train"))
        save_judge(judge, judge_file)

    def one(item):
        c, s, wording = item
        reply = _ask(client, f"draw-{random.random()}", wording.format(c=c, s=s))
        images = [m for m in reply["media"] if m["kind"] == "image"]
        seen = judge.judge([Image.open(io.BytesIO(httpx.get(images[0]["url"]).content)).convert("RGB")])[0] \
            if images else None
        via = "output projector" if any(e["step"] == "generate" and e.get("media") for e in reply["trace"]) else \
            "generate_image tool" if any(e["step"] == "act" and e["tool"] == "generate_image" for e in reply["trace"]) \
            else "nothing drawn"
        return {"request": wording.format(c=c, s=s), "reply": reply["text"], "judged": seen, "via": via,
                "right": seen == (c, s)}
    done = _many(one, [(c, s, w) for c, s in itertools.product(COLORS, SHAPES) for w in DRAWING_HELD_OUT], "drawing")
    return {"of": len(done), "judged_right": round(sum(r["right"] for r in done) / len(done), 4),
            "via": {v: sum(r["via"] == v for r in done) for v in {r["via"] for r in done}}, "rows": done}


CALLER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount of money.",
                                      "parameters": {"type": "object", "properties": {
                                          "amount": {"type": "number"}, "to": {"type": "string"}},
                                          "required": ["amount", "to"]}}},
    {"type": "function", "function": {"name": "add_reminder", "description": "Add a reminder to the user's list.",
                                      "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                                                     "required": ["text"]}}},
]
CALLER_REQUESTS = [  # (request, tool, the argument that must appear)
    *[(f"What is the weather like in {c}?", "get_weather", c) for c in ("Oslo", "Lima", "Cairo", "Denver")],
    *[(f"Is it raining in {c} right now?", "get_weather", c) for c in ("Paris", "Seoul")],
    *[(f"Convert {n} dollars to euros.", "convert_currency", n) for n in ("20", "150", "75")],
    *[(f"How much is {n} pounds in yen?", "convert_currency", n) for n in ("40", "12")],
    *[(f"Remind me to {t}.", "add_reminder", t) for t in ("call the dentist", "buy milk", "water the plants")],
    *[(f"Add a reminder: {t}.", "add_reminder", t) for t in ("pay rent", "book flights")],
]


def caller_tools(client) -> dict:
    """Function calling with other people's tools through the API's `tools`, as an app would."""
    def one(item):
        request, tool, argument = item
        completion = client.chat.completions.create(model=client.model_id, tools=CALLER_TOOLS,
                                                    messages=[{"role": "user", "content": request}])
        calls = completion.choices[0].message.tool_calls or []
        named = [c.function.name for c in calls]
        return {"request": request, "calls": [(c.function.name, c.function.arguments) for c in calls],
                "right_tool": named == [tool],
                "right_arguments": named == [tool] and argument.lower() in calls[0].function.arguments.lower(),
                "finish_reason": completion.choices[0].finish_reason}
    done = _many(one, CALLER_REQUESTS, "caller's tools")
    return {"of": len(done), "right_tool": round(sum(r["right_tool"] for r in done) / len(done), 4),
            "right_arguments": round(sum(r["right_arguments"] for r in done) / len(done), 4), "rows": done}


def general(client, questions: list[tuple[str, tuple[str, ...]]]) -> dict:
    from agent.proofs.general_questions import correct

    def one(item):
        question, answers = item
        reply = _ask(client, f"general-{random.random()}", question)
        return {"question": question, "reply": reply["text"], "correct": correct(reply["text"], answers)}
    done = _many(one, questions, "general")
    return {"of": len(done), "accuracy": round(sum(r["correct"] for r in done) / len(done), 4), "rows": done}


def capabilities(client) -> dict:
    from agent.proofs.assistant_mix import CAPABILITY_HELD_OUT
    from graphs.capabilities import TOOL_WORDS

    def one(question):
        reply = _ask(client, f"caps-{random.random()}", question)
        text = reply["text"].lower()
        named = [name for name, words in TOOL_WORDS.items() if words in text or name.replace("_", " ") in text]
        return {"question": question, "reply": reply["text"], "tools_named": named,
                "honest": "audio generator" not in text and set(named) >= set(TOOL_WORDS) - {"generate_audio"}}
    done = _many(one, CAPABILITY_HELD_OUT, "self-description")
    return {"of": len(done), "honest": round(sum(r["honest"] for r in done) / len(done), 4), "rows": done}


def plans(profile: str, count: int) -> dict:
    from agent.proofs.plan_requests import plan_requests, right_tools
    from graphs.planner import PLAN_MAX_NEW_TOKENS, PlanError, make_plan
    from graphs.thinker import BackboneThinker, ConditioningCache
    from models.mmllm import MMLLM
    from models.profiles import load_profile
    from tools.expert_tools import ToolContext, build_tools
    from tools.media_store import MediaStore

    loaded = load_profile(profile)
    mm = MMLLM.from_profile(loaded)
    thinker = BackboneThinker(mm, ConditioningCache(), max_new_tokens=PLAN_MAX_NEW_TOKENS)
    session_tools = build_tools(ToolContext("plans", loaded, MediaStore(Path(tempfile.mkdtemp()))))
    rows = []
    for item in plan_requests(count, split="heldout", seed=3):
        try:
            made = [{"tool": t.tool, "args": t.args} for t in make_plan(thinker, item["request"], session_tools).tasks]
            error = None
        except PlanError as exc:
            made, error = [], str(exc)
        rows.append({"request": item["request"], "expected": [t["tool"] for t in item["tasks"]],
                     "made": [t["tool"] for t in made], "right_tools": right_tools(made,
                                                                                   item["tasks"]), "error": error})
    return {"of": len(rows), "right_tools": round(sum(r["right_tools"] for r in rows) / len(rows), 4), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    from openai import OpenAI

    from graphs.reply import is_markup

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="local")
    parser.add_argument("--out", default="results/assistant-eval")
    parser.add_argument("--seeing", type=int, default=1000, help="test questions per style")
    parser.add_argument("--styles", nargs="*", default=None, help="default: the four evaluated styles")
    parser.add_argument("--tools", type=int, default=48)
    parser.add_argument("--plans", type=int, default=21)
    parser.add_argument("--only", action="append",
                        help="seeing, tools, caller_tools, drawing, plans, general, capabilities")
    args = parser.parse_args(argv)
    from agent.proofs.general_questions import HELD_OUT
    from models.training.vqa_phrasings import EVALUATED_STYLES

    parts = set(args.only or ["seeing", "tools", "caller_tools", "drawing", "plans", "general", "capabilities"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"profile": args.profile}
    started = time.perf_counter()
    if parts - {"plans"}:
        with served(args.profile, out / "server.log") as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="none")
            client.model_id = client.models.list().data[0].id
            if "capabilities" in parts:
                results["capabilities"] = capabilities(client)
            if "general" in parts:
                results["general"] = general(client, HELD_OUT)
            if "tools" in parts:
                results["tools"] = tools(client, args.tools, _offered(args.profile))
            if "caller_tools" in parts:
                results["caller_tools"] = caller_tools(client)
            if "drawing" in parts:
                results["drawing"] = drawing(client, out.parent / "shape-judge.pt")
            if "seeing" in parts:
                results["seeing"] = seeing(client, args.seeing, args.styles or list(EVALUATED_STYLES))
    if "plans" in parts:
        results["plans"] = plans(args.profile, args.plans)
    replies = [r["reply"] for part in results.values() if isinstance(part, dict)
               for rows in ([part.get("rows", [])] + [v.get("rows", []) for v in part.values() if isinstance(v, dict)])
               for r in rows if "reply" in r]
    results["replies"] = {"of": len(replies), "markup": sum(is_markup(_words(r)) for r in replies)}
    results["minutes"] = round((time.perf_counter() - started) / 60, 1)
    for name, part in results.items():
        if isinstance(part, dict):
            rows = part.pop("rows", None)
            for key, value in list(part.items()):
                if isinstance(value, dict) and "rows" in value:
                    (out / f"{name}-{key.replace(' ', '-')}.jsonl").write_text(
                        "".join(json.dumps(r) + "\n" for r in value.pop("rows")))
            if rows is not None:
                (out / f"{name}.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
