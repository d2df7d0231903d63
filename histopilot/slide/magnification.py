"""Magnification arithmetic in one place: level-0 coordinates, target MPP and pyramid levels.

Every other module asks this one "which level do I read, how big, and do I resize?", so the
rounding rules live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: A level whose resolution is within this relative distance of the target is read without
#: resizing. 2 % keeps a 0.499 µm/px Aperio scan usable "as is" for a 0.5 µm/px request,
#: a physical error of 0.5 µm over a 256 px tile.
MPP_TOLERANCE = 0.02


@dataclass(frozen=True)
class ReadPlan:
    """How to produce an ``out_width`` x ``out_height`` image of a level-0 rectangle."""

    level: int
    x: int  # level-0 x of the top-left corner
    y: int  # level-0 y of the top-left corner
    read_width: int  # pixels to read at ``level``
    read_height: int
    out_width: int  # pixels delivered to the caller
    out_height: int

    @property
    def needs_resize(self) -> bool:
        return (self.read_width, self.read_height) != (self.out_width, self.out_height)


def best_level(
    level_downsamples: Sequence[float], downsample: float, tolerance: float = MPP_TOLERANCE
) -> int:
    """The coarsest level that is at least as fine as ``downsample`` (within tolerance).

    Reading a finer level and shrinking keeps detail; reading a coarser level and enlarging
    would invent it, so that is only done when no finer level exists (never for level 0).
    """
    limit = downsample * (1 + tolerance)
    candidates = [i for i, d in enumerate(level_downsamples) if d <= limit]
    return max(candidates, key=lambda i: level_downsamples[i], default=0)


def plan_read(
    level_downsamples: Sequence[float],
    x: int,
    y: int,
    out_width: int,
    out_height: int,
    downsample: float,
    tolerance: float = MPP_TOLERANCE,
) -> ReadPlan:
    """Plan a read of ``out_width`` x ``out_height`` pixels at ``downsample`` from level 0.

    ``downsample`` is level-0 pixels per output pixel (target MPP / level-0 MPP).
    """
    level = best_level(level_downsamples, downsample, tolerance)
    scale = downsample / level_downsamples[level]
    if abs(scale - 1) <= tolerance:
        scale = 1.0
    return ReadPlan(
        level=level,
        x=x,
        y=y,
        read_width=max(1, round(out_width * scale)),
        read_height=max(1, round(out_height * scale)),
        out_width=out_width,
        out_height=out_height,
    )


def level0_extent(pixels: int, downsample: float) -> int:
    """Level-0 length covered by ``pixels`` output pixels at ``downsample``."""
    return max(1, round(pixels * downsample))
