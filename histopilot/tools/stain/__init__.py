"""Classical stain tools: separation, normalization toward a target, augmentation.

>>> normalizer = StainNormalizer.fit(reference_tile, "macenko")   # doctest: +SKIP
>>> result = normalizer.transform(tiles)          # (B, H, W, 3) uint8 → same, plus flags
"""

from histopilot.tools.stain.augment import Jitter, augment_stains
from histopilot.tools.stain.normalizer import (
    METHODS,
    StainBatch,
    StainNormalizer,
    StainTarget,
)
from histopilot.tools.stain.optical import STAINS, separate_stains

__all__ = [
    "METHODS",
    "STAINS",
    "Jitter",
    "StainBatch",
    "StainNormalizer",
    "StainTarget",
    "augment_stains",
    "separate_stains",
]
