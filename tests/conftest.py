"""Shared fixtures: the real test data folder, synthetic slides, hostile files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tests never reach a model hub: a missing model must fail at once, not after network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


@pytest.fixture(scope="session")
def taught_vlm(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL folder that answers two fixed prompts (see tests/tiny_models.py)."""
    from tests.tiny_models import build_taught_vlm

    return build_taught_vlm(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture
def isolated_config(tmp_path, monkeypatch):
    """Run in an empty folder with no user config and no HISTOPILOT_* overrides.

    A histopilot.toml or a HISTOPILOT_ROLES__… variable on the developer's machine must not
    change what a configuration test sees.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "user-config"))
    for name in list(os.environ):
        if name.startswith("HISTOPILOT_") and name != "HISTOPILOT_TEST_DATA":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One tile-embedding cache for the session: each slide is embedded once."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="session")
def reference_bank_path(test_data: Path, tmp_path_factory) -> Path:
    """The 32 labelled CRC-VAL-HE-7K patches as a reference bank (offline encoder)."""
    from histopilot.retrieval.encoders import load_encoder
    from histopilot.retrieval.patch_index import PatchIndex
    from histopilot.retrieval.reference import add_labelled_images, read_labels

    encoder = load_encoder("offline")
    path = tmp_path_factory.mktemp("bank") / "crc"
    index = PatchIndex.create(path, encoder=encoder.name, dim=encoder.dim)
    add_labelled_images(index, encoder, read_labels(test_data / "patches" / "crc_val_he_7k", None))
    return path


@pytest.fixture(scope="session")
def cmu_slide_root(wsi_dir: Path, tmp_path_factory) -> Path:
    """A slide folder holding a copy of CMU-1-Small-Region.svs (a copy, since a link that
    leaves a server's slide folder is never served)."""
    root = tmp_path_factory.mktemp("slides")
    shutil.copy(wsi_dir / "CMU-1-Small-Region.svs", root)
    return root
