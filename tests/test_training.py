"""Training (PT, then IT) on the tiny profile: losses fall, frozen parts stay frozen, checkpoints
round-trip, resume continues the same run, bad manifests name file and line, the feature cache is hit."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from models.errors import ConfigError
from models.mmllm import MMLLM
from models.training import DatasetError, StageSpec, TrainConfig, apply_stage, read_manifest, tokenize
from models.training.evaluation import evaluate, normalise_answer
from models.training.features import ExampleDataset, FeatureCache, precompute
from models.training.throughput import pt_throughput
from models.training.trainer import run_stage, train

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 190, 30)}
SPAN = "[IMG0][IMG1][IMG2][IMG3]"  # the tiny profile's image signal span


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models run many small ops: one thread is much faster than two contended ones
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shapes on white: PT pairs (image -> caption, caption -> signal span) and IT conversations."""
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    pt, it = [], []
    for name, rgb in COLOURS.items():
        for shape in ("circle", "square"):
            image = Image.new("RGB", (32, 32), "white")
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)([6, 6, 26, 26], fill=rgb)
            file = f"img/{name}-{shape}.png"
            image.save(root / file)
            pt.append({"messages": [{"role": "user", "content": "<image>\nDescribe the image."},
                                    {"role": "assistant", "content": f"a {name} {shape}"}], "images": [file]})
            pt.append({"messages": [{"role": "user", "content": f"Draw a {name} {shape}."},
                                    {"role": "assistant", "content": SPAN}],
                       "captions": {"image": [f"a {name} {shape}"]}})
            it.append({"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "<image>\nWhat colour is it?"},
                                    {"role": "assistant", "content": name},
                                    {"role": "user", "content": "And the shape?"},
                                    {"role": "assistant", "content": shape}], "images": [file]})
    return {"root": root, "pt": _write(root / "pt.jsonl", pt), "it": _write(root / "it.jsonl", it)}


@pytest.fixture
def mm(tiny_profile):
    torch.manual_seed(0)
    return MMLLM.from_profile(tiny_profile, require_trained=False)


# --- data -----------------------------------------------------------------------------------------


def test_only_assistant_tokens_carry_loss(tiny_backbone, data):
    record = read_manifest(data["it"])[0]
    ids, labels = tokenize(record, tiny_backbone)
    assert len(ids) == len(labels)
    decode = tiny_backbone.tokenizer.decode
    # contiguous labelled spans: exactly the two answers, each with its end-of-turn token
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(decode(current))
            current = []
    assert spans == ["red<|im_end|>", "circle<|im_end|>"]
    unlabelled = decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert "Be brief." in unlabelled and "What colour is it?" in unlabelled and "red" not in unlabelled


BAD_LINES = {
    "bad json": ('{"messages": [', "not valid JSON"),
    "missing messages": ({"images": []}, "missing key 'messages'"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
                     "unknown role 'robot'"),
    "placeholder count": ({"messages": [{"role": "user", "content": "<image><image> two?"},
                                        {"role": "assistant", "content": "x"}], "images": ["img/red-circle.png"]},
                          "2 <image> placeholder"),
    "missing media": ({"messages": [{"role": "user", "content": "<image> what?"},
                                    {"role": "assistant", "content": "x"}], "images": ["img/nope.png"]},
                      "'img/nope.png' does not exist"),
    "captions without spans": ({"messages": [{"role": "user", "content": "draw"},
                                             {"role": "assistant", "content": "no"}], "captions": {"image": ["a"]}},
                               "1 image caption(s) but 0"),
    "no assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_manifest_line_is_named_by_file_and_line(data, case):
    line, problem = BAD_LINES[case]
    good = json.loads(data["pt"].read_text().splitlines()[0])
    path = _write(data["root"] / f"bad-{case.replace(' ', '-')}.jsonl", [good, line])
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}:2: .*{re.escape(problem)}"):
        read_manifest(path)


def test_an_incomplete_signal_span_is_named_by_file_and_line(tiny_backbone, data):
    path = _write(data["root"] / "half-span.jsonl", [
        {"messages": [{"role": "user", "content": "draw"}, {"role": "assistant", "content": "[IMG0][IMG1]"}],
         "captions": {"image": ["a red circle"]}}])
    record = read_manifest(path)[0]
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))}:1: .*0 complete signal span"):
        tokenize(record, tiny_backbone)


def test_easy_vqa_manifest(tmp_path):
    easy_vqa = pytest.importorskip("easy_vqa")
    from models.training import easy_vqa_manifest

    records = read_manifest(easy_vqa_manifest("test", tmp_path, limit=3))
    assert len(records) == 3
    for record in records:
        assert record.media["image"][0].is_file()
        assert record.messages[-1]["content"] in easy_vqa.get_answers()


def test_easy_vqa_conversations_ask_each_question_once_about_one_image(tmp_path):
    easy_vqa = pytest.importorskip("easy_vqa")
    from models.training import easy_vqa_manifest

    limit = 60
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    records = read_manifest(easy_vqa_manifest("test", tmp_path, limit=limit, per_image=4))
    asked = []
    for record in records:
        users = [m["content"] for m in record.messages if m["role"] == "user"]
        replies = [m["content"] for m in record.messages if m["role"] == "assistant"]
        assert 1 <= len(users) <= 4 and len(replies) == len(users) and len(record.media["image"]) == 1
        assert users[0].startswith("<image>\n") and not any("<image>" in u for u in users[1:])
        asked += [(str(record.media["image"][0]), u.removeprefix("<image>\n"), a) for u, a in zip(users, replies)]
    expected = [(str(Path(paths[i]).resolve()), f"{q[:1].upper()}{q[1:]} Answer with one word.", a)
                for q, a, i in zip(questions[:limit], answers[:limit], image_ids[:limit])]
    assert sorted(asked) == sorted(expected)  # each question once, in a conversation about its own image
    assert len(records) < limit


def test_balanced_yes_no_questions_cannot_be_answered_from_the_question_alone(tmp_path):
    pytest.importorskip("easy_vqa")
    from models.training import easy_vqa_manifest
    from models.training.shape_judge import COLORS

    def answers(manifest):
        kinds, other = {}, 0
        for record in read_manifest(manifest):
            question, answer = record.messages[0]["content"].lower(), record.messages[1]["content"]
            if answer not in ("yes", "no"):
                other += 1
                continue
            words = set(question.replace("?", " ").split())
            kind = (bool(words & set(COLORS)), bool(words & {"no", "not"}))
            kinds.setdefault(kind, {"yes": 0, "no": 0})[answer] += 1
        return kinds, other

    skewed, open_questions = answers(easy_vqa_manifest("test", tmp_path, limit=2000))
    balanced, kept_open = answers(easy_vqa_manifest("test", tmp_path, limit=2000, balance_yes_no=True))
    assert kept_open == open_questions and len(balanced) == 4  # colour/shape x asking/denying
    assert all(c["yes"] != c["no"] for c in skewed.values())
    for kind, count in balanced.items():
        assert count["yes"] == count["no"] == min(skewed[kind].values())


def test_reasoned_yes_no_answers_name_what_the_image_shows_then_compare(tmp_path):
    easy_vqa = pytest.importorskip("easy_vqa")
    from models.training import easy_vqa_manifest
    from models.training.data import easy_vqa_shapes, yes_no_kind

    facts = {path: (colour, shape) for path, colour, shape in easy_vqa_shapes("train")}
    plain = read_manifest(easy_vqa_manifest("train", tmp_path, limit=400))
    reasoned = read_manifest(easy_vqa_manifest("train", tmp_path, limit=400, reason_yes_no=True))
    checked = 0
    for record in reasoned:
        question, answer = record.messages[0]["content"], record.messages[1]["content"]
        if not question.endswith("Say what you see, then answer yes or no."):
            assert answer not in ("yes", "no")
            continue
        # "Blue is not red, so no.": the image's colour (or shape), the question's, and the answer
        seen, verb, asked, reply = re.fullmatch(r"(\w+) (is|is not) (\w+), so (yes|no)\.", answer).groups()
        about_colour, denies = yes_no_kind(question)
        assert asked in question.lower() and (verb == "is") == (seen.lower() == asked)
        assert (reply == "yes") == ((verb == "is") != denies)
        path = str(record.media["image"][0])
        if path in facts:
            colour, shape = facts[path]
            assert seen.lower() == (colour if about_colour else shape)
            checked += 1
    assert checked > 100
    assert sorted(r.messages[1]["content"] for r in plain if r.messages[1]["content"] not in ("yes", "no")) == \
        sorted(r.messages[1]["content"] for r in reasoned if not r.messages[1]["content"].endswith("."))
    test = read_manifest(easy_vqa_manifest("test", tmp_path, limit=50, reason_yes_no=True))
    assert len(test) == 50 and {r.messages[1]["content"] for r in test} <= set(easy_vqa.get_answers())


def test_answers_match_whole_or_by_the_last_word():
    from models.training.evaluation import answers_match

    assert answers_match("Circle.", "circle") and not answers_match("It is a circle.", "circle")
    assert answers_match("It is blue. No.", "no", last_word=True)
    assert not answers_match("It is blue. No.", "yes", last_word=True)
    assert not answers_match("", "no", last_word=True)


def test_the_seeing_breakdown_counts_the_rarer_yes_no_answers():
    from agent.proofs.seeing import by_kind

    rows = [("What color is it?", "red", True), ("What shape is it?", "circle", False),
            ("Is there a red shape?", "no", True), ("Is there a red shape?", "yes", False),
            ("Is there not a circle?", "no", True), ("Is no blue shape present?", "yes", True)]
    kinds = by_kind([{"question": f"<image>\n{q} Answer with one word.", "expected": e, "correct": c}
                     for q, e, c in rows])
    assert kinds["colour"] == {"right": 1, "of": 1, "accuracy": 1.0}
    assert kinds["shape"]["right"] == 0 and kinds["yes/no"] == {"right": 3, "of": 4, "accuracy": 0.75}
    assert kinds["yes/no, the rarer answer"] == {"right": 1, "of": 2, "accuracy": 0.5}


def test_the_seeing_proof_adapts_every_linear_layer_of_the_backbone(tmp_path, tiny_backbone):
    from agent.proofs.seeing import SEEING_LORA, seeing_profile
    from models.profiles import load_profile
    from models.specs import LoraSpec

    spec = load_profile(seeing_profile(tmp_path, SEEING_LORA)).backbone.lora
    assert spec == LoraSpec(**SEEING_LORA)
    assert seeing_profile(tmp_path, None) == "local-untrained"
    tiny_backbone.freeze()
    tiny_backbone.enable_lora(spec)
    layer = tiny_backbone.model.get_base_model().model.layers[0]
    adapted = {name.split(".lora_A")[0].split(".")[-1] for name, _ in layer.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# --- the feature cache ----------------------------------------------------------------------------


def test_the_feature_cache_is_hit_on_the_second_pass(mm, data, tmp_path):
    records = read_manifest(data["pt"])
    encoder = mm.encoder("image")
    calls = []
    original = encoder.encode
    encoder.encode = lambda images: calls.append(len(images)) or original(images)
    cache = FeatureCache(tmp_path / "cache", mm.profile)
    first = precompute(mm, records, cache, progress=False)
    assert (first.computed, first.cached, sum(calls)) == (6, 0, 6)
    assert first.targets_computed == 6
    calls.clear()
    second = precompute(mm, records, cache, progress=False)
    assert (second.computed, second.cached, second.targets_cached) == (0, 6, 6)
    examples = ExampleDataset(records, mm, cache).__getitems__(list(range(len(records))))
    assert calls == []  # neither precompute nor the dataset ran the encoder again
    live = ExampleDataset(records, mm, None).__getitems__([0])[0]
    assert sum(calls) == 1  # without a cache, the encoder runs
    assert torch.equal(examples[0].features["image"][0], live.features["image"][0])
    assert torch.equal(examples[1].targets["image"][0]["prompt_embeds"], ExampleDataset(
        records, mm, None).__getitems__([1])[0].targets["image"][0]["prompt_embeds"])


# --- stages ---------------------------------------------------------------------------------------


def _frozen_snapshot(mm):
    snap = {f"encoder.{k}": v.clone() for k, v in mm.encoder("image").state_dict().items()}
    for name, p in mm.backbone.model.named_parameters():
        if "lora_" not in name and "trainable_tokens" not in name:
            snap[f"backbone.{name}"] = p.detach().clone()
    pipeline = mm.generator("image").pipeline
    for part in ("unet", "vae", "text_encoder"):
        snap |= {f"{part}.{k}": v.clone() for k, v in getattr(pipeline, part).state_dict().items()}
    return snap


def _first_last(stage_dir, key):
    rows = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if r.get(key) is not None]
    return values[0], values[-1]


def test_pt_trains_projectors_keeps_frozen_parts_bit_identical_and_round_trips(mm, data, tmp_path, tiny_profile):
    records = read_manifest(data["pt"])
    mm.output_projector("image")  # loads the generator, so it is in the snapshot
    before = _frozen_snapshot(mm)
    embed = mm.backbone.input_embeddings().weight
    new = mm.backbone.new_token_ids
    old_rows = [i for i in range(embed.shape[0]) if i not in new]
    rows_before = embed.detach().clone()

    stage = StageSpec(name="pt", steps=30, batch_size=4, lr=3e-3, log_every=5, checkpoint_every=None)
    result = run_stage(mm, stage, tmp_path / "pt", records=records, cache=FeatureCache(tmp_path / "c", mm.profile),
                       progress=False)
    first, last = _first_last(tmp_path / "pt", "text")
    assert last < first - 0.2  # the input projector learns to describe images
    first, last = _first_last(tmp_path / "pt", "alignment")
    assert last < 0.7 * first  # the output projector aligns with the SD text encoder's output
    assert (tmp_path / "pt" / "loss.png").stat().st_size > 1000
    assert result.counts["backbone (base weights)"][0] == 0

    after = _frozen_snapshot(mm)
    changed = [k for k in before if not torch.equal(before[k], after[k]) and "embed_tokens" not in k]
    assert changed == []
    weight = mm.backbone.input_embeddings().weight.detach()
    assert torch.equal(weight[old_rows], rows_before[old_rows])  # only the new tokens' rows moved
    assert not torch.equal(weight[new], rows_before[new])

    # the saved result is what a profile loads: same projected features, same logits
    again = MMLLM.from_profile(tiny_profile.model_copy(update={"projector_weights": str(result.weights)}))
    example = ExampleDataset(records, mm).__getitems__([0, 1])
    feats = example[0].features["image"]
    assert torch.equal(mm.project("image", feats)[0], again.project("image", feats)[0])

    def logits(model):
        items = [model.backbone.splice(ex.input_ids, {m: model.project(m, f) for m, f in ex.features.items()})
                 for ex in example]
        with torch.no_grad():
            return model.backbone(model.backbone.collate(items)).logits

    assert torch.equal(logits(mm), logits(again))
    with torch.no_grad():
        assert torch.equal(mm(example).alignment, again(example).alignment)


def test_it_trains_lora_and_keeps_the_base_weights(mm, data, tmp_path):
    records = read_manifest(data["it"])
    stage = StageSpec(name="it", steps=40, batch_size=3, lr=1e-2, schedule="constant", log_every=5,
                      checkpoint_every=None)
    plan = apply_stage(mm, stage, inputs=["image"])
    assert mm.backbone.has_lora and plan.counts["backbone.lora"][0] > 0
    plan.release()
    before = _frozen_snapshot(mm)
    lora_before = {n: p.detach().clone() for n, p in mm.backbone.model.named_parameters() if "lora_B" in n}
    run_stage(mm, stage, tmp_path / "it", records=records, progress=False)
    first, last = _first_last(tmp_path / "it", "text")
    assert last < first - 0.2  # (a random tiny LM with a frozen head cannot move far)
    after = _frozen_snapshot(mm)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    lora_after = dict(mm.backbone.model.named_parameters())
    assert all(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before)


def test_resume_continues_the_same_run(data, tmp_path):
    config = TrainConfig.from_dict({
        "profile": "tiny", "out_dir": str(tmp_path / "run"),
        "stages": [
            {"name": "pt", "data": [str(data["pt"])], "eval_data": [str(data["pt"])], "steps": 3, "batch_size": 4,
             "checkpoint_every": None},
            {"name": "it", "data": [str(data["it"])], "steps": 6, "batch_size": 2, "lr": 3e-3,
             "checkpoint_every": 3, "log_every": 1},
        ]})
    whole = train(config, progress=False)
    reference = {k: v.clone() for k, v in _load(whole.weights).items()}
    it_dir = tmp_path / "run" / "it"
    assert any("eval_loss" in line for line in (tmp_path / "run" / "pt" / "log.jsonl").read_text().splitlines())
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(config, progress=False)

    # as if the run had died after checkpoint-3
    shutil.rmtree(it_dir / "checkpoint-6")
    (it_dir / "done.json").unlink()
    (it_dir / "trained.safetensors").unlink()
    resumed = train(config, resume=True, progress=False)
    stage = resumed.stages["it"]
    assert stage.resumed_from == 3 and stage.steps == 6
    steps = [json.loads(line)["step"] for line in (it_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    got = _load(resumed.weights)
    assert got.keys() == reference.keys()
    # IT's data has no captions, yet its result still holds PT's output projector
    assert any(k.startswith("output_projectors.image.") for k in got)
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    # and the written profile loads the result
    from models.profiles import load_profile

    assert load_profile(str(resumed.profile)).projector_weights == str(tmp_path / "run" / "trained.safetensors")


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# --- config, evaluation, throughput -----------------------------------------------------------------


def test_train_config_yaml_resolves_paths_and_stage_defaults(tmp_path):
    (tmp_path / "train.yaml").write_text(
        "profile: tiny\nout_dir: runs/x\nstages:\n  - {name: pt, data: [pt.jsonl], steps: 5}\n"
        "  - {name: it, data: [it.jsonl], train: {output_projectors: false}}\n")
    config = TrainConfig.from_yaml(tmp_path / "train.yaml")
    pt, it = config.stages
    assert config.out_dir == str(tmp_path / "runs/x") and pt.data == [str(tmp_path / "pt.jsonl")]
    assert (pt.train.backbone, pt.lr, it.train.backbone, it.lr) == ("frozen", 1e-3, "lora", 2e-4)
    assert it.train.output_projectors is False and it.train.input_projectors is True
    assert it.epochs == 1.0
    (tmp_path / "bad.yaml").write_text("out_dir: x\nstages:\n  - {name: pt, data: [a], steps: 5, epochs: 1}\n")
    with pytest.raises(ConfigError, match="either steps or epochs"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")


def test_evaluate_seeing_and_blind(mm, data):
    records = read_manifest(data["pt"])[:4:2]  # two image -> caption lines
    seeing = evaluate(mm, records, max_new_tokens=3, progress=False)
    blind = evaluate(mm, records, blind=True, max_new_tokens=3, progress=False)
    assert (seeing.total, blind.total) == (2, 2) and 0 <= seeing.accuracy <= 1
    assert all("<image>" not in p["question"] for p in blind.predictions)
    assert normalise_answer(" The Red circle.") == normalise_answer("red circle") == "red circle"


def test_pt_throughput_measures_both_ways(mm, data, tmp_path):
    records = read_manifest(data["pt"])
    result = pt_throughput(mm, records, tmp_path / "cache", batch_size=4, batches=1)
    assert result.cached > 0 and result.encoder_in_loop > 0 and result.ratio > 0


def test_length_grouped_batches_cover_each_example_once_and_pad_less():
    from models.training.trainer import Batches

    lengths = [10 if i % 3 else 300 for i in range(200)]  # short VQA lines mixed with long tool prompts
    grouped = list(Batches(200, 8, seed=1, start=0, stop=25, lengths=lengths))
    plain = list(Batches(200, 8, seed=1, start=0, stop=25))
    assert sorted(i for batch in grouped for i in batch) == list(range(200))
    assert grouped == list(Batches(200, 8, seed=1, start=0, stop=25, lengths=lengths))  # deterministic
    resumed = list(Batches(200, 8, seed=1, start=10, stop=25, lengths=lengths))
    assert resumed == grouped[10:]

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.6 * padded(plain)
