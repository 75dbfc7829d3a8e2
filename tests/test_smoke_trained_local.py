"""The `local` profile's shipped trained weights (models/trained/local): it sees and it draws."""

import pytest

from models.mmllm import MMLLM
from models.profiles import load_profile

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def local():
    return MMLLM.from_profile(load_profile("local"))


def test_it_names_the_shape_in_easy_vqa_test_images(local):
    from models.media import load_image
    from models.training.data import easy_vqa_shapes

    items = easy_vqa_shapes("test")[:8]
    images = [load_image(path, local.profile.limits) for path, _, _ in items]
    requests = [([{"role": "user", "content": "What shape is this? Answer with one word."}], {"image": [image]})
                for image in images]
    answers = [g.text.strip().lower().rstrip(".") for g in local.generate_many(requests, max_new_tokens=4)]
    right = sum(answer == shape for answer, (_, _, shape) in zip(answers, items))
    print(f"shapes: {answers} vs {[shape for _, _, shape in items]}")
    assert right >= 6


def test_a_drawing_request_goes_through_its_signal_tokens_to_a_picture(local):
    out = local.generate([{"role": "user", "content": "Draw a red circle."}], max_new_tokens=24)
    span = next(span for span in out.spans if span.modality == "image")
    assert span.conditioning is not None, span.error
    image = local.generator("image").generate({k: v.unsqueeze(0) for k, v in span.conditioning.items()})[0]
    assert image.size == local.generator("image").default_size
