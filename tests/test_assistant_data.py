"""The assistant's IT mix: instruction variety for seeing, plans, self-description, callers' tools,
kept knowledge, all rendered as the controller serves them."""

from __future__ import annotations

import json

from agent.proofs.assistant_mix import assistant_mix
from agent.proofs.general_questions import HELD_OUT, correct, training_prompts
from agent.proofs.plan_requests import KINDS, plan_requests, right_tools
from graphs.capabilities import TOOL_WORDS, describe
from models.training.data import read_manifest
from models.training.vqa_phrasings import STYLES, answer_in, styled_test_lines, varied_vqa_manifest

SCHEMAS = [{"name": n, "description": f"{n} things.", "parameters": {"type": "object", "properties": {}}}
           for n in TOOL_WORDS]


# --- seeing -------------------------------------------------------------------------------------


def test_varied_questions_get_the_answer_form_their_instruction_asks(tmp_path):
    manifest = varied_vqa_manifest(tmp_path, 120, seed=1)
    records = read_manifest(manifest)  # valid manifest lines, images that exist
    assert len(records) == 120
    held_out = {w.replace("{q}", "").strip() for _, _, wordings in STYLES.values() for w in wordings if w != "{q}"}
    one_word = [w.replace("{q}", "").strip() for style, (form, train, _) in STYLES.items() if form == "word"
                for w in train]
    turns = [(m["content"], r.messages[i + 1]["content"]) for r in records for i, m in enumerate(r.messages)
             if m["role"] == "user"]
    assert len(turns) > 150
    for question, answer in turns:
        assert not any(h and h in question for h in held_out), question  # held-out wordings never train
        if any(w in question for w in one_word):
            assert len(answer.split()) == 1, (question, answer)
        else:
            assert answer.endswith("."), (question, answer)
    assert any(a.endswith("so no.") for _, a in turns) and any(a.endswith("so yes.") for _, a in turns)


def test_sentence_answers_end_in_the_scored_word():
    facts = {"color": "blue", "shape": "circle"}
    assert answer_in("sentence", "what color is the shape?", "blue", facts) == "It is blue."
    assert answer_in("sentence", "is there a red shape?", "no", facts) == "Blue is not red, so no."
    assert answer_in("word", "is there a red shape?", "no", facts) == "no"
    assert answer_in("sentence", "is there a red shape?", "no", {}) is None  # no fact, no sentence


def test_each_style_is_evaluated_in_its_held_out_wording():
    sample = [{"image": "x.png", "question": "what color is the shape?", "answer": "blue"}]
    for style, (_, train, held_out) in STYLES.items():
        (row,) = styled_test_lines(sample, style)
        assert row["prompt"] in [w.format(q="What color is the shape?") for w in held_out]
        if style != "bare":
            assert row["prompt"] not in [w.format(q="What color is the shape?") for w in train]


# --- plans, self-description, kept knowledge ---------------------------------------------------------


def test_plan_requests_validate_against_the_real_tools_and_hold_out_their_phrasings(tiny_profile, tmp_path):
    from graphs.planner import validate_plan
    from tools.expert_tools import ToolContext, build_tools
    from tools.media_store import MediaStore

    tools = build_tools(ToolContext("s", tiny_profile, MediaStore(tmp_path / "m")))
    train, held_out = plan_requests(70), plan_requests(14, split="heldout")
    assert {i["request"] for i in train}.isdisjoint({i["request"] for i in held_out})
    for item in train[:14] + held_out:
        plan = validate_plan({"tasks": item["tasks"]}, tools)
        assert right_tools([{"tool": t.tool} for t in plan.tasks], item["tasks"])
    assert {len(KINDS[k][1]) for k in KINDS} >= {2, 3}


def test_self_description_names_exactly_the_sessions_tools_and_skills():
    tools = [s for s in SCHEMAS if s["name"] in ("transcribe", "speak")]
    text = describe(tools, ["look at the images you attach"])
    assert "write down what is said in a recording" in text and "read text aloud" in text
    assert "draw a picture" not in text and "look at the images you attach" in text
    assert "no tools" in describe([], [])
    other = {"name": "send_email", "description": "Send an email to a colleague. Needs an address."}
    assert "send an email to a colleague" in describe([other], [])


def test_general_training_prompts_never_ask_a_held_out_question():
    prompts = training_prompts(300)
    assert len(prompts) == len(set(prompts)) == 300
    assert not {q.lower() for q, _ in HELD_OUT} & {p.lower() for p in prompts}
    assert correct("The capital is Dublin.", ("dublin",)) and not correct("Paris.", ("dublin",))


def test_the_mix_is_valid_and_rendered_as_the_controller_serves_it(tmp_path):
    from langchain_core.messages import HumanMessage

    from agent.proofs.drawing import _manifests
    from graphs.thinker import render_prompt

    _, draw_it = _manifests(tmp_path, 48, 0)
    teacher = [("What is gravity?", "Gravity pulls things together."), ("Name a fruit.", "An apple.")]
    lines = assistant_mix(tmp_path, schemas=SCHEMAS, draw_it=draw_it, teacher=teacher,
                          counts={"seeing": 30, "tool_sessions": 6, "tool_lines": 4, "drawing": 8, "plans": 6,
                                  "caller_tools": 7}, seed=0)
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = read_manifest(path)
    assert len(records) == 30 + 6 + 4 + 8 + 6 + 7 + 2
    seeing = [r for r in records if r.media["image"]]
    framed = [r for r in seeing if r.messages[0]["role"] == "system"]
    assert len(framed) == 18  # 60% one question, as a person asks it through the CLI or the API
    for r in framed:  # exactly the think step's prompt, the image placeholder where the backbone puts it
        user = r.messages[1]["content"]
        assert user.startswith("<image>\n") and "[attached: image-1]" in user
        question = user.split("\n[attached")[0]
        passages = []
        if "\n\nAnswer from these notes" in user:
            continue  # retrieved notes: rendered by the same function, checked below for a tool line
        assert r.messages[:2] == render_prompt([HumanMessage(question + "\n[attached: image-1]")], tools=SCHEMAS,
                                               passages=passages, media=[{"id": "image-1", "kind": "image"}])
    replies = [m["content"] for r in records for m in r.messages if m["role"] == "assistant"]
    assert any(" says: " in r or "looks like" in r or "I said" in r for r in replies)  # the turn after a result
    users = [m["content"] for r in records for m in r.messages if m["role"] == "user"]
    assert any("Answer from these notes" in u for u in users)  # retrieved notes, as a knowledge base adds them
    assert any("[attached: audio-" in u for u in users) and any(
        "audio-" in u and "[attached" not in u for u in users)  # media attached now, and named from before
    callers = [r for r in records if "To use a tool, reply with only a tool call" in r.messages[0]["content"]]
    assert len(callers) == 7


def test_callers_tool_lines_call_an_offered_tool_with_the_requests_words_and_never_the_evaluated_tools():
    from agent.proofs.assistant_eval import CALLER_REQUESTS, CALLER_TOOLS
    from agent.proofs.caller_tool_requests import caller_tool_lines
    from graphs.signal_parser import parse_message

    lines = caller_tool_lines(200, seed=3)
    evaluated = {t["function"]["name"] for t in CALLER_TOOLS}
    calls = 0
    for line in lines:
        system, user, answer = (m["content"] for m in line["messages"])
        assert not any(f"- {name}:" in system for name in evaluated)
        assert user not in {r for r, _, _ in CALLER_REQUESTS}
        parsed = parse_message(answer)
        for call in parsed.tool_calls:
            calls += 1
            assert f"- {call.name}:" in system
            assert all(str(v) in user for v in call.arguments.values())
        assert parsed.tool_calls or "<tool_call>" not in answer
    assert 120 < calls < 190  # about one in five answered in words
