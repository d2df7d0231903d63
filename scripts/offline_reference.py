"""Regenerate the offline encoder's standardisation statistics from an H&E slide.

The shipped file was made from OpenSlide's CMU-1-Small-Region.svs (Aperio, 20x, CC0):

    python scripts/offline_reference.py ../shared/data/wsi/CMU-1-Small-Region.svs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from histopilot.retrieval.encoders import offline
from histopilot.slide import open_slide
from histopilot.slide.tiling import iter_tiles, tile_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", type=Path)
    parser.add_argument(
        "--out", type=Path, default=Path(offline.__file__).with_name(offline.REFERENCE_FILE)
    )
    args = parser.parse_args()
    encoder_mpp, size = offline.OfflineEncoder.mpp, offline.OfflineEncoder.tile_size
    with open_slide(args.slide) as slide:
        grid = tile_grid(slide, mpp=encoder_mpp, tile_size=size, min_tissue=0.5)
        batches = (batch.images for batch in iter_tiles(slide, grid, batch_size=64))
        path = offline.fit_reference(
            batches,
            args.out,
            source=f"{args.slide.name}: {len(grid)} tiles of {size} px at {encoder_mpp} µm/px",
        )
    print(f"wrote {path} from {len(grid)} tiles")


if __name__ == "__main__":
    main()
