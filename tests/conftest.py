"""Shared fixtures: the real test data folder, synthetic slides, hostile files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO_ROOT = Path(__file__).resolve().parents[1]
HEMATOXYLIN, EOSIN, DAB = (80, 60, 140), (230, 150, 190), (150, 100, 50)


def _test_data_root() -> Path:
    return Path(os.environ.get("HISTOPILOT_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The shared real-data folder; missing data fails under CI and skips elsewhere."""
    root = _test_data_root()
    if not (root / "wsi").is_dir():
        message = f"test data not found at {root} (set HISTOPILOT_TEST_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def wsi_dir(test_data: Path) -> Path:
    return test_data / "wsi"


def write_pyramid(
    path: Path, level0: np.ndarray, *, levels: int = 3, mpp: float | None = 0.25, tile: int = 128
) -> Path:
    """A tiled pyramidal RGB TIFF (each level half the previous), as scanners write them."""
    options: dict = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as tiff:
        image = level0
        for index in range(levels):
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**index)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tiff.write(image, subfiletype=0 if index == 0 else 1, **options, **extra)
            image = image[::2, ::2]
    return path


def quadrant_image(width: int = 1024, height: int = 768) -> np.ndarray:
    """White glass with hematoxylin-, eosin- and DAB-coloured blocks at known places."""
    image = np.full((height, width, 3), 255, np.uint8)
    image[0:256, 0:256] = HEMATOXYLIN
    image[256:512, 512:768] = EOSIN
    image[512:768, 768:1024] = DAB
    return image


@pytest.fixture
def synthetic_pyramid(tmp_path: Path) -> Path:
    return write_pyramid(tmp_path / "pyramid.tif", quadrant_image())
