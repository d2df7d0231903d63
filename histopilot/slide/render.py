"""Pictures of a slide: thumbnails with the tissue outline, regions and heatmaps drawn on.

Agents and users cite regions in level-0 coordinates; these helpers map them onto an overview
so a person can see at a glance what was looked at and where the attention went.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from histopilot.errors import OutputError
from histopilot.slide.readers.base import GENERATED_KEY
from histopilot.slide.tissue import TissueMask
from histopilot.storage import atomic_file

#: Outline and region colours (RGB): tissue in green, regions in a colour-blind-safe blue.
TISSUE_COLOUR = (0, 170, 60)
REGION_COLOUR = (0, 114, 178)


def draw_tissue_outline(
    overview: np.ndarray, tissue: TissueMask, overview_downsample: float
) -> np.ndarray:
    """Copy of ``overview`` with tissue polygons outlined and pen marks hatched out."""
    canvas = overview.copy()
    scale = 1.0 / overview_downsample
    thickness = max(1, round(max(canvas.shape[:2]) / 500))
    for polygon in tissue.polygons:
        rings = [polygon.exterior, *polygon.holes]
        points = [(np.asarray(ring, np.float64) * scale).round().astype(np.int32) for ring in rings]
        cv2.polylines(canvas, points, isClosed=True, color=TISSUE_COLOUR, thickness=thickness)
    if tissue.pen_mask.any():
        pen = cv2.resize(
            tissue.pen_mask.astype(np.uint8),
            (canvas.shape[1], canvas.shape[0]),
            interpolation=cv2.INTER_NEAREST,
        ).astype(bool)
        canvas[pen] = (canvas[pen] * 0.5 + np.array([128, 0, 128]) * 0.5).astype(np.uint8)
    return canvas


def draw_regions(
    overview: np.ndarray,
    overview_downsample: float,
    regions: Sequence[tuple[int, int, int, int]],
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """Copy of ``overview`` with level-0 rectangles ``(x, y, width, height)`` drawn and labelled."""
    canvas = overview.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for index, (x, y, width, height) in enumerate(regions):
        top_left = (round(x / overview_downsample), round(y / overview_downsample))
        bottom_right = (
            round((x + width) / overview_downsample),
            round((y + height) / overview_downsample),
        )
        cv2.rectangle(canvas, top_left, bottom_right, REGION_COLOUR, thickness)
        if labels is not None:
            cv2.putText(
                canvas,
                labels[index],
                (top_left[0] + 2, top_left[1] + 12 * thickness),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4 * thickness,
                REGION_COLOUR,
                thickness,
                cv2.LINE_AA,
            )
    return canvas


def overlay_heatmap(
    overview: np.ndarray,
    heatmap: np.ndarray,
    *,
    alpha: float = 0.45,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Blend a [0, 1] ``heatmap`` (any resolution) over ``overview`` with a perceptual colormap.

    NaN cells and cells outside ``mask`` are left transparent, so background stays readable.
    """
    height, width = overview.shape[:2]
    values = cv2.resize(
        heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST
    )
    rgba = heatmap_colours(values)
    visible = rgba[..., 3] > 0
    if mask is not None:
        visible &= cv2.resize(
            mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST
        ).astype(bool)
    canvas = overview.copy()
    canvas[visible] = (
        canvas[visible] * (1 - alpha) + rgba[..., :3][visible].astype(np.float32) * alpha
    ).astype(np.uint8)
    return canvas


def heatmap_colours(values: np.ndarray) -> np.ndarray:
    """RGBA viridis colours of [0, 1] ``values``; NaN cells fully transparent."""
    known = ~np.isnan(values)
    colours = cv2.applyColorMap(
        (np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * 255).astype(np.uint8),
        cv2.COLORMAP_VIRIDIS,
    )[..., ::-1]
    return np.dstack([colours, np.where(known, 255, 0).astype(np.uint8)])


def save_png(image: np.ndarray, path: str | Path, *, generated: str | None = None) -> Path:
    """Write an RGB (or boolean mask) array as PNG, creating the folder; all or nothing.

    ``generated`` says what model made the image; it goes into the file as a text chunk, so
    histopilot opening the file later knows it for a generated image, never evidence.
    """
    path = Path(path)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    info = None
    if generated is not None:
        info = PngInfo()
        info.add_text(GENERATED_KEY, generated)
    with atomic_file(path) as tmp:
        try:
            Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        except ValueError as error:
            raise OutputError(f"cannot write {path}: {error}") from error
    return path
