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
workers, where each slide's time goes (reading tiles against encoding them), and a projection
to N workers with its assumptions. About 4 minutes on 2 cores:

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


def read_share(rows) -> tuple[float, float, int]:
    """Seconds spent reading and tiling (no encoder), seconds encoding, and tiles, per slide
    of the cohort's first copy."""
    encoder = load_encoder("offline")
    reading = encoding = 0.0
    tiles = 0
    firsts = rows[: len(SLIDES)]
    for _ident, path, mpp in firsts:
        with open_slide(path, mpp=mpp) as slide:
            started = time.perf_counter()
            grid = tile_grid(slide, mpp=encoder.mpp, tile_size=encoder.tile_size, min_tissue=0.5)
            batches = list(iter_tiles(slide, grid, batch_size=64))
            reading += time.perf_counter() - started
            started = time.perf_counter()
            for batch in batches:
                encoder.encode_images(batch.images, batch_size=64)
            encoding += time.perf_counter() - started
            tiles += len(grid)
    count = len(firsts)
    return reading / count, encoding / count, tiles // count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=2, help="Copies of each slide.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
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
        summary = run_cohort([manifest], options, work / f"local-{workers}", workers=workers)
        assert summary.done == slides, summary.items
        figures[f"local-{workers}"] = {"workers": workers, "seconds": summary.seconds}

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

    reading, encoding, tiles = read_share(rows)
    per_slide = figures["local-1"]["seconds"] / slides
    print(
        f"\nper slide, one worker: {per_slide:.2f} s in the batch; {tiles} tiles, "
        f"{reading:.2f} s reading and tiling, {encoding:.2f} s encoding (offline encoder)"
    )
    efficiency = scaling["local"] / 2
    print(
        "\nprojection (assumptions: each worker a GPU or core set of its own with the per-slide "
        f"cost measured here; the 1 → 2 worker efficiency ({efficiency:.2f}) holds per doubling; "
        "storage and the driver keep up):"
    )
    print("| workers | slides/hour | slides/day |\n|---:|---:|---:|")
    projection = {}
    for workers in (1, 2, 4, 8, 16, 32, 64):
        doublings = max(0.0, (workers.bit_length() - 1))
        rate = figures["local-1"]["slides_per_hour"] * workers * efficiency**doublings
        projection[workers] = rate
        print(f"| {workers} | {rate:,.0f} | {24 * rate:,.0f} |")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "slides": slides,
                    "runs": figures,
                    "ray_start_seconds": ray_start,
                    "scaling": scaling,
                    "per_slide": {"reading": reading, "encoding": encoding, "tiles": tiles},
                    "projection": projection,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
