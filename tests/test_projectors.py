import pytest
import torch

from models.errors import ConfigError
from models.input_projectors import Resampler, build_input_projector, projected_length
from models.output_projectors import OutputProjector, alignment_loss
from models.specs import OutputProjectorSpec


@pytest.mark.parametrize("kind, layers", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_token_wise_projectors_keep_length(kind, layers):
    projector = build_input_projector(kind, 48, 64)
    out = projector(torch.randn(2, 7, 48))
    assert out.shape == (2, 7, 64)
    assert projected_length(projector, 7) == 7
    assert sum(isinstance(m, torch.nn.Linear) for m in projector.modules()) == layers


def test_resampler_output_length_is_its_query_count():
    projector = build_input_projector("resampler:6", 48, 64)
    assert isinstance(projector, Resampler)
    for length in (3, 50):
        assert projector(torch.randn(2, length, 48)).shape == (2, 6, 64)
    assert projected_length(projector, 50) == 6
    assert build_input_projector("resampler", 48, 64).num_queries == 32


@pytest.mark.parametrize("kind", ["conv", "mlp0x_gelu", "resampler:0", "mlp2x_relu"])
def test_unknown_projector_strings_are_config_errors(kind):
    with pytest.raises(ConfigError):
        build_input_projector(kind, 8, 8)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_output_projector_maps_signal_states_to_every_conditioning(kind):
    shapes = {"prompt_embeds": (77, 32), "generated_prompt_embeds": (8, 16)}
    projector = OutputProjector(OutputProjectorSpec(type=kind, hidden=32, layers=1, heads=4), 64, 4, shapes)
    out = projector(torch.randn(3, 4, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"prompt_embeds": (3, 77, 32),
                                                           "generated_prompt_embeds": (3, 8, 16)}
    with pytest.raises(ValueError):
        projector(torch.randn(3, 5, 64))


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_output_projector_learns_the_alignment_target(kind):
    torch.manual_seed(0)
    projector = OutputProjector(OutputProjectorSpec(type=kind, hidden=32, layers=1, heads=2), 16, 2, {"c": (5, 8)})
    states, target = torch.randn(8, 2, 16), {"c": torch.randn(8, 5, 8)}
    optimizer = torch.optim.Adam(projector.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = alignment_loss(projector(states), target)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first
