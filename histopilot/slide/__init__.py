"""Whole-slide images: open any slide, resolution and magnification, tissue, tiles, pictures.

Entry point: ``open_slide(path) -> Slide``. Everything above this package reads pixels
through ``Slide``; nothing here imports from the rest of histopilot except ``errors`` and
``storage``.
"""

from histopilot.slide.models import MPP, LevelInfo, SlideInfo
from histopilot.slide.slide import Slide, open_slide
from histopilot.slide.tissue import TissueMask, TissuePolygon, detect_tissue

__all__ = [
    "MPP",
    "LevelInfo",
    "Slide",
    "SlideInfo",
    "TissueMask",
    "TissuePolygon",
    "detect_tissue",
    "open_slide",
]
