"""Tiling throughput: histopilot against a plain OpenSlide loop and LazySlide, in one run.

For each slide, all tissue tiles at 0.5 µm/px, 256 px, decoded to RGB arrays:

* read only — histopilot's threaded reader against the floor, a single-threaded
  ``openslide.read_region`` loop over the *same* coordinates (same level, same sizes);
* end to end — tissue detection + grid + reading, histopilot against LazySlide
  (``find_tissues`` → ``tile_tissues`` → ``iter.tile_images``), each with its own grid.

Also: tissue detection time on the thumbnail, and RSS growth when one slide is tiled 50 times
in this process. Run: ``python benchmarks/tiling.py`` (``pip install -e '.[bench]'`` first).
The JPEG 2000 TCGA slide declares no MPP; it is tiled as a 20x scan (``--slide-mpp 0.5``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import psutil

from histopilot.slide import detect_tissue, open_slide
from histopilot.slide.tiling import iter_tiles, tile_grid

DATA = Path(os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).parents[2] / "shared/data"))
SLIDES = {"CMU-1-Small-Region.svs": None, "tcga-cr-7395-01a-01-ts1.svs": 0.5}
TARGET_MPP, TILE = 0.5, 256


def best_of(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """Median seconds over ``repeats`` runs (after one warm-up) and the tile count."""
    count = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), count


def histopilot_read(path: Path, slide_mpp: float | None) -> tuple[Callable[[], int], np.ndarray]:
    slide = open_slide(path, mpp=slide_mpp)
    grid = tile_grid(slide, mpp=TARGET_MPP, tile_size=TILE)

    def run() -> int:
        return sum(len(batch.indices) for batch in iter_tiles(slide, grid))

    return run, grid


def plain_loop(path: Path, grid) -> Callable[[], int]:
    handle = openslide.OpenSlide(path)
    size = round(TILE * grid.downsample / handle.level_downsamples[grid.read_level])

    def run() -> int:
        for x, y in grid.coords:
            tile = handle.read_region((int(x), int(y)), grid.read_level, (size, size))
            np.asarray(tile.convert("RGB"))
        return len(grid.coords)

    return run


def histopilot_end_to_end(path: Path, slide_mpp: float | None) -> Callable[[], int]:
    def run() -> int:
        with open_slide(path, mpp=slide_mpp) as slide:
            grid = tile_grid(slide, mpp=TARGET_MPP, tile_size=TILE)
            return sum(len(batch.indices) for batch in iter_tiles(slide, grid))

    return run


def lazyslide_end_to_end(path: Path, slide_mpp: float | None) -> Callable[[], int]:
    import lazyslide as zs
    from wsidata import open_wsi

    def run() -> int:
        wsi = open_wsi(path, store=None)
        zs.pp.find_tissues(wsi)
        zs.pp.tile_tissues(wsi, TILE, mpp=TARGET_MPP, slide_mpp=slide_mpp)
        return sum(1 for tile in wsi.iter.tile_images("tiles") if tile.image.size)

    return run


def tissue_from_file(path: Path, slide_mpp: float | None) -> int:
    """Open the slide, read its thumbnail-scale overview, detect tissue."""
    with open_slide(path, mpp=slide_mpp) as slide:
        return len(detect_tissue(slide).polygons)


def rss_growth(path: Path, slide_mpp: float | None, rounds: int) -> float:
    process = psutil.Process()
    run = histopilot_end_to_end(path, slide_mpp)
    run()
    gc.collect()
    before = process.memory_info().rss
    for _ in range(rounds):
        run()
    gc.collect()
    return (process.memory_info().rss - before) / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rss-rounds", type=int, default=50)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    # Memory first, before the peer's imports and caches move the process's baseline.
    first = DATA / "wsi" / next(iter(SLIDES))
    growth = rss_growth(first, SLIDES[first.name], args.rss_rounds)
    rows = []
    for name, slide_mpp in SLIDES.items():
        path = DATA / "wsi" / name
        read, grid = histopilot_read(path, slide_mpp)
        t_hp, n_hp = best_of(args.repeats, read)
        t_plain, n_plain = best_of(args.repeats, plain_loop(path, grid))
        t_e2e, n_e2e = best_of(args.repeats, histopilot_end_to_end(path, slide_mpp))
        t_lazy, n_lazy = best_of(args.repeats, lazyslide_end_to_end(path, slide_mpp))
        t_tissue, _ = best_of(args.repeats, lambda p=path, m=slide_mpp: tissue_from_file(p, m))
        rows.append(
            (
                name,
                n_hp,
                n_hp / t_hp,
                n_plain / t_plain,
                n_e2e / t_e2e,
                n_lazy,
                n_lazy / t_lazy,
                t_tissue,
            )
        )
    print(
        f"{os.cpu_count()} CPU cores; {args.repeats} timed runs each, median; "
        f"tiles of {TILE} px at {TARGET_MPP} µm/px decoded to RGB arrays\n"
    )
    print(
        "| slide | tiles | histopilot read (tiles/s) | plain OpenSlide loop | ratio | "
        "histopilot end-to-end | LazySlide end-to-end (tiles) | ratio | tissue (read + detect) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, hp, plain, e2e, n_lazy, lazy, t_tissue in rows:
        print(
            f"| {name} | {n} | {hp:.0f} | {plain:.0f} | {hp / plain:.2f}x | {e2e:.0f} | "
            f"{lazy:.0f} ({n_lazy}) | {e2e / lazy:.2f}x | {t_tissue * 1000:.0f} ms |"
        )
    print(f"\nRSS growth over {args.rss_rounds} end-to-end runs on {first.name}: {growth:.1f} MB")


if __name__ == "__main__":
    main()
