"""How close a generated tile stays to its source: SSIM, L1, LPIPS, a difference heatmap."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from histopilot.tools.stain.optical import separate_stains

# LPIPS needs ImageNet AlexNet weights; they are used only when already in the torch hub cache.
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0


def ssim(first: np.ndarray, second: np.ndarray) -> list[float]:
    """SSIM per image pair of uint8 RGB (B, H, W, 3), on [0, 1] pixels."""
    kernel = min(11, first.shape[1] // 2 * 2 - 1, first.shape[2] // 2 * 2 - 1)
    values = structural_similarity_index_measure(
        _unit(first), _unit(second), data_range=1.0, kernel_size=kernel, reduction="none"
    )
    return [float(value) for value in values]


def hematoxylin_ssim(first: np.ndarray, second: np.ndarray) -> list[float]:
    """SSIM of the hematoxylin channel: whether nuclei stayed where they were.

    Each pair is scaled by its own largest amount, so a tile's score does not depend on the
    other tiles in the batch.
    """
    amounts = [separate_stains(images)[..., :1].permute(0, 3, 1, 2) for images in (first, second)]
    top = torch.maximum(amounts[0].amax((1, 2, 3)), amounts[1].amax((1, 2, 3))).clamp_min(1e-6)
    top = top[:, None, None, None]
    kernel = min(11, first.shape[1] // 2 * 2 - 1)
    values = structural_similarity_index_measure(
        amounts[0] / top, amounts[1] / top, data_range=1.0, kernel_size=kernel, reduction="none"
    )
    return [float(value) for value in values]


def l1(first: np.ndarray, second: np.ndarray) -> list[float]:
    """Mean absolute difference per image pair, on [0, 1] pixels."""
    return (_unit(first) - _unit(second)).abs().mean((1, 2, 3)).tolist()


def psnr(first: np.ndarray, second: np.ndarray) -> list[float]:
    """Peak signal-to-noise ratio in dB per image pair (uint8 range)."""
    error = ((_unit(first) - _unit(second)) ** 2).mean((1, 2, 3)).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / error)).tolist()


def lpips(first: np.ndarray, second: np.ndarray) -> list[float] | None:
    """LPIPS (AlexNet) per pair, or None when its weights are not available locally."""
    metric = _lpips_metric()
    if metric is None:
        return None
    with torch.no_grad():
        return [
            float(metric(a * 2 - 1, b * 2 - 1))
            for a, b in zip(_unit(first)[:, None], _unit(second)[:, None], strict=True)
        ]


@functools.cache
def _lpips_metric():
    if not (Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS).is_file():
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex").eval()


def difference_heatmap(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Where two uint8 RGB images differ, as an RGB heatmap (brighter = larger change).

    Scaled to the pair's largest change, so the pattern shows even when changes are small.
    """
    change = np.abs(first.astype(np.float32) - second.astype(np.float32)).mean(-1)
    scaled = (255 * change / max(float(change.max()), 1.0)).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
