"""Diffusion tools: a conditional tile model, stain transfer and counterfactuals."""

from histopilot.tools.diffusion.classifier import TileClassifier, train_classifier
from histopilot.tools.diffusion.edit import (
    Counterfactual,
    Guide,
    StainTransfer,
    counterfactuals,
    reconstruct,
    transfer_stain,
)
from histopilot.tools.diffusion.model import TileDiffusion

__all__ = [
    "Counterfactual",
    "Guide",
    "StainTransfer",
    "TileClassifier",
    "TileDiffusion",
    "counterfactuals",
    "reconstruct",
    "train_classifier",
    "transfer_stain",
]
