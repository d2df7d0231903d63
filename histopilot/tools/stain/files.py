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

from histopilot.slide import open_slide
from histopilot.slide.render import save_png
from histopilot.slide.tiling import iter_tiles, tile_grid
from histopilot.storage import atomic_file
from histopilot.tools.images import IMAGE_SUFFIXES, list_images, read_rgb
from histopilot.tools.stain.augment import Jitter, augment_stains
from histopilot.tools.stain.normalizer import StainBatch

# Whole-slide formats; plain TIFF/PNG inputs are read as tiles.
SLIDE_SUFFIXES = frozenset(
    {".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide", ".dcm", ".qptiff"}
)


@dataclass(frozen=True)
class Tile:
    name: str  # output path relative to the output folder, without suffix
    source: str  # file, or slide file with level-0 coordinates
    image: np.ndarray


@dataclass(frozen=True)
class SlideTiling:
    """How slides are cut into tiles for the stain tools."""

    tile_size: int = 512
    mpp: float = 0.5
    min_tissue: float = 0.5
    max_tiles: int | None = None


def iter_inputs(inputs: Iterable[str | Path], tiling: SlideTiling) -> Iterator[Tile]:
    """Tiles from image files, folders of them (recursively) and slides, in a stable order."""
    for item in map(Path, inputs):
        if item.is_file() and item.suffix.lower() in SLIDE_SUFFIXES:
            yield from _slide_tiles(item, tiling)
            continue
        base = item if item.is_dir() else item.parent
        for path in list_images([item]):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            name = path.relative_to(base).with_suffix("").as_posix()
            yield Tile(name=name, source=str(path), image=read_rgb(path))


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


def process_files(
    tiles: Iterable[Tile],
    transform: Callable[[np.ndarray], StainBatch],
    out: Path,
    *,
    batch_size: int = 64,
    suffix: str = "",
    on_tile: Callable[[], None] | None = None,
) -> Counter:
    """Run ``transform`` on same-sized batches of ``tiles`` and write PNGs plus ``stain.csv``.

    Returns how many tiles got each flag.
    """
    rows: list[tuple[str, str, str]] = []
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
        pending[tile.image.shape].append(tile)
        if len(pending[tile.image.shape]) >= batch_size:
            flush(tile.image.shape)
    for shape in list(pending):
        flush(shape)
    with atomic_file(out / "stain.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("source", "output", "flag"))
        writer.writerows(sorted(rows, key=lambda row: row[1]))
    return Counter(flag for _, _, flag in rows)


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
