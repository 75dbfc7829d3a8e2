"""A small CNN that names the colour and shape in an easy-vqa style image: the drawing proof's judge.

Trained on easy-vqa's train images (at the generator's resolution), checked on its test images;
a drawing counts as right when the judge reads back the colour and shape that were asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


class ShapeJudge(nn.Module):
    def __init__(self, image_size: int = 32):
        super().__init__()
        self.image_size = image_size

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.color = nn.Linear(64, len(COLORS))
        self.shape = nn.Linear(64, len(SHAPES))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels in [-1, 1], (B, 3, S, S) -> (colour logits, shape logits)."""
        h = self.features(pixels)
        return self.color(h), self.shape(h)

    def pixels(self, images) -> torch.Tensor:
        from models.training.image_generator import pixels

        return pixels(images, self.image_size)

    @torch.no_grad()
    def judge(self, images) -> list[tuple[str, str]]:
        """(colour, shape) for each PIL image or image path."""
        self.eval()
        color, shape = self(self.pixels(images))
        return [(COLORS[c], SHAPES[s]) for c, s in zip(color.argmax(1).tolist(), shape.argmax(1).tolist())]


def train_judge(examples: list[tuple[str, str, str]], *, steps: int = 1500, batch_size: int = 64,
                image_size: int = 32, seed: int = 0, progress: bool = True) -> ShapeJudge:
    """Train on (image path, colour, shape) triples."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    judge = ShapeJudge(image_size)
    pixels = judge.pixels([p for p, _, _ in examples])
    colors = torch.tensor([COLORS.index(c) for _, c, _ in examples])
    shapes = torch.tensor([SHAPES.index(s) for _, _, s in examples])
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    judge.train()
    for _ in tqdm(range(steps), desc="judge", disable=not progress):
        index = torch.randint(len(pixels), (batch_size,))
        batch = pixels[index]
        batch = torch.where(torch.rand(len(index), 1, 1, 1) < 0.5, batch.flip(3), batch)  # mirror: same label
        color, shape = judge(batch)
        loss = nn.functional.cross_entropy(color, colors[index]) + nn.functional.cross_entropy(shape, shapes[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return judge.eval()


def judge_accuracy(judge: ShapeJudge, examples: list[tuple[str, str, str]]) -> float:
    """Fraction of (image path, colour, shape) triples read back exactly."""
    seen = judge.judge([p for p, _, _ in examples])
    return sum(s == (c, sh) for s, (_, c, sh) in zip(seen, examples)) / max(len(examples), 1)


def save_judge(judge: ShapeJudge, path: Path) -> None:
    torch.save({"image_size": judge.image_size, "state": judge.state_dict()}, path)


def load_judge(path: Path) -> ShapeJudge:
    saved = torch.load(path, weights_only=True)
    judge = ShapeJudge(saved["image_size"])
    judge.load_state_dict(saved["state"])
    return judge.eval()
