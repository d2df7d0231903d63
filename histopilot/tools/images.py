"""Reading, checking and writing the RGB tiles the image tools work on.

Every tool takes 8-bit RGB. What arrives in practice is messier, so the rules are fixed here
once: 16-bit images are scaled to 8 bits, an alpha channel is composited over white (transparent
pixels are glass), and images without colour (grayscale, fluorescence channels) are refused,
because stain separation needs three colour channels.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from histopilot.errors import ImageInputError

GENERATED_NOTICE = (
    "Generated image (virtual): made by a model, never evidence of a stain or a finding."
)
"""Goes with every image a model makes, beside the mark inside the file
(:func:`histopilot.slide.render.save_png` with ``generated=``)."""
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
MAX_PIXELS = 64_000_000  # larger images are slide regions: read them through the slide layer
MIN_SIDE = 8  # below this there is nothing to estimate a stain from


def read_rgb(
    path: str | Path,
    *,
    max_pixels: int = MAX_PIXELS,
    too_large_hint: str = "for slide regions, open the slide and read tiles instead",
    grayscale: bool = False,
) -> np.ndarray:
    """The image at ``path`` as uint8 RGB (H, W, 3), converted by the module's rules.

    The size is checked from the header, before any pixel is decoded. ``grayscale=True``
    accepts gray images as RGB (for encoders; stain tools refuse them).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"no image file at {path}")
    try:
        with Image.open(path) as header:
            width, height = header.size
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{path}: too large to decode safely; {too_large_hint}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(
            f"{path}: not an image that can be read (PNG, JPEG, TIFF…): {error}"
        ) from error
    if width * height > max_pixels:
        raise ImageInputError(
            f"{path}: {width}×{height} px is larger than {max_pixels:,} px; {too_large_hint}"
        )
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageInputError(f"{path}: the image data cannot be decoded (truncated or corrupt)")
    if pixels.ndim == 3 and pixels.shape[2] >= 3:
        order = cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
        pixels = cv2.cvtColor(pixels, order)
    elif grayscale:
        gray = pixels if pixels.ndim == 2 else pixels[..., 0]
        pixels = np.repeat(gray[..., None], 3, axis=2)
    return as_rgb8(pixels, name=str(path))


def as_rgb8(pixels: np.ndarray, *, name: str = "image") -> np.ndarray:
    """``pixels`` as uint8 RGB (H, W, 3); see the module docstring for the conversions."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (1, 2)):
        raise ImageInputError(
            f"{name}: grayscale image; stain tools need RGB brightfield images (H&E or IHC)"
        )
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ImageInputError(f"{name}: expected (height, width, 3) RGB, got shape {pixels.shape}")
    if min(pixels.shape[:2]) < MIN_SIDE:
        raise ImageInputError(
            f"{name}: {pixels.shape[1]}×{pixels.shape[0]} px is too small (minimum {MIN_SIDE} px)"
        )
    scaled = _to_unit_range(pixels, name)
    if scaled.shape[2] == 4:
        alpha = scaled[..., 3:]
        scaled = scaled[..., :3] * alpha + (1.0 - alpha)  # transparent is glass: white
    return np.rint(scaled * 255.0).astype(np.uint8)


def _to_unit_range(pixels: np.ndarray, name: str) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / 65535.0
    if np.issubdtype(pixels.dtype, np.floating):
        if not np.isfinite(pixels).all():
            raise ImageInputError(f"{name}: contains NaN or infinite values")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ImageInputError(f"{name}: floating-point images must lie in [0, 1]")
        return pixels.astype(np.float32)
    raise ImageInputError(f"{name}: unsupported pixel type {pixels.dtype}")


def list_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders searched recursively, sorted."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            found.append(item)
        else:
            raise ImageInputError(f"{item}: no such file or folder")
    return found


def side_by_side(*panels: np.ndarray, gap: int = 4) -> np.ndarray:
    """Panels of equal height placed left to right on white, for people to compare."""
    height = max(panel.shape[0] for panel in panels)
    width = sum(panel.shape[1] for panel in panels) + gap * (len(panels) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    left = 0
    for panel in panels:
        canvas[: panel.shape[0], left : left + panel.shape[1]] = panel
        left += panel.shape[1] + gap
    return canvas
