"""Embed a slide's tiles with a patch encoder, cached per slide as HDF5 ``features`` + ``coords``.

The cache file follows the layout patch-feature tools in the field share (CLAM, TRIDENT):
``features`` (N, dim) float32 beside ``coords`` (N, 2) level-0 x/y, with the tile geometry as
attributes of ``coords``. The file also records the encoder and the slide's size and
modification time; a cache whose record matches is reused, anything else is recomputed, and
the file is written under a temporary name first, so an interrupted run never leaves a
truncated cache that looks valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.slide import Slide, TissueMask
from histopilot.slide.tiling import TileGrid, iter_tiles, tile_grid
from histopilot.storage import atomic_file

CACHE_FORMAT = 1
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's tile embeddings and where each tile is."""

    slide_id: str
    slide_path: str
    encoder: str
    features: np.ndarray  # float32 (N, dim), unit length
    coords: np.ndarray  # int64 (N, 2), level-0 x, y of each tile's top-left corner
    size_level0: int  # level-0 pixels per tile side
    mpp: float | None  # µm/px the tiles were read at

    def __len__(self) -> int:
        return len(self.coords)


#: Multi-part suffixes that belong to the format, not to the slide's name.
_COMPOUND_SUFFIXES = (".ome.tiff", ".ome.tif")


def slide_id_of(path: str | Path) -> str:
    """The id a slide is known by in indexes and caches: its file name without the format
    suffix (``case.v2.svs`` → ``case.v2``); a DICOM folder keeps its whole name."""
    path = Path(path)
    if path.is_dir():
        return path.name
    for suffix in _COMPOUND_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def embed_slide(
    slide: Slide,
    encoder: PatchEncoder,
    *,
    cache_dir: str | Path | None = None,
    min_tissue: float = 0.5,
    batch_size: int = 64,
    workers: int | None = None,
    progress: Progress | None = None,
    tissue: TissueMask | None = None,
) -> SlideFeatures:
    """Embed the tissue tiles of ``slide`` at the encoder's resolution and tile size.

    With ``cache_dir``, ``<cache_dir>/<slide id>.h5`` is reused when it was made by the same
    encoder from the same file, and written otherwise. A caller that already has the slide's
    tissue mask passes it as ``tissue``, so it is not detected twice.
    """
    cache = Path(cache_dir) / f"{slide_id_of(slide.path)}.h5" if cache_dir else None
    if cache is not None:
        cached = _read_cache(cache, slide, encoder, min_tissue)
        if cached is not None:
            if progress:
                progress(len(cached), len(cached))
            return cached
    grid = tile_grid(
        slide, mpp=encoder.mpp, tile_size=encoder.tile_size, min_tissue=min_tissue, tissue=tissue
    )
    features = np.zeros((len(grid), encoder.dim), np.float32)
    for batch in iter_tiles(slide, grid, batch_size=batch_size, workers=workers):
        features[batch.indices] = encoder.encode_images(batch.images, batch_size=batch_size)
        if progress:
            progress(int(batch.indices[-1]) + 1, len(grid))
    if progress and len(grid) == 0:
        progress(0, 0)
    result = SlideFeatures(
        slide_id=slide_id_of(slide.path),
        slide_path=str(slide.path.resolve()),
        encoder=encoder.name,
        features=features,
        coords=grid.coords,
        size_level0=grid.size_level0,
        mpp=grid.target_mpp,
    )
    if cache is not None:
        _write_cache(cache, result, grid, slide, encoder, min_tissue)
    return result


def _fingerprint(slide: Slide, encoder: PatchEncoder, min_tissue: float) -> dict[str, object]:
    """Everything the cached vectors depend on: the file, its resolution, the tiling and the
    encoder's weights (not only its name: a folder's weights can change under one name)."""
    stat = slide.path.stat()
    return {
        "format": CACHE_FORMAT,
        "encoder": encoder.name,
        "encoder_fingerprint": encoder.fingerprint,
        "encoder_mpp": encoder.mpp,
        "tile_size": encoder.tile_size,
        "slide_path": str(slide.path.resolve()),
        "slide_bytes": stat.st_size,
        "slide_mtime_ns": stat.st_mtime_ns,
        "slide_mpp": slide.mpp.mean if slide.mpp else float("nan"),
        "min_tissue": min_tissue,
    }


def _write_cache(
    path: Path,
    result: SlideFeatures,
    grid: TileGrid,
    slide: Slide,
    encoder: PatchEncoder,
    min_tissue: float,
) -> None:
    with atomic_file(path) as tmp, h5py.File(tmp, "w") as handle:
        grid.write_coords(handle)
        handle.create_dataset("features", data=result.features)
        handle.attrs.update(_fingerprint(slide, encoder, min_tissue))


def _read_cache(
    path: Path, slide: Slide, encoder: PatchEncoder, min_tissue: float
) -> SlideFeatures | None:
    """The cached features, or ``None`` when absent, stale, unreadable or inconsistent."""
    if not path.is_file():
        return None
    expected = _fingerprint(slide, encoder, min_tissue)
    try:
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
            if any(_differs(attrs.get(key), value) for key, value in expected.items()):
                return None
            features = handle["features"][:]
            grid = TileGrid.load_h5_handle(handle)
    except (OSError, KeyError, ValueError, TypeError):
        return None
    if features.dtype != np.float32 or features.shape != (len(grid), encoder.dim):
        return None
    if not np.isfinite(features).all():
        return None
    return SlideFeatures(
        slide_id=slide_id_of(slide.path),
        slide_path=str(slide.path.resolve()),
        encoder=encoder.name,
        features=features.astype(np.float32, copy=False),
        coords=grid.coords,
        size_level0=grid.size_level0,
        mpp=grid.target_mpp,
    )


def _differs(stored: object, expected: object) -> bool:
    if isinstance(stored, bytes):
        stored = stored.decode()
    if isinstance(expected, float):
        try:
            return not np.isclose(float(stored), expected, equal_nan=True)
        except (TypeError, ValueError):
            return True
    return stored != expected
