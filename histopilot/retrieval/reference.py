"""A reference bank: labelled patches a lab trusts, and k-NN votes over them.

The bank is an ordinary :class:`~histopilot.retrieval.patch_index.PatchIndex` whose patches
carry labels (and the label's full name as caption), so it is built, inspected and repaired with
the same commands. It can hold patches cut from labelled slides (``histopilot index build
--label``) or a folder of labelled patch images with a CSV (``histopilot index images``), the way
tissue-class datasets such as Kather's CRC-VAL-HE-7K are distributed.

The offline agents read a region's tissue class from these votes: each of the ``k`` nearest
patches votes for its label with weight ``exp(similarity / temperature)``, so near neighbours
count more than the ``k``-th, and the vote shares are what the differential is built from.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from histopilot.errors import ImageInputError, SearchIndexError
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.patch_index import PatchIndex, PatchRecord
from histopilot.retrieval.search import load_query_image

VOTE_TEMPERATURE = 0.05
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str
    name: str | None
    mpp: float | None


def read_labels(folder: Path, labels_csv: Path | None) -> list[LabelledImage]:
    """The labelled images of ``folder``: from a CSV with ``file`` and ``label`` columns (and
    optional ``label_name`` and ``mpp``), or, without one, each file's name up to the first
    ``-`` or ``_`` (``TUM-0001.png`` → ``TUM``), the convention of tissue-class datasets."""
    if not folder.is_dir():
        raise ImageInputError(f"{folder} is not a folder of patch images.")
    if labels_csv is None and (folder / "labels.csv").is_file():
        labels_csv = folder / "labels.csv"
    if labels_csv is None:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [
            LabelledImage(p, p.stem.replace("_", "-").split("-")[0], None, None) for p in images
        ]
    try:
        with labels_csv.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ImageInputError(f"cannot read the labels file {labels_csv}: {error}") from error
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise ImageInputError(f"{labels_csv} needs a header with 'file' and 'label' columns.")
    found = []
    for number, row in enumerate(rows, 2):
        relative = Path(row["file"] or "")
        path = (folder / relative).resolve()
        if relative.is_absolute() or not path.is_relative_to(folder.resolve()):
            raise ImageInputError(f"{labels_csv}:{number}: {row['file']!r} is outside {folder}.")
        if not row["label"]:
            raise ImageInputError(f"{labels_csv}:{number}: the label is empty.")
        found.append(
            LabelledImage(path, row["label"], row.get("label_name") or None, _mpp(row, number))
        )
    return found


def _mpp(row: dict[str, str], number: int) -> float | None:
    text = (row.get("mpp") or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ImageInputError(f"line {number}: mpp must be a positive number, got {text!r}.")
    return value


def add_labelled_images(
    index: PatchIndex,
    encoder: PatchEncoder,
    images: list[LabelledImage],
    *,
    mpp: float | None = None,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Embed labelled images (rescaled from their µm/px to the encoder's when known) and add
    them to ``index``, each under its own file name as slide id. Returns how many were added."""
    added = 0
    present = {entry.slide_id for entry in index.slides()}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = [
            at_encoder_scale(load_query_image(item.path), item.mpp or mpp, encoder)
            for item in chunk
        ]
        vectors = encoder.encode_images(pixels, batch_size=batch_size)
        records = [
            PatchRecord(
                slide_id=item.path.name,
                slide_path=str(item.path),
                x=0,
                y=0,
                size=max(image.shape[:2]),
                mpp=item.mpp or mpp,
                label=item.label,
                caption=item.name,
            )
            for item, image in zip(chunk, pixels, strict=True)
        ]
        replaced = [record.slide_id for record in records if record.slide_id in present]
        if replaced:  # an image indexed before is replaced, as a re-added slide is
            index.remove_slides(replaced)
        index.add(vectors, records)
        added += len(records)
        if progress:
            progress(added, len(images))
    return added


def at_encoder_scale(image: np.ndarray, mpp: float | None, encoder: PatchEncoder) -> np.ndarray:
    """``image`` resampled from ``mpp`` µm/px to the encoder's (as is when unknown)."""
    if mpp is None or abs(mpp / encoder.mpp - 1) < 0.02:
        return image
    scale = mpp / encoder.mpp
    height, width = image.shape[:2]
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


class ReferenceBank:
    """k-NN votes over the labelled patches of an index."""

    def __init__(self, index: PatchIndex, *, k: int = 10) -> None:
        index.require_entries()
        rows = index.labels()
        if not rows:
            raise SearchIndexError(
                f"the index at {index.path} has no labelled patches, so it cannot serve as a "
                "reference bank; build one with `histopilot index images FOLDER --out DIR` or "
                "`histopilot index build SLIDES --label LABEL`."
            )
        self.index = index
        self.k = k
        self.labels: list[str] = [label for label, _, _ in rows]
        self.names: dict[str, str] = {label: name or label for label, name, _ in rows}
        self.counts: dict[str, int] = {label: count for label, _, count in rows}

    @classmethod
    def open(cls, path: str | Path, *, k: int = 10) -> ReferenceBank:
        return cls(PatchIndex.open(path), k=k)

    @property
    def encoder(self) -> str:
        return self.index.encoder

    def votes(self, vectors: np.ndarray) -> np.ndarray:
        """Vote shares (n, len(labels)), each row summing to 1, for query vectors (n, dim)."""
        vectors = np.atleast_2d(vectors)
        shares = np.zeros((len(vectors), len(self.labels)), np.float32)
        if len(vectors) == 0:
            return shares
        column = {label: i for i, label in enumerate(self.labels)}
        k = min(self.k, len(self.index))
        for row, hits in enumerate(self.index.search(vectors, k)):
            for hit in hits:
                if hit.label in column:
                    shares[row, column[hit.label]] += np.exp(hit.score / VOTE_TEMPERATURE)
        totals = shares.sum(1, keepdims=True)
        return np.divide(shares, totals, out=np.zeros_like(shares), where=totals > 0)

    def label_for(self, text: str) -> str | None:
        """The label a free-text target names: the label itself, or its full name as whole
        words in the text ("look for colorectal adenocarcinoma epithelium" → ``TUM``). A word
        that is only part of a name ("cancer" in "cancer-associated stroma") names nothing."""
        lowered = text.strip().lower()
        for label in self.labels:
            if label.lower() == lowered:
                return label
        for label in self.labels:
            name = self.names[label].lower()
            if name != label.lower() and re.search(rf"\b{re.escape(name)}\b", lowered):
                return label
        return None
