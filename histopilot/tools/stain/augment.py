"""Stain augmentation for training: random, seeded changes of stain amount and colour.

* ``hed``: scale and shift each Ruifrok–Johnston channel (hematoxylin, eosin, DAB) by a random
  factor and offset per image, the augmentation Tellez et al. (2018) found most useful for
  generalising across centres.
* ``macenko``: the same in each image's own Macenko stain space, which follows the tile's actual
  stain colours; tiles without a usable two-stain estimate come back unchanged, flagged.

Offsets fade out on glass (weighted by how much more a pixel absorbs than the image's brightest
pixels), so the background keeps its colour instead of taking a tint no scanner produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from histopilot.errors import StainError
from histopilot.tools.stain.estimate import macenko_matrix, usable
from histopilot.tools.stain.normalizer import (
    MIN_TISSUE,
    PEN_LIMIT,
    StainBatch,
    as_input_type,
    estimation_sample,
    matrix_flags,
    screen,
)
from histopilot.tools.stain.optical import (
    RUIFROK_HED,
    from_optical_density,
    map_pixels,
    optical_density,
    percentile,
)

AugmentMethod = Literal["hed", "macenko"]
_GLASS_FADE = 0.45  # total OD above the glass (three channels) where offsets reach full strength
_GLASS_PERCENT = 2.0  # the glass level: this percentile of a tile's total OD


@dataclass(frozen=True)
class Jitter:
    """How far each stain may move: factors in [1 − scale, 1 + scale], offsets in ±shift."""

    scale: float = 0.05
    shift: float = 0.05

    def draw(self, images: int, stains: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not (0 <= self.scale < 1 and 0 <= self.shift < 1):
            raise StainError("stain jitter scale and shift must lie in [0, 1)")
        generator = torch.Generator().manual_seed(seed)
        factors = 1 + (torch.rand(images, stains, generator=generator) * 2 - 1) * self.scale
        offsets = (torch.rand(images, stains, generator=generator) * 2 - 1) * self.shift
        return factors, offsets


def augment_stains(
    images: np.ndarray | torch.Tensor,
    method: AugmentMethod = "hed",
    *,
    seed: int = 0,
    jitter: Jitter | None = None,
    device: str | torch.device = "cpu",
) -> StainBatch:
    """Randomly re-stain uint8 RGB images (B, H, W, 3); the same seed gives the same result."""
    if method not in ("hed", "macenko"):
        raise StainError(f"unknown augmentation {method!r}; choose hed or macenko")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype not in (np.uint8, torch.uint8):
        raise StainError("expected a uint8 batch of RGB images (B, H, W, 3)")
    pixels = torch.as_tensor(images).to(device).reshape(images.shape[0], -1, 3)
    jitter = jitter or Jitter()
    if method == "hed":
        stains = RUIFROK_HED.to(device).T.expand(len(pixels), 3, 3)
        flags = ["augmented"] * len(pixels)
    else:
        screened = screen(estimation_sample(pixels), min_tissue=MIN_TISSUE, pen_limit=PEN_LIMIT)
        estimated = macenko_matrix(screened.od, screened.tissue)
        problems = matrix_flags(estimated)
        flags = [
            first or second or "augmented"
            for first, second in zip(screened.flags, problems, strict=True)
        ]
        stains = usable(estimated)
    factors, offsets = (draw.to(device) for draw in jitter.draw(*stains.shape[::2], seed))
    unmix = torch.linalg.pinv(stains).transpose(1, 2)
    # od' = od + (C·(factor − 1) + offset·fade) Sᵀ with C = od·unmix: linear plus a faded shift.
    linear = torch.eye(3, device=device) + (unmix * (factors - 1).unsqueeze(1)) @ stains.mT
    shift = (offsets.unsqueeze(1) @ stains.mT).squeeze(1)
    glass = percentile(optical_density(estimation_sample(pixels)).sum(-1), _GLASS_PERCENT)

    def restain(chunk: torch.Tensor, images: slice) -> torch.Tensor:
        od = optical_density(chunk)
        fade = ((od.sum(-1, keepdim=True) - glass[images, None, None]) / _GLASS_FADE).clamp(0, 1)
        moved = od @ linear[images] + fade * shift[images].unsqueeze(1)
        return from_optical_density(moved)

    output = map_pixels(pixels, restain)
    keep = [index for index, flag in enumerate(flags) if flag != "augmented"]
    output[keep] = pixels[keep]
    return StainBatch(as_input_type(images, output), flags)
