"""A small convolutional tile classifier: the model a counterfactual is asked to change.

It sees the same [−1, 1] pixels the diffusion model produces and is differentiable end to end,
so its gradient can guide sampling. Trained by :func:`train_classifier` on labelled tiles; a
second one trained with another seed and width serves as the independent check of a flip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from histopilot.errors import DiffusionError
from histopilot.storage import atomic_directory

CONFIG_FILE = "classifier.json"
WEIGHTS_FILE = "classifier.safetensors"


class ClassifierCard(BaseModel):
    classes: list[str] = Field(min_length=2)
    width: int = Field(gt=0)
    image_size: int = Field(gt=0)


class TileClassifier(nn.Module):
    """Four strided convolutions, global pooling and a linear layer over ``classes``."""

    def __init__(self, classes: list[str], *, width: int = 16, image_size: int = 32) -> None:
        super().__init__()
        self.card = ClassifierCard(classes=classes, width=width, image_size=image_size)
        self.layers = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width * 2, width * 4, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width * 4, width * 4, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width * 4, len(classes)),
        )

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of float RGB in [−1, 1], (B, 3, H, W)."""
        return self.layers(images)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self(images).softmax(-1)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        with atomic_directory(folder) as building:
            save_file(self.state_dict(), building / WEIGHTS_FILE)
            (building / CONFIG_FILE).write_text(self.card.model_dump_json(indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "cpu") -> TileClassifier:
        folder = Path(folder)
        try:
            card = ClassifierCard.model_validate(json.loads((folder / CONFIG_FILE).read_text()))
            model = cls(card.classes, width=card.width, image_size=card.image_size)
            model.load_state_dict(load_file(folder / WEIGHTS_FILE))
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            raise DiffusionError(f"{folder}: not a saved tile classifier ({error})") from error
        return model.to(device).eval()


def as_model_input(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) → float (B, 3, H, W) in [−1, 1]."""
    return torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image turned by a random multiple of 90° and maybe mirrored: tissue has no up."""
    turned = []
    for image in images:
        turns, mirror = torch.randint(0, 4, (2,), generator=generator).tolist()
        image = torch.rot90(image, turns, dims=(-2, -1))
        turned.append(image.flip(-1) if mirror % 2 else image)
    return torch.stack(turned)


def train_classifier(
    images: np.ndarray,
    labels: list[str],
    *,
    classes: list[str] | None = None,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    width: int = 16,
    seed: int = 0,
    device: str = "cpu",
) -> TileClassifier:
    """Fit a classifier to uint8 tiles (B, H, W, 3) and their labels, seeded."""
    classes = classes or sorted(set(labels))
    if len(classes) < 2:
        raise DiffusionError("a classifier needs at least two classes")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seed the initial weights, leave the caller's RNG
        torch.manual_seed(seed)
        model = TileClassifier(classes, width=width, image_size=images.shape[1]).to(device)
    pixels = as_model_input(images, device)
    targets = torch.tensor([classes.index(label) for label in labels], device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(pixels), (min(batch_size, len(pixels)),), generator=generator)
        inputs = random_dihedral(pixels[batch], generator)
        loss = nn.functional.cross_entropy(model(inputs), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
