"""The joint training run's glue: merging the two PT results, and keeping drawings of shapes off the tool."""

import torch
from safetensors.torch import load_file, save_file


def test_merged_pt_weights_take_each_part_from_the_run_that_trained_it(tmp_path):
    from agent.proofs.joint import merge_pt

    new_ids, signal_ids = [100, 101, 102, 103], [102, 103]
    seeing = {"input_projectors.image.w": torch.ones(2), "output_projectors.image.w": torch.zeros(2),
              "backbone.new_token_embeddings": torch.full((4, 3), 1.0)}
    drawing = {"output_projectors.image.w": torch.full((2,), 5.0),
               "backbone.new_token_embeddings": torch.full((4, 3), 2.0)}
    save_file(seeing, str(tmp_path / "a.safetensors"))
    save_file(drawing, str(tmp_path / "b.safetensors"))
    merged = load_file(str(merge_pt(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                                    tmp_path / "m.safetensors", new_ids, signal_ids)))
    assert torch.equal(merged["input_projectors.image.w"], torch.ones(2))
    assert torch.equal(merged["output_projectors.image.w"], torch.full((2,), 5.0))
    rows = merged["backbone.new_token_embeddings"]
    assert rows[:2].eq(1.0).all() and rows[2:].eq(2.0).all()  # signal-token rows from drawing PT


def test_shape_drawings_are_not_tool_requests():
    from agent.proofs.tool_requests import own_drawing

    assert own_drawing("Sketch a red circle.")
    assert not own_drawing("Sketch a lighthouse in fog.")
