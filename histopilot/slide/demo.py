"""The demo slide: a pyramidal tiled TIFF built at run time from an image scikit-image ships.

``skimage.data.immunohistochemistry()`` is one real 512x512 field of colon tissue stained for
IHC with a hematoxylin counterstain. The demo arranges flipped and rotated copies of it into
an irregular "section" on white glass, so tissue detection, tiling and the viewer have a real
slide-shaped input with no download. It is a mosaic of one field, for demonstration only.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile
from skimage import data

from histopilot.errors import OutputError

#: The resolution written into the demo file (µm/px). Declared, not measured.
DEMO_MPP = 0.5
DEMO_TILES_ACROSS = 8
DEMO_TILES_DOWN = 6
_FIELD = 512


def build_demo_slide(path: str | Path, *, seed: int = 0) -> Path:
    """Write the demo slide to ``path`` (tiled, JPEG, 3 pyramid levels) and return the path."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    field = data.immunohistochemistry()
    height, width = DEMO_TILES_DOWN * _FIELD, DEMO_TILES_ACROSS * _FIELD
    canvas = np.full((height, width, 3), 255, np.uint8)
    mosaic = np.empty_like(canvas)
    for row in range(DEMO_TILES_DOWN):
        for col in range(DEMO_TILES_ACROSS):
            variant = np.rot90(field, k=int(rng.integers(4)))
            if rng.random() < 0.5:
                variant = variant[:, ::-1]
            mosaic[row * _FIELD : (row + 1) * _FIELD, col * _FIELD : (col + 1) * _FIELD] = variant
    section = _section_shape(height, width, rng)
    canvas[section] = mosaic[section]

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        resolution = (1e4 / DEMO_MPP, 1e4 / DEMO_MPP)  # pixels per centimetre
        with tifffile.TiffWriter(path, bigtiff=False) as tiff:
            options = {
                "tile": (256, 256),
                "photometric": "rgb",
                "compression": "jpeg",
                "compressionargs": {"level": 90},
                "resolutionunit": "CENTIMETER",
            }
            level = canvas
            for index in range(3):
                scale = 2**index
                tiff.write(
                    level,
                    resolution=(resolution[0] / scale, resolution[1] / scale),
                    subfiletype=0 if index == 0 else 1,
                    description="histopilot demo slide: mosaic of skimage IHC field"
                    if index == 0
                    else None,
                    **options,
                )
                level = cv2.resize(
                    level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA
                )
    except OSError as error:
        raise OutputError(f"cannot write the demo slide to {path}: {error}") from error
    return path


def _section_shape(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob covering roughly half the glass, like a tissue section."""
    centre = np.array([width / 2, height / 2])
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = rng.uniform(0.32, 0.46, size=angles.size) * min(height, width)
    radii = np.convolve(np.r_[radii[-2:], radii, radii[:2]], np.ones(5) / 5, mode="valid")
    points = centre + np.stack([np.cos(angles) * radii * 1.3, np.sin(angles) * radii], axis=1)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [points.round().astype(np.int32)], 1)
    return mask.astype(bool)
