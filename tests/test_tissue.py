"""Tissue detection on real slides, pen-marked thumbnails and the edge cases in between."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from histopilot.errors import NotBrightfieldError
from histopilot.slide import detect_tissue, open_slide
from histopilot.slide.tissue import detect_tissue_in_image, pen_marks
from tests.conftest import DAB, EOSIN, HEMATOXYLIN


def _load_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("CMU-1-Small-Region.svs", 0.25, 0.50),
        ("tcga-cr-7395-01a-01-ts1.svs", 0.45, 0.75),
        ("dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm", 0.30, 0.55),
    ],
)
def test_tissue_fraction_of_real_slides(wsi_dir: Path, name: str, low: float, high: float) -> None:
    with open_slide(wsi_dir / name) as slide:
        tissue = detect_tissue(slide)
    assert low < tissue.tissue_fraction < high
    assert tissue.polygons, "tissue found but no polygon"


def test_finds_tissue_covering_under_one_percent_of_the_glass(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "idr0073-kidney-48-5-ihc-thumbnail.tif") as slide:
        tissue = detect_tissue(slide)
    assert 0.001 < tissue.tissue_fraction < 0.01
    biggest = tissue.polygons[0]
    xs = [x for x, _ in biggest.exterior]
    ys = [y for _, y in biggest.exterior]
    # The one piece of tissue sits left of centre (x ≈ 285–400, y ≈ 500–570 in the file).
    assert 250 < min(xs) < max(xs) < 420
    assert 480 < min(ys) < max(ys) < 590
    assert biggest.area_px > 0.8 * tissue.mask.sum()


@pytest.mark.parametrize(
    "name",
    [
        "tcga-green-pen.png",
        "tcga-red-pen.png",
        "wsi-blue-pen.png",
        "diagnostic-slide-thumb-rgb.png",
    ],
)
def test_pen_ink_is_never_tissue(test_data: Path, name: str) -> None:
    rgb = _load_rgb(test_data / "patches" / "histolab_thumbnails" / name)
    tissue = detect_tissue_in_image(rgb)
    assert tissue.pen_fraction > 0.01, "the ink on this thumbnail was not found"
    assert not (tissue.mask & tissue.pen_mask).any()
    assert tissue.tissue_fraction > 0.2


def test_unmarked_thumbnail_has_almost_no_pen(test_data: Path) -> None:
    rgb = _load_rgb(test_data / "patches" / "histolab_thumbnails" / "tcga-lung-rgb.png")
    tissue = detect_tissue_in_image(rgb)
    assert tissue.pen_fraction < 0.01
    assert tissue.tissue_fraction > 0.6


def test_stains_are_not_mistaken_for_ink() -> None:
    counterstain = (175, 185, 215)  # pale blue hematoxylin under IHC
    swatch = np.array([[HEMATOXYLIN, EOSIN, DAB, counterstain]], np.uint8)
    assert not pen_marks(cv2.cvtColor(swatch, cv2.COLOR_RGB2HSV)).any()


def test_blank_glass_has_no_tissue() -> None:
    glass = np.full((512, 512, 3), 242, np.uint8)
    glass += np.random.default_rng(0).integers(0, 4, glass.shape, dtype=np.uint8)
    tissue = detect_tissue_in_image(glass, mpp=8.0)
    assert tissue.tissue_fraction == 0
    assert tissue.polygons == []


def test_patch_full_of_tissue_is_all_tissue(test_data: Path) -> None:
    for path in sorted((test_data / "patches" / "crc_val_he_7k").glob("TUM-*.png")):
        tissue = detect_tissue_in_image(_load_rgb(path), mpp=0.5)
        assert tissue.tissue_fraction > 0.9, path.name


def test_fluorescence_is_refused(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "hamamatsu-test3-DAPI-2-387.ndpi") as slide:
        with pytest.raises(NotBrightfieldError, match="brightfield"):
            detect_tissue(slide)


def test_geojson_polygons_are_closed_level0_rings(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        tissue = detect_tissue(slide)
        geojson = tissue.to_geojson(mpp=slide.mpp.mean)
    feature = geojson["features"][0]
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
    assert max(x for x, _ in ring) <= 2220 + tissue.downsample
    assert feature["properties"]["area_mm2"] > 0.1


def test_tissue_detection_is_fast(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.25) as slide:
        overview, downsample = slide.overview(downsample=8.0 / 0.25)
        start = time.perf_counter()
        detect_tissue_in_image(overview, downsample=downsample, mpp=8.0)
        elapsed = time.perf_counter() - start
    assert elapsed < 0.5
