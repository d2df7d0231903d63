"""Stain tools over files: folders of tiles and the tissue tiles of slides, in batches.

Outputs mirror the inputs' names under one folder (a slide's tiles go to a folder named after
the slide), and ``stain.csv`` lists every source, output and flag so a run can be audited.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histopilot.errors import ImageInputError
from histopilot.slide import open_slide
from histopilot.slide.readers import WHOLE_SLIDE_SUFFIXES
from histopilot.slide.render import save_png
from histopilot.slide.tiling import iter_tiles, tile_grid
from histopilot.storage import atomic_file
from histopilot.tools.images import IMAGE_SUFFIXES, MAX_PIXELS, list_images, read_rgb
from histopilot.tools.stain.augment import Jitter, augment_stains
from histopilot.tools.stain.normalizer import StainBatch


@dataclass(frozen=True)
class Tile:
    name: str  # output path relative to the output folder, without suffix
    source: str  # file, or slide file with level-0 coordinates
    image: np.ndarray | None  # None when the file could not be used; see ``problem``
    problem: str | None = None


@dataclass(frozen=True)
class SlideTiling:
    """How slides are cut into tiles for the stain tools."""

    tile_size: int = 512
    mpp: float = 0.5
    min_tissue: float = 0.5
    max_tiles: int | None = None


def iter_inputs(inputs: Iterable[str | Path], tiling: SlideTiling) -> Iterator[Tile]:
    """Tiles from image files, folders of them (recursively) and slides, in a stable order.

    A file that cannot be used becomes a tile with its ``problem`` instead of stopping the run.
    Output names are unique: a name already taken gets ``~2``, ``~3`` … appended.
    """
    taken: set[str] = set()
    for tile in _tiles(inputs, tiling):
        name, number = tile.name, 1
        while name in taken:
            number += 1
            name = f"{tile.name}~{number}"
        taken.add(name)
        yield Tile(name, tile.source, tile.image, tile.problem)


def _tiles(inputs: Iterable[str | Path], tiling: SlideTiling) -> Iterator[Tile]:
    for item in map(Path, inputs):
        if item.is_file() and _is_slide(item):
            yield from _slide_tiles(item, tiling)
            continue
        base = item if item.is_dir() else item.parent
        for path in list_images([item]):
            name = path.relative_to(base).with_suffix("").as_posix()
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                yield Tile(name, str(path), None, "not an image file (PNG, JPEG, TIFF …)")
                continue
            try:
                yield Tile(name, str(path), read_rgb(path))
            except ImageInputError as error:
                yield Tile(name, str(path), None, str(error))


def _is_slide(path: Path) -> bool:
    """Slide formats by suffix; a TIFF too large to be a tile is read as a slide too."""
    suffix = path.suffix.lower()
    if suffix in WHOLE_SLIDE_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff"):
        return False
    try:
        with Image.open(path) as header:
            return header.width * header.height > MAX_PIXELS
    except (OSError, Image.DecompressionBombError):
        return True  # let the slide readers say what is wrong with it


def _slide_tiles(path: Path, tiling: SlideTiling) -> Iterator[Tile]:
    with open_slide(path) as slide:
        grid = tile_grid(
            slide, mpp=tiling.mpp, tile_size=tiling.tile_size, min_tissue=tiling.min_tissue
        )
        emitted = 0
        for batch in iter_tiles(slide, grid):
            for image, (x, y) in zip(batch.images, batch.coords, strict=True):
                if tiling.max_tiles is not None and emitted >= tiling.max_tiles:
                    return
                emitted += 1
                yield Tile(f"{path.stem}/x{x}_y{y}", f"{path}@{x},{y}", image)


Row = tuple[str, str, str]  # source, output (relative to the output folder), flag


def process_files(
    tiles: Iterable[Tile],
    transform: Callable[[np.ndarray], StainBatch],
    out: Path,
    *,
    batch_size: int = 64,
    suffix: str = "",
    on_tile: Callable[[], None] | None = None,
) -> list[Row]:
    """Run ``transform`` on same-sized batches of ``tiles``, write PNGs, return manifest rows.

    A tile that could not be read is recorded with the flag ``unreadable: <why>``.
    """
    rows: list[Row] = []
    pending: dict[tuple[int, ...], list[Tile]] = defaultdict(list)

    def flush(shape: tuple[int, ...]) -> None:
        group = pending.pop(shape)
        result = transform(np.stack([tile.image for tile in group]))
        for tile, image, flag in zip(group, result.images, result.flags, strict=True):
            target = out / f"{tile.name}{suffix}.png"
            save_png(image, target)
            rows.append((tile.source, target.relative_to(out).as_posix(), flag))
            if on_tile:
                on_tile()

    for tile in tiles:
        if tile.image is None:
            rows.append((tile.source, "", f"unreadable: {tile.problem}"))
            continue
        pending[tile.image.shape].append(tile)
        if len(pending[tile.image.shape]) >= batch_size:
            flush(tile.image.shape)
    for shape in list(pending):
        flush(shape)
    return rows


def write_manifest(out: Path, rows: list[Row]) -> Counter:
    """``out/stain.csv`` (source, output, flag per tile); returns how many got each flag."""
    if not rows:
        raise ImageInputError("the inputs hold no images or slide tiles to process")
    with atomic_file(out / "stain.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("source", "output", "flag"))
        writer.writerows(sorted(rows, key=lambda row: (row[1], row[0])))
    return Counter(flag.split(":")[0] for _, _, flag in rows)


def augment_with(
    method: str, jitter: Jitter, *, seed: int, copy: int, device: str
) -> Callable[[np.ndarray], StainBatch]:
    """A batch transform for :func:`process_files` that draws fresh stain changes per batch.

    Each batch's seed comes from (seed, copy, batch number), so no two batches or copies
    repeat the same changes and a rerun with the same seed writes the same files.
    """
    batches = iter(range(1 << 62))

    def transform(images: np.ndarray) -> StainBatch:
        state = np.random.SeedSequence([seed, copy, next(batches)]).generate_state(1)[0]
        return augment_stains(images, method, seed=int(state), jitter=jitter, device=device)

    return transform
