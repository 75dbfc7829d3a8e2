"""A tiny CLIP vision tower with its image processor, saved the way real CLIP checkpoints are."""

from __future__ import annotations

from pathlib import Path

import torch


def build_clip_vision(dest: Path) -> None:
    """`dest` holds a CLIPVisionModel (hidden 32, 32x32 images, 8x8 patches: 16 patches + CLS)."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=32,
    )
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(dest)
    # CLIP's own normalisation at the tiny input size; the PIL backend needs no torchvision, and it
    # saves the same preprocessor_config.json (type CLIPImageProcessor) as real checkpoints
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(dest)
