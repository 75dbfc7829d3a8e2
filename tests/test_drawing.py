"""The drawing proof's parts: easy-vqa captions, the small generator trainer, the judge, the data."""

from pathlib import Path

import torch

from models.training.data import easy_vqa_shapes, read_manifest
from models.training.shape_judge import COLORS, SHAPES, judge_accuracy, load_judge, save_judge, train_judge


def test_easy_vqa_captions_come_from_questions_and_answers():
    shapes = easy_vqa_shapes("train")
    by_name = {Path(p).name: (c, s) for p, c, s in shapes}
    # read off the images: 0.png is a blue rectangle, 1.png a blue triangle, 4.png a red circle
    assert by_name["0.png"] == ("blue", "rectangle")
    assert by_name["1.png"] == ("blue", "triangle")
    assert by_name["4.png"] == ("red", "circle")
    assert {(c, s) for _, c, s in shapes} == {(c, s) for c in COLORS for s in SHAPES}
    assert len(shapes) > 3000 and len(easy_vqa_shapes("test")) > 700


def test_the_judge_learns_colour_and_shape_and_round_trips(tmp_path):
    train, test = easy_vqa_shapes("train")[:600], easy_vqa_shapes("test")[:150]
    judge = train_judge(train, steps=80, progress=False)
    assert judge_accuracy(judge, test) > 0.5  # chance is 1/24
    save_judge(judge, tmp_path / "judge.pt")
    again = load_judge(tmp_path / "judge.pt")
    pixels = judge.pixels([__import__("PIL.Image", fromlist=["Image"]).open(p) for p, _, _ in test[:4]])
    assert all(torch.equal(a, b) for a, b in zip(judge(pixels), again(pixels)))


def test_the_generator_trainer_writes_a_stable_diffusion_pipeline(tmp_path):
    from models.generators import build_image_generator
    from models.specs import ImageGeneratorSpec
    from models.training.image_generator import GeneratorTraining, train_image_generator

    pairs = [(p, f"a {c} {s}") for p, c, s in easy_vqa_shapes("train")[:16]]
    cfg = GeneratorTraining(image_size=16, vae_steps=3, unet_steps=3, batch_size=4, sample_steps=2)
    folder = train_image_generator(pairs, tmp_path, cfg, progress=False)
    for stage in ("vae", "unet"):
        assert (tmp_path / stage / "loss.png").is_file()
        assert (tmp_path / stage / "log.jsonl").read_text().strip()
    generator = build_image_generator(ImageGeneratorSpec(source=str(folder), steps=2, guidance=cfg.guidance,
                                                         device="cpu"))
    assert generator.conditioning_shapes() == {"prompt_embeds": (cfg.caption_tokens, 64)}
    images = generator.generate(generator.text_conditioning(["a red circle", "a blue square"]))
    assert [im.size for im in images] == [(16, 16), (16, 16)]
    scale = generator.pipeline.vae.config.scaling_factor
    assert scale != 0.18215  # latents rescaled to unit variance for this VAE, not SD's constant


def test_drawing_manifests_are_valid_and_pair_each_span_with_its_caption(tmp_path):
    from agent.proofs.drawing import SIGNAL, _manifests

    pt, it = _manifests(tmp_path, 48, seed=0)
    pt_records, it_records = read_manifest(pt), read_manifest(it)
    assert len(pt_records) == len(it_records) == 48
    for record in pt_records:
        assert record.messages[-1]["content"] == SIGNAL
        colour, shape = record.captions["image"][0].split()[1:]
        assert colour in record.messages[0]["content"] and shape in record.messages[0]["content"]
    plain = [r for r in it_records if not r.captions]
    assert plain and all(SIGNAL not in r.messages[-1]["content"] for r in plain)
