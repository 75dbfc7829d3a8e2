"""The choosing proof's training data: requests, their calls, the tools' results and the replies after them,
rendered as the controller renders a session."""

import json
import random

import pytest

from agent.proofs.choosing import tool_conversation_lines
from agent.proofs.tool_requests import ARGUMENT, FILLS, TEMPLATES, requests, tool_result


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_tool_has_a_result_and_a_reply_that_reports_it(name):
    rng = random.Random(0)
    argument, fill = ARGUMENT[name]
    for value in FILLS[fill]:
        result, reply = tool_result({"name": name, "arguments": {argument: value}}, rng)
        json.dumps(result)
        reported = {"transcribe": lambda: result["text"], "speak": lambda: result["audio"],
                    "describe_image": lambda: result["labels"][0]["label"], "generate_image": lambda: result["image"],
                    "generate_audio": lambda: result["audio"],
                    "search_knowledge": lambda: result["passages"][0]["text"]}[name]()
        assert reported in reply


def test_mix_changes_the_share_of_two_call_requests_and_leaves_the_default_alone():
    two = sum(len(r["calls"]) == 2 for r in requests(2000, mix=(0, 100, 0)))
    assert two == 2000
    assert requests(50, split="heldout") == requests(50, split="heldout", mix=(60, 25, 15))


def test_conversations_follow_each_call_with_its_result_and_a_reply(tiny_backbone, tmp_path):
    from models.training.data import read_manifest, tokenize

    items = requests(12, split="train", mix=(40, 40, 20))
    lines = tool_conversation_lines("SYSTEM", items, per_conversation=3)
    assert len(lines) == 4
    messages = [m for line in lines for m in line["messages"]]
    assert sum(m["role"] == "system" for m in messages) == 4
    calls = sum(len(item["calls"]) for item in items)
    results = [m for m in messages if m["role"] == "user" and m["content"].startswith("Result of ")]
    assert len(results) == calls  # one result turn per call, in the controller's plain wording
    assert all(m["content"].endswith("Now reply to my request in one short sentence.") for m in results)
    for k, message in enumerate(messages):
        if message in results and messages[k + 1]["role"] == "assistant":  # the last result of a request
            reply = messages[k + 1]["content"]
            assert reply and "<tool_call>" not in reply

    manifest = tmp_path / "tools.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    record = read_manifest(manifest)[0]  # a valid manifest line
    ids, labels = tokenize(record, tiny_backbone)
    labelled = tiny_backbone.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    unlabelled = tiny_backbone.tokenizer.decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert "Result of" in unlabelled and "Result of" not in labelled  # results are context, not targets
    for message in lines[0]["messages"]:
        if message["role"] == "assistant":
            assert message["content"] in labelled
