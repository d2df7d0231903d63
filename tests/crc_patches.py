"""The 32 labelled CRC-VAL-HE-7K patches as training and evaluation data: readable tissue
names for captions, a split that keeps each patch on one side, and tissue-class questions."""

from __future__ import annotations

import csv
from pathlib import Path

TISSUE = {
    "ADI": "adipose tissue",
    "DEB": "necrotic debris",
    "LYM": "lymphocytes",
    "MUC": "mucus",
    "MUS": "smooth muscle",
    "NORM": "normal colonic mucosa",
    "STR": "tumour stroma",
    "TUM": "adenocarcinoma epithelium",
}


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


def vqa_questions(rows: list[dict], names: dict[str, str]) -> list[dict]:
    """Four questions per patch about its tissue class: "Is this <its class>?" (yes), "Is this
    <the next class>?" (no), four lettered options with the right one in turn at A, B, C and
    D, and an open "What tissue is this?"."""
    classes = sorted(names)
    questions = []
    for number, row in enumerate(rows):
        label, name = row["label"], names[row["label"]]
        others = [names[c] for c in classes if c != label]
        other = names[classes[(classes.index(label) + 1) % len(classes)]]
        start = number % len(others)
        options = (others[start:] + others[:start])[:3]
        options.insert(number % 4, name)
        ask = {"image": row["file"]}
        questions += [
            ask | {"id": f"{number}-yes", "question": f"Is this {name}?", "answer": "yes"},
            ask | {"id": f"{number}-no", "question": f"Is this {other}?", "answer": "no"},
            ask
            | {
                "id": f"{number}-mc",
                "question": "Which tissue is shown?",
                "choices": [f"{'ABCD'[i]}) {o}" for i, o in enumerate(options)],
                "answer": "ABCD"[options.index(name)],
            },
            ask | {"id": f"{number}-open", "question": "What tissue is this?", "answer": name},
        ]
    return questions
