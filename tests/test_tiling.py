"""Tile grids at a target resolution, the HDF5 coordinates file and the parallel reader."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from histopilot.errors import MissingMPPError, RegionError
from histopilot.slide import open_slide, tiling
from histopilot.slide.tiling import TileGrid, iter_tiles, tile_grid
from tests.conftest import DAB, EOSIN, HEMATOXYLIN, quadrant_image, write_pyramid


def test_grid_at_target_mpp_reads_the_matching_level(synthetic_pyramid: Path) -> None:
    with open_slide(synthetic_pyramid) as slide:  # 1024x768 at 0.25 µm/px
        grid = tile_grid(slide, mpp=0.5, tile_size=64, min_tissue=0)
    assert grid.read_level == 1
    assert grid.size_level0 == 128
    assert len(grid) == (1024 // 128) * (768 // 128)
    # Row-major, stable order: first row left to right, then the next row.
    assert grid.coords[:3].tolist() == [[0, 0], [128, 0], [256, 0]]
    assert grid.coords[8].tolist() == [0, 128]


def test_tiles_hold_the_pixels_at_their_coordinates(synthetic_pyramid: Path) -> None:
    with open_slide(synthetic_pyramid) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=64, min_tissue=0)
        batches = list(iter_tiles(slide, grid, batch_size=5, workers=2))
    images = np.concatenate([batch.images for batch in batches])
    indices = np.concatenate([batch.indices for batch in batches])
    assert indices.tolist() == list(range(len(grid)))
    by_coord = {tuple(c): image for c, image in zip(grid.coords.tolist(), images, strict=True)}
    assert (by_coord[(0, 0)] == HEMATOXYLIN).all()  # hematoxylin block, level-0 0..256
    assert (by_coord[(512, 256)] == EOSIN).all()  # eosin block
    assert (by_coord[(896, 640)] == DAB).all()  # DAB block
    assert (by_coord[(384, 0)] == 255).all()  # glass


@pytest.fixture
def coarse_pyramid(tmp_path: Path) -> Path:
    """The same picture at 2 µm/px, so its blocks are large enough to count as tissue."""
    return write_pyramid(tmp_path / "coarse.tif", quadrant_image(), mpp=2.0)


def test_min_tissue_keeps_only_tiles_on_tissue(coarse_pyramid: Path) -> None:
    with open_slide(coarse_pyramid) as slide:
        grid = tile_grid(slide, mpp=4.0, tile_size=64, min_tissue=0.5)
    # The three coloured 256 px blocks hold 4 tiles of 128 level-0 px each.
    assert len(grid) == 12
    assert (grid.tissue_fraction >= 0.5).all()


def test_overlap_shortens_the_stride(synthetic_pyramid: Path) -> None:
    with open_slide(synthetic_pyramid) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=64, overlap=32, min_tissue=0)
    assert grid.coords[1].tolist() == [64, 0]


def test_coordinates_round_trip_through_hdf5(coarse_pyramid: Path, tmp_path: Path) -> None:
    with open_slide(coarse_pyramid) as slide:
        grid = tile_grid(slide, mpp=4.0, tile_size=64, min_tissue=0.5)
    path = grid.save_h5(tmp_path / "out" / "pyramid.h5")
    with h5py.File(path) as handle:  # the layout other patching tools read
        assert handle["coords"].shape == (12, 2)
        assert handle["coords"].attrs["patch_size"] == 64
        assert handle["coords"].attrs["patch_size_level0"] == 128
        assert handle["coords"].attrs["patch_level"] == 1
    loaded = TileGrid.load_h5(path)
    assert np.array_equal(loaded.coords, grid.coords)
    assert (loaded.target_mpp, loaded.slide_mpp, loaded.read_level) == (4.0, 2.0, 1)
    assert not list(tmp_path.glob("out/*.partial"))


def test_real_svs_tiles_at_half_micron(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:  # 0.499 µm/px
        grid = tile_grid(slide, mpp=0.5, tile_size=256)
        first = next(iter_tiles(slide, grid, batch_size=8))
    assert len(grid) > 20
    assert grid.read_level == 0 and grid.size_level0 == 257
    assert first.images.shape == (8, 256, 256, 3)
    assert first.images.mean() < 220  # tissue, not glass


def test_jpeg2000_svs_tiles_from_its_second_level(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.25) as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=128)
        images = np.concatenate([b.images for b in iter_tiles(slide, grid)])
    assert grid.read_level == 1
    assert images.shape[1:] == (128, 128, 3)


def test_tiling_without_mpp_asks_for_it(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs") as slide:
        with pytest.raises(MissingMPPError, match="--slide-mpp"):
            tile_grid(slide, mpp=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mpp": 0.5, "tile_size": 4}, "tile size"),
        ({"mpp": 0.5, "overlap": 300}, "overlap"),
        ({"mpp": 0.5, "min_tissue": 1.5}, "min tissue"),
        ({"mpp": -1.0}, "positive"),
        ({}, "exactly one"),
    ],
)
def test_bad_grid_requests_are_refused(synthetic_pyramid: Path, kwargs: dict, message: str) -> None:
    with open_slide(synthetic_pyramid) as slide, pytest.raises(RegionError, match=message):
        tile_grid(slide, **kwargs)


def test_absurd_grids_are_refused_before_allocating(
    synthetic_pyramid: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiling, "MAX_TILES", 10)
    with open_slide(synthetic_pyramid) as slide, pytest.raises(RegionError, match="--mpp"):
        tile_grid(slide, mpp=0.25, tile_size=16, min_tissue=0)


@pytest.mark.parametrize("mpp", [float("nan"), float("inf"), 1e300, 1e-9])
def test_non_finite_or_absurd_resolutions_are_refused(synthetic_pyramid: Path, mpp: float) -> None:
    with open_slide(synthetic_pyramid) as slide, pytest.raises(RegionError):
        tile_grid(slide, mpp=mpp, min_tissue=0)
