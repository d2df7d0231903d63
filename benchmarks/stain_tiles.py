"""The real H&E tiles of the stain benchmarks, shared by ``stain.py`` and ``stain_gpu.py``.

All from the test data (``../shared/data``, or the folder ``HISTOPILOT_TEST_DATA`` names);
no synthetic images, so the numbers speak of the tiles the tools will meet:

* 224 px: the 32 CRC-VAL-HE-7K patches in ``patches/crc_val_he_7k``, tiles of the size a
  tile classifier reads, a few of them with little tissue or with marker ink;
* 1024 px: four non-overlapping 1024 px level-0 regions of ``wsi/CMU-1-Small-Region.svs``
  (2220 x 2967 px, so four is all that fit). ``SLIDE_CORNERS`` is the 2 x 2 layout, on a
  32 px lattice, whose least-tissue region holds the most tissue (26–40 % tissue each), so
  that every region gives the stain estimate tissue to work on;
* the reference both normalizers are fitted to: the histolab tile ``REFERENCE``.

torchstain is not imported here: ``stain_gpu.py`` runs where it may be missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from histopilot.slide import open_slide
from histopilot.tools.images import read_rgb

DATA = Path(
    os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
CRC = DATA / "patches" / "crc_val_he_7k"
SLIDE = DATA / "wsi" / "CMU-1-Small-Region.svs"
REFERENCE = DATA / "patches" / "histolab_tiles" / "tissue-level0-7352-11762-7864-12274.png"
SLIDE_SIZE = 1024  # px, the side of the slide regions
# Top-left (x, y) of the four SLIDE_SIZE px regions of SLIDE, row by row.
SLIDE_CORNERS = ((160, 896), (1184, 896), (160, 1920), (1184, 1920))


def crc_tiles() -> tuple[np.ndarray, list[str]]:
    """The CRC-VAL-HE-7K patches (N, 224, 224, 3) and their names."""
    paths = sorted(CRC.glob("*.png"))
    if not paths:
        raise SystemExit(f"no CRC patches in {CRC}; set HISTOPILOT_TEST_DATA")
    return np.stack([read_rgb(path) for path in paths]), [path.stem for path in paths]


def slide_tiles() -> tuple[np.ndarray, list[str]]:
    """The regions of the CMU slide at ``SLIDE_CORNERS`` (4, 1024, 1024, 3) and their names."""
    if not SLIDE.is_file():
        raise SystemExit(f"no slide at {SLIDE}; set HISTOPILOT_TEST_DATA")
    with open_slide(SLIDE) as slide:
        regions = [slide.read_region(x, y, 0, SLIDE_SIZE, SLIDE_SIZE) for x, y in SLIDE_CORNERS]
    return np.stack(regions), [f"CMU-1 at ({x}, {y})" for x, y in SLIDE_CORNERS]
