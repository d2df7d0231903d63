"""How close a generated tile stays to its source, in pathology's terms: whether nuclei
stayed put (SSIM of the hematoxylin channel) and where it changed (a difference heatmap).

The general image metrics (SSIM, PSNR, MAE, LPIPS, ...) live in
:mod:`histopilot.evals.metrics.image`; this module adds what needs stain separation or
drawing.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from histopilot.evals.metrics.image import ssim_of_unit
from histopilot.tools.stain.optical import separate_stains


def hematoxylin_ssim(first: np.ndarray, second: np.ndarray) -> list[float]:
    """SSIM of the hematoxylin channel: whether nuclei stayed where they were.

    Each pair is scaled by its own largest amount, so a tile's score does not depend on the
    other tiles in the batch.
    """
    amounts = [separate_stains(images)[..., :1].permute(0, 3, 1, 2) for images in (first, second)]
    top = torch.maximum(amounts[0].amax((1, 2, 3)), amounts[1].amax((1, 2, 3))).clamp_min(1e-6)
    top = top[:, None, None, None]
    return ssim_of_unit(amounts[0] / top, amounts[1] / top)


def difference_heatmap(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Where two uint8 RGB images differ, as an RGB heatmap (brighter = larger change).

    Scaled to the pair's largest change, so the pattern shows even when changes are small.
    """
    change = np.abs(first.astype(np.float32) - second.astype(np.float32)).mean(-1)
    scaled = (255 * change / max(float(change.max()), 1.0)).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
