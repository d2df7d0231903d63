"""Cohort throughput: slides per hour for the local and Ray engines, 1 and 2 workers.

The cohort is the shared brightfield slides (CMU-1, two TCGA sections, the IHC kidney), each
listed ``--copies`` times under its own id, indexed with the offline encoder at the slides'
own resolution (the TCGA sections, which do not declare it, at 0.5 µm/px as scanned at 20×;
the kidney thumbnail at 4 µm/px). Each run
writes into a fresh folder, so every slide is embedded from scratch.

Runs, all in this process's run, on the same cohort:

- **sequential** (the peer): the loop a script would write without ``histopilot batch``, one
  process, the encoder loaded once, each slide embedded and added to one patch index;
- **local** with 1 and 2 worker processes; **ray** with 1 and 2 actors on a local Ray cluster
  (started once; its start-up is reported apart and not counted in the runs).

Printed: wall time, slides per hour, the ratio to the sequential loop, the scaling from 1 to 2
workers, where a slide's time goes (reading tiles on one core, encoding them, the driver's
recording of each result), and a projection to N GPU workers. The projection is arithmetic on
those measured costs plus stated assumptions (``--tiles-per-slide``, ``--gpu-tiles-per-second``,
``--cores-per-worker``); nothing in it was run on a GPU here. About 6 minutes on 2 cores:

    python benchmarks/batch.py [--copies 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histopilot.batch import BatchOptions, run_cohort
from histopilot.batch.store import CohortStore
from histopilot.config import HistopilotConfig
from histopilot.retrieval.encoders import load_encoder
from histopilot.retrieval.features import embed_slide
from histopilot.retrieval.patch_index import PatchIndex
from histopilot.slide import open_slide
from histopilot.slide.tiling import iter_tiles, tile_grid

DATA = Path(os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))
#: (file, declared µm/px: None where the file says it)
SLIDES = (
    ("CMU-1-Small-Region.svs", None),
    ("tcga-cr-7395-01a-01-ts1.svs", 0.5),
    ("dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm", 0.5),
    ("idr0073-kidney-48-5-ihc-thumbnail.tif", 4.0),
)


def write_manifest(folder: Path, copies: int) -> tuple[Path, list[tuple[str, Path, float | None]]]:
    rows = [
        (f"{Path(name).stem[:24]}-{copy}", DATA / "wsi" / name, mpp)
        for copy in range(copies)
        for name, mpp in SLIDES
    ]
    manifest = folder / "cohort.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "mpp"])
        writer.writerows([ident, path, "" if mpp is None else mpp] for ident, path, mpp in rows)
    return manifest, rows


def sequential(rows, out: Path) -> float:
    """The peer: a plain loop in this process."""
    started = time.perf_counter()
    encoder = load_encoder("offline")
    index = None
    for ident, path, mpp in rows:
        with open_slide(path, mpp=mpp) as slide:
            features = embed_slide(slide, encoder)
        if index is None:
            index = PatchIndex.create(out, encoder=encoder.name, dim=encoder.dim)
        index.add_slide(replace(features, slide_id=ident))
    return time.perf_counter() - started


def costs_per_tile(rows) -> dict[str, float]:
    """Seconds per tile for reading and tiling on one core (no encoder) and for the offline
    encoder, over the cohort's first copy."""
    encoder = load_encoder("offline")
    reading = encoding = 0.0
    tiles = 0
    for _ident, path, mpp in rows[: len(SLIDES)]:
        with open_slide(path, mpp=mpp) as slide:
            started = time.perf_counter()
            grid = tile_grid(slide, mpp=encoder.mpp, tile_size=encoder.tile_size, min_tissue=0.5)
            batches = list(iter_tiles(slide, grid, batch_size=64, workers=1))
            reading += time.perf_counter() - started
            started = time.perf_counter()
            for batch in batches:
                encoder.encode_images(batch.images, batch_size=64)
            encoding += time.perf_counter() - started
            tiles += len(grid)
    return {"read_one_core": reading / tiles, "encode_offline": encoding / tiles, "tiles": tiles}


class TimedRecording:
    """Adds up the driver's time in ``CohortStore.record`` (results, files, index inserts):
    the part of a cohort run that does not spread over workers."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._record = CohortStore.record

    def __enter__(self) -> TimedRecording:
        def timed(store, item, outcome):
            started = time.perf_counter()
            self._record(store, item, outcome)
            self.seconds += time.perf_counter() - started

        CohortStore.record = timed
        return self

    def __exit__(self, *exc) -> None:
        CohortStore.record = self._record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=2, help="Copies of each slide.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument(
        "--tiles-per-slide",
        type=int,
        default=10_000,
        help="Projection: tissue tiles of a slide (a 20x resection, 224-px tiles at 0.5 µm/px).",
    )
    parser.add_argument(
        "--gpu-tiles-per-second",
        type=float,
        default=466.0,
        help="Projection: one GPU's encoder throughput (ViT-B/16 end to end, measured once on "
        "an H200; docs/performance.md).",
    )
    parser.add_argument(
        "--cores-per-worker", type=int, default=8, help="Projection: CPU cores beside each GPU."
    )
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="histopilot-batch-bench-"))
    manifest, rows = write_manifest(work, args.copies)
    options = BatchOptions(task="index", config=HistopilotConfig())
    slides = len(rows)
    print(f"{slides} slides ({args.copies} copies of {len(SLIDES)}), index task, offline encoder")

    figures: dict[str, dict] = {}
    seconds = sequential(rows, work / "sequential")
    figures["sequential"] = {"workers": 1, "seconds": seconds}

    for workers in (1, 2):
        with TimedRecording() as recording:
            summary = run_cohort([manifest], options, work / f"local-{workers}", workers=workers)
        assert summary.done == slides, summary.items
        figures[f"local-{workers}"] = {"workers": workers, "seconds": summary.seconds}
    indexed_tiles = len(PatchIndex.open(work / "local-2" / "index"))
    driver_per_tile = recording.seconds / indexed_tiles

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    try:
        for workers in (1, 2):
            summary = run_cohort(
                [manifest], options, work / f"ray-{workers}", engine="ray", workers=workers
            )
            assert summary.done == slides, summary.items
            figures[f"ray-{workers}"] = {"workers": workers, "seconds": summary.seconds}
    finally:
        ray.shutdown()

    base = figures["sequential"]["seconds"]
    print("\n| run | workers | seconds | slides/hour | × sequential |\n|---|---:|---:|---:|---:|")
    for name, figure in figures.items():
        figure["slides_per_hour"] = 3600 * slides / figure["seconds"]
        figure["ratio"] = base / figure["seconds"]
        print(
            f"| {name} | {figure['workers']} | {figure['seconds']:.1f} | "
            f"{figure['slides_per_hour']:.0f} | {figure['ratio']:.2f} |"
        )
    print(f"(Ray's local cluster took {ray_start:.1f} s to start, not counted above.)")
    scaling = {
        engine: figures[f"{engine}-2"]["slides_per_hour"]
        / figures[f"{engine}-1"]["slides_per_hour"]
        for engine in ("local", "ray")
    }
    print(f"\nscaling 1 → 2 workers: local {scaling['local']:.2f}×, ray {scaling['ray']:.2f}×")
    ray_over_local = figures["ray-2"]["seconds"] / figures["local-2"]["seconds"]
    print(f"ray / local at 2 workers: {ray_over_local:.2f}× the time")

    cost = costs_per_tile(rows)
    print(
        f"\nper tile: {1000 * cost['read_one_core']:.2f} ms reading and tiling on one core, "
        f"{1000 * cost['encode_offline']:.2f} ms in the offline encoder, "
        f"{1000 * driver_per_tile:.3f} ms recording in the driver ({indexed_tiles} tiles indexed)"
    )

    # Projection: a GPU worker encodes at --gpu-tiles-per-second while its cores read tiles in
    # parallel (the slower of the two sets its pace); the driver records results one at a time.
    tiles, gpu_rate = args.tiles_per_slide, args.gpu_tiles_per_second
    read_rate = args.cores_per_worker / cost["read_one_core"]
    worker_seconds = tiles / min(gpu_rate, read_rate)
    driver_cap = 3600 / (tiles * driver_per_tile)
    print(
        f"\nprojection for {tiles:,} tiles a slide: a worker with one GPU ({gpu_rate:g} tiles/s, "
        f"assumed) and {args.cores_per_worker} cores ({read_rate:,.0f} tiles/s read, measured "
        f"per core here) takes {worker_seconds:.0f} s a slide; the driver records at most "
        f"{driver_cap:,.0f} slides/hour."
    )
    print("| GPU workers | slides/hour | slides/day | limited by |\n|---:|---:|---:|---|")
    projection = {}
    for workers in (1, 2, 4, 8, 16, 32, 64):
        rate = min(workers * 3600 / worker_seconds, driver_cap)
        projection[workers] = rate
        limit = "driver" if rate == driver_cap else ("reading" if read_rate < gpu_rate else "GPU")
        print(f"| {workers} | {rate:,.0f} | {24 * rate:,.0f} | {limit} |")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "slides": slides,
                    "runs": figures,
                    "ray_start_seconds": ray_start,
                    "scaling": scaling,
                    "per_tile": cost | {"driver": driver_per_tile},
                    "projection": {
                        "tiles_per_slide": tiles,
                        "gpu_tiles_per_second": gpu_rate,
                        "cores_per_worker": args.cores_per_worker,
                        "slides_per_hour": projection,
                    },
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
