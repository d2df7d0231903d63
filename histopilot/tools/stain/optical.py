"""Optical density and stain separation on batches of RGB pixels, as torch tensors.

Brightfield stains absorb light multiplicatively, so in optical density (OD = −log(I / I₀)) a
pixel is a non-negative mix of a few stain colour vectors: OD = C · Sᵀ, with S the stain matrix
(one unit OD vector per stain) and C the concentrations. Normalization, augmentation and the
hematoxylin-channel metrics all work in this space.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from skimage.color import rgb_from_hed

# Transmitted light: Macenko et al. (2009) take 240 for a bright-field background.
LIGHT = 240.0
# A pixel is tissue when every channel absorbs at least this much (Macenko's β).
TISSUE_OD = 0.15
STAINS = ("hematoxylin", "eosin", "dab")
# Ruifrok & Johnston (2001) H, E and DAB colour vectors, one per row (as scikit-image holds them).
RUIFROK_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)

_BLOCK_PIXELS = 1 << 19  # pixels per block of work in map_pixels (about 6 MB of float RGB)
_ANGLE_BINS = 4096  # angle percentiles by histogram: 0.09° resolution, batched on any device


def pixels_of(images: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) as float (B, H·W, 3) on ``device``."""
    tensor = torch.as_tensor(images).to(device)
    return tensor.reshape(tensor.shape[0], -1, 3).float()


def optical_density(pixels: torch.Tensor, light: float = LIGHT) -> torch.Tensor:
    """OD of 0–255 pixel values; the +1 keeps black pixels finite."""
    return -torch.log((pixels + 1.0) / light)


def from_optical_density(od: torch.Tensor, light: float = LIGHT) -> torch.Tensor:
    """0–255 pixel values of ``od`` (the inverse of :func:`optical_density`), clipped."""
    return (light * torch.exp(-od) - 1.0).clamp(0.0, 255.0)


def tissue_pixels(od: torch.Tensor, threshold: float = TISSUE_OD) -> torch.Tensor:
    """True where every channel absorbs: stained tissue, not glass or pale, one-colour ink."""
    return (od >= threshold).all(dim=-1)


def concentrations(od: torch.Tensor, stain_matrix: torch.Tensor) -> torch.Tensor:
    """Least-squares stain concentrations (B, N, k) of ``od`` (B, N, 3) for S (B, 3, k)."""
    return od @ torch.linalg.pinv(stain_matrix).transpose(1, 2)


def separate_stains(
    images: np.ndarray | torch.Tensor,
    stain_matrix: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Stain concentrations (B, H, W, k) of uint8 RGB images (B, H, W, 3).

    ``stain_matrix`` is (3, k) or per image (B, 3, k), e.g. a fitted normalizer's; by default
    the Ruifrok–Johnston hematoxylin, eosin and DAB vectors. Values are OD units, clipped at 0.
    """
    batch, height, width = images.shape[:3]
    od = optical_density(pixels_of(images, device), light=255.0)
    matrix = RUIFROK_HED.T if stain_matrix is None else stain_matrix
    matrix = matrix.to(od).expand(batch, 3, matrix.shape[-1])
    return concentrations(od, matrix).clamp_min(0).reshape(batch, height, width, -1)


def masked_angle_percentiles(
    angles: torch.Tensor, mask: torch.Tensor, percents: tuple[float, ...]
) -> torch.Tensor:
    """Per-image percentiles (B, len(percents)) of angles in [−π, π] over the masked pixels.

    A histogram replaces a sort: each image has its own number of tissue pixels, which a
    batched sort or k-th value cannot express, and a histogram is one scatter on any device.
    Images without masked pixels get NaN.
    """
    bins = ((angles + math.pi) / (2 * math.pi) * _ANGLE_BINS).long().clamp(0, _ANGLE_BINS - 1)
    counts = torch.zeros(angles.shape[0], _ANGLE_BINS, device=angles.device)
    counts.scatter_add_(1, bins, mask.float())
    cumulative = counts.cumsum(1)
    total = cumulative[:, -1:]
    # The same rank as the classical implementation's k-th value: 1 + round(q·(n − 1)).
    ranks = torch.stack([1 + torch.round(p / 100 * (total[:, 0] - 1)) for p in percents], 1)
    found = torch.searchsorted(cumulative.contiguous(), ranks.contiguous())
    values = (found.float() + 0.5) / _ANGLE_BINS * 2 * math.pi - math.pi
    return torch.where(total > 0, values, torch.full_like(values, math.nan))


def percentile(values: torch.Tensor, percent: float) -> torch.Tensor:
    """The ``percent`` percentile of each row of ``values`` (..., N): the k-th value with
    k = 1 + round(p·(N − 1)), found as the smallest of the top N − k + 1 (a partial sort,
    about twice as fast as a k-th value search for the high percentiles used here)."""
    count = values.shape[-1]
    rank = 1 + round(percent / 100 * (count - 1))
    if rank > count // 2:
        return values.topk(count - rank + 1, dim=-1).values[..., -1]
    return values.topk(rank, dim=-1, largest=False).values[..., -1]


def map_pixels(
    pixels: torch.Tensor, transform: Callable[[torch.Tensor, slice], torch.Tensor]
) -> torch.Tensor:
    """Apply ``transform`` to uint8 pixels (B, N, 3) block by block; uint8 comes back.

    ``transform`` gets float 0–255 pixels of some images (B', N', 3) and the slice of the batch
    they come from, for indexing per-image parameters. Blocks small enough to stay in the CPU
    cache make per-pixel arithmetic several times faster than whole-batch tensor expressions,
    which are limited by memory bandwidth.
    """
    output = torch.empty_like(pixels)
    per_block = min(pixels.shape[1], _BLOCK_PIXELS)
    images_per_block = max(1, _BLOCK_PIXELS // pixels.shape[1])
    for first in range(0, pixels.shape[0], images_per_block):
        images = slice(first, first + images_per_block)
        for start in range(0, pixels.shape[1], per_block):
            part = slice(start, start + per_block)
            output[images, part] = transform(pixels[images, part].float(), images).round_()
    return output
