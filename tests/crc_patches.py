"""The 32 labelled CRC-VAL-HE-7K patches as training data: readable tissue names for captions,
and a split that keeps each patch on one side."""

from __future__ import annotations

import csv
from pathlib import Path

TISSUE = {
    "ADI": "adipose tissue", "DEB": "necrotic debris", "LYM": "lymphocytes", "MUC": "mucus",
    "MUS": "smooth muscle", "NORM": "normal colonic mucosa", "STR": "tumour stroma",
    "TUM": "adenocarcinoma epithelium",
}  # fmt: skip


def crc_rows(test_data: Path) -> tuple[Path, list[dict]]:
    """The patch folder and its labels.csv rows."""
    patches = test_data / "patches" / "crc_val_he_7k"
    with (patches / "labels.csv").open() as handle:
        return patches, list(csv.DictReader(handle))


def split_by_patch(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The first two patches of each class on one side, the other two on the other."""
    first, second, seen = [], [], {}
    for row in rows:
        seen[row["label"]] = seen.get(row["label"], 0) + 1
        (first if seen[row["label"]] <= 2 else second).append(row)
    return first, second


def caption_table(path: Path, rows: list[dict], template: str = "{}") -> Path:
    """A caption table (image, caption, label) with each patch captioned from its label."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "label"])
        for row in rows:
            writer.writerow([row["file"], template.format(TISSUE[row["label"]]), row["label"]])
    return path
