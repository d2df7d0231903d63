"""Tile grids at a target resolution, and a parallel reader that turns them into arrays.

The grid is computed once (level-0 coordinates in row-major order, so reruns give the same
tile indices) and saved as HDF5 in the layout patching tools in the field use: a ``coords``
dataset of level-0 ``(x, y)`` with the patch geometry as attributes. The reader then decodes
tiles on a thread pool: OpenSlide and the codecs release the GIL, so threads scale with cores
without copying pixels between processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from histopilot.errors import RegionError
from histopilot.slide.magnification import level0_extent, plan_read
from histopilot.slide.slide import Slide, resize
from histopilot.slide.tissue import TissueMask, detect_tissue
from histopilot.storage import atomic_file

#: Grids beyond this many tiles are refused: 10 M tiles of 256 px at 0.5 µm/px cover
#: 650 cm² of tissue, far beyond any glass slide, so a bigger grid means a wrong resolution.
MAX_TILES = 10_000_000
#: Tiles may be enlarged at most 8x (a 20x scan served at 160x is already empty
#: magnification) and shrunk to at most 1/1024 (a whole slide in a few tiles).
MIN_DOWNSAMPLE, MAX_DOWNSAMPLE = 1 / 8, 1024.0
#: Tiles decoded by one read when they sit side by side (see ``iter_tiles``).
RUN_LENGTH = 8


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one slide are, and at what resolution they are read."""

    coords: np.ndarray  # int64 (N, 2): level-0 x, y of each tile's top-left corner
    tissue_fraction: np.ndarray  # float32 (N,): share of each tile covered by tissue
    tile_size: int  # output pixels per side
    downsample: float  # level-0 pixels per output pixel
    size_level0: int  # level-0 pixels per side
    read_level: int  # pyramid level the tiles are read from
    target_mpp: float | None
    slide_mpp: float | None
    overlap: int  # output pixels shared by neighbouring tiles
    slide_path: str

    def __len__(self) -> int:
        return len(self.coords)

    def save_h5(self, path: str | Path) -> Path:
        """Write ``coords`` (+ ``tissue_fraction``) with the geometry as attributes."""
        path = Path(path)
        with atomic_file(path) as tmp, h5py.File(tmp, "w") as handle:
            self.write_coords(handle)
        return path

    def write_coords(self, handle: h5py.File) -> None:
        """Add ``coords`` (geometry in its attributes) and ``tissue_fraction`` to ``handle``."""
        coords = handle.create_dataset("coords", data=self.coords)
        coords.attrs.update(
            {
                "patch_size": self.tile_size,
                "patch_size_level0": self.size_level0,
                "patch_level": self.read_level,
                "downsample": self.downsample,
                "target_mpp": self.target_mpp if self.target_mpp else np.nan,
                "level0_mpp": self.slide_mpp if self.slide_mpp else np.nan,
                "overlap": self.overlap,
                "slide_path": self.slide_path,
            }
        )
        handle.create_dataset("tissue_fraction", data=self.tissue_fraction)

    @classmethod
    def load_h5(cls, path: str | Path) -> TileGrid:
        with h5py.File(path, "r") as handle:
            return cls.load_h5_handle(handle)

    @classmethod
    def load_h5_handle(cls, handle: h5py.File) -> TileGrid:
        """The grid stored in an open file by ``write_coords``."""
        attrs = dict(handle["coords"].attrs)
        coords = handle["coords"][:]
        fractions = handle["tissue_fraction"][:] if "tissue_fraction" in handle else None

        def optional(value: float) -> float | None:
            return None if np.isnan(value) else float(value)

        return cls(
            coords=coords,
            tissue_fraction=fractions
            if fractions is not None
            else np.ones(len(coords), np.float32),
            tile_size=int(attrs["patch_size"]),
            downsample=float(attrs["downsample"]),
            size_level0=int(attrs["patch_size_level0"]),
            read_level=int(attrs["patch_level"]),
            target_mpp=optional(attrs["target_mpp"]),
            slide_mpp=optional(attrs["level0_mpp"]),
            overlap=int(attrs["overlap"]),
            slide_path=str(attrs["slide_path"]),
        )


@dataclass
class TileBatch:
    """A batch of decoded tiles, ready for an encoder."""

    images: np.ndarray  # uint8 (B, size, size, 3)
    coords: np.ndarray  # int64 (B, 2) level-0 x, y
    indices: np.ndarray  # int64 (B,) positions in the grid


def tile_grid(
    slide: Slide,
    *,
    mpp: float | None = None,
    downsample: float | None = None,
    tile_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.5,
    tissue: TissueMask | None = None,
) -> TileGrid:
    """Grid of ``tile_size`` tiles at ``mpp`` µm/px (or at ``downsample``) over the tissue.

    Tiles whose tissue fraction is below ``min_tissue`` are dropped; ``min_tissue=0`` keeps
    every tile and skips tissue detection (useful for fluorescence or pre-cropped images).
    """
    if (mpp is None) == (downsample is None):
        raise RegionError("give exactly one of mpp (µm/px) or downsample for the tile grid.")
    if tile_size < 16 or tile_size > 8192:
        raise RegionError(f"tile size must be between 16 and 8192 px, got {tile_size}.")
    if not 0 <= overlap < tile_size:
        raise RegionError(f"overlap must be in [0, {tile_size}), got {overlap}.")
    if not 0 <= min_tissue <= 1:
        raise RegionError(f"min tissue fraction must be in [0, 1], got {min_tissue}.")
    slide_mpp = slide.mpp.mean if slide.mpp else None
    if mpp is not None:
        if not (math.isfinite(mpp) and mpp > 0):
            raise RegionError(f"the tiling resolution must be a positive number, got {mpp} µm/px.")
        downsample = mpp / slide.require_mpp("tiling at a physical resolution")
    if not (math.isfinite(downsample) and MIN_DOWNSAMPLE <= downsample <= MAX_DOWNSAMPLE):
        raise RegionError(
            f"tiles at {downsample:g}x the scan's pixel size are outside the usable range "
            f"({MIN_DOWNSAMPLE:g}–{MAX_DOWNSAMPLE:g}x); check --mpp (µm per pixel, e.g. 0.5) "
            "and the slide's resolution."
        )

    size0 = level0_extent(tile_size, downsample)
    stride0 = level0_extent(tile_size - overlap, downsample)
    width, height = slide.dimensions
    across = max(0, (width - size0) // stride0 + 1)
    down = max(0, (height - size0) // stride0 + 1)
    if across * down > MAX_TILES:
        raise RegionError(
            f"{across * down:,} tiles of {tile_size} px at this resolution is beyond the "
            f"{MAX_TILES:,} tile limit; check --mpp (µm per pixel, e.g. 0.5)."
        )
    ys, xs = np.mgrid[0:down, 0:across]
    xs = (xs.ravel() * stride0).astype(np.int64)
    ys = (ys.ravel() * stride0).astype(np.int64)
    if min_tissue > 0:
        tissue = tissue or detect_tissue(slide)
        fractions = tissue.fractions(xs, ys, size0).astype(np.float32)
        keep = fractions >= min_tissue
        xs, ys, fractions = xs[keep], ys[keep], fractions[keep]
    else:
        fractions = np.ones(len(xs), np.float32)
    plan = plan_read(slide.level_downsamples, 0, 0, tile_size, tile_size, downsample)
    return TileGrid(
        coords=np.stack([xs, ys], axis=1) if len(xs) else np.zeros((0, 2), np.int64),
        tissue_fraction=fractions,
        tile_size=tile_size,
        downsample=downsample,
        size_level0=size0,
        read_level=plan.level,
        target_mpp=mpp,
        slide_mpp=slide_mpp,
        overlap=overlap,
        slide_path=str(slide.path),
    )


def iter_tiles(
    slide: Slide,
    grid: TileGrid,
    *,
    batch_size: int = 64,
    workers: int | None = None,
) -> Iterator[TileBatch]:
    """Decode the grid's tiles in order, ``batch_size`` at a time, on ``workers`` threads.

    One batch is decoded at a time, so memory stays flat however large the slide.
    """
    if batch_size < 1:
        raise RegionError(f"batch size must be at least 1, got {batch_size}.")
    if workers is not None and workers < 1:
        raise RegionError(f"reader threads must be at least 1, got {workers}.")
    workers = workers or min(8, os.cpu_count() or 1)
    plan = plan_read(slide.level_downsamples, 0, 0, grid.tile_size, grid.tile_size, grid.downsample)

    level_downsample = slide.level_downsamples[plan.level]

    def read_run(run: np.ndarray) -> list[np.ndarray]:
        """Decode a run of horizontally adjacent tiles with one read, then cut it up.

        One wide read decodes each stored JPEG/JPEG 2000 block once, where tile-by-tile reads
        decode the blocks on tile borders twice and pay the per-call overhead every time.
        """
        x0, y0 = (int(v) for v in grid.coords[run[0]])
        offsets = [round((int(grid.coords[i][0]) - x0) / level_downsample) for i in run]
        strip = slide.reader.read(
            x0, y0, plan.level, offsets[-1] + plan.read_width, plan.read_height
        )
        tiles = [strip[:, offset : offset + plan.read_width] for offset in offsets]
        if plan.needs_resize:
            return [resize(tile, grid.tile_size, grid.tile_size) for tile in tiles]
        return tiles

    def read_batch(start: int) -> TileBatch:
        indices = np.arange(start, min(start + batch_size, len(grid)))
        images = np.empty((len(indices), grid.tile_size, grid.tile_size, 3), np.uint8)
        runs = _adjacent_runs(grid, indices, max_run=RUN_LENGTH)
        slot = 0
        for tiles in pool.map(read_run, runs):
            for tile in tiles:
                images[slot] = tile
                slot += 1
        return TileBatch(images=images, coords=grid.coords[indices], indices=indices)

    starts = range(0, len(grid), batch_size)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in starts:
            yield read_batch(start)


def _adjacent_runs(grid: TileGrid, indices: np.ndarray, max_run: int) -> list[np.ndarray]:
    """Split ``indices`` into runs of tiles that touch or overlap along one row."""
    if len(indices) == 0:
        return []
    xs, ys = grid.coords[indices, 0], grid.coords[indices, 1]
    steps = np.diff(xs)
    breaks = (np.diff(ys) != 0) | (steps > grid.size_level0) | (steps <= 0)
    runs = np.split(indices, np.flatnonzero(breaks) + 1)
    return [chunk for run in runs for chunk in np.array_split(run, -(-len(run) // max_run))]
