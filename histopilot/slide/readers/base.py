"""The contract every slide reader meets, and helpers the array-backed readers share.

A reader knows one container format. It reports geometry and metadata as found in the file and
reads RGB pixels; it never guesses a resolution. ``histopilot.slide.Slide`` adds everything
format-independent (MPP overrides, target-MPP reads, bounds checks) on top.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from histopilot.slide.models import Modality, ReaderName

#: Microscope resolutions outside this range (µm/px) are treated as meaningless defaults,
#: e.g. the 72 dpi (≈ 353 µm/px) that image editors write into every TIFF.
PLAUSIBLE_MPP_RANGE = (0.02, 100.0)


GENERATED_KEY = "histopilot-generated"
"""Metadata key (a PNG text chunk) histopilot writes into every image a model made, so the
image is known for what it is wherever it goes: a virtual stain is never evidence of a stain."""


@dataclass
class ReaderMetadata:
    """What a reader found in the file's header."""

    format: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: tuple[float, float] | None = None
    mpp_note: str | None = None
    objective_power: float | None = None
    channels: list[str] = field(default_factory=lambda: ["R", "G", "B"])
    #: ``None`` when the header does not say; the slide then looks at the pixels.
    modality: Modality | None = None
    associated_images: list[str] = field(default_factory=list)
    #: Repairs or oddities the reader applied that a user should know about.
    notes: list[str] = field(default_factory=list)
    #: What made the image when a model did (histopilot marks what it generates).
    generated: str | None = None


class SlideReader(ABC):
    """One open file of one container format."""

    name: ReaderName
    metadata: ReaderMetadata

    @abstractmethod
    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` at ``level``; top-left at level-0 ``(x, y)``.

        Pixels outside the image are white (glass), never black, so tissue detection and
        encoders see background, not an artificial edge.
        """

    @abstractmethod
    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (thumbnail, macro, label) as RGB uint8."""

    def close(self) -> None:  # noqa: B027 - readers without handles have nothing to release
        """Release file handles."""


def crop_padded(image: np.ndarray, x: int, y: int, width: int, height: int) -> np.ndarray:
    """``image[y:y+height, x:x+width]`` with white where the window leaves the image."""
    out = np.full((height, width, *image.shape[2:]), 255, dtype=image.dtype)
    src_x0, src_y0 = max(x, 0), max(y, 0)
    src_x1 = min(x + width, image.shape[1])
    src_y1 = min(y + height, image.shape[0])
    if src_x1 > src_x0 and src_y1 > src_y0:
        out[src_y0 - y : src_y1 - y, src_x0 - x : src_x1 - x] = image[src_y0:src_y1, src_x0:src_x1]
    return out


def mpp_from_resolution(
    unit: str, pixels_per_unit_x: float, pixels_per_unit_y: float
) -> tuple[float, float] | None:
    """MPP from TIFF-style resolution tags (``unit`` is 'centimeter' or 'inch')."""
    microns_per_unit = {"centimeter": 1e4, "inch": 25_400.0}.get(unit.lower())
    if microns_per_unit is None or pixels_per_unit_x <= 0 or pixels_per_unit_y <= 0:
        return None
    return plausible_mpp(microns_per_unit / pixels_per_unit_x, microns_per_unit / pixels_per_unit_y)


def plausible_mpp(mpp_x: float, mpp_y: float) -> tuple[float, float] | None:
    """Keep a resolution only if it could come from a microscope."""
    low, high = PLAUSIBLE_MPP_RANGE
    if low <= mpp_x <= high and low <= mpp_y <= high:
        return (mpp_x, mpp_y)
    return None
