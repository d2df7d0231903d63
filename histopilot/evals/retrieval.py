"""Search quality on a labelled set: does a patch (or slide) find others of its class?

The protocol is leave-one-out: every labelled patch of an index queries the index's labelled
patches (exact cosine search over their stored vectors, so the encoder is measured, not the
index's approximate structure, whose recall ``benchmarks/retrieval.py`` measures) with its own
slide left out. For an index of patch images each image is its own slide, so only itself is
left out; for patches cut from slides the whole slide is, so neighbours from the same slide
cannot flatter the score. Slide retrieval queries with each
slide's mosaic, as ``histopilot search --slide`` does. Scores are top-k accuracy, majority
vote at k (MV@k, which is k-NN accuracy) and its class-balanced form mMV@k.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

import numpy as np

from histopilot.errors import SearchIndexError
from histopilot.evals.card import ModelRecord, Stopwatch, run_card
from histopilot.evals.metrics import RetrievalScores, retrieval_scores
from histopilot.evals.outputs import Evaluation, Figure, Series, Table
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.patch_index import MANIFEST, METADATA, VECTORS, PatchIndex
from histopilot.retrieval.reference import add_labelled_images, read_labels
from histopilot.retrieval.search import mosaic, search_slides
from histopilot.retrieval.vectors import build_faiss_index, search

Level = Literal["patch", "slide"]
#: Slides with at most this many labelled patches are searched in batches (see
#: ``_patch_queries``); larger ones one slide at a time.
BATCHED_SLIDE_PATCHES = 64
QUERY_BATCH = 4096


def evaluate_image_folder(
    folder: Path,
    labels: Path | None,
    encoder: PatchEncoder,
    *,
    k: Sequence[int],
    models: list[ModelRecord],
    options: dict[str, Any],
) -> Evaluation:
    """Embed a folder of labelled patch images into a scratch index and evaluate it."""
    clock = Stopwatch()
    images = read_labels(folder, labels)
    with tempfile.TemporaryDirectory(prefix="histopilot-eval-") as scratch:
        index = PatchIndex.create(Path(scratch) / "index", encoder=encoder.name, dim=encoder.dim)
        add_labelled_images(index, encoder, images)
        data = [labels or folder / "labels.csv", *(image.path for image in images)]
        return evaluate_index(
            index, level="patch", k=k, models=models, options=options, clock=clock, data=data
        )


def evaluate_index(
    index: PatchIndex,
    *,
    level: Level,
    k: Sequence[int],
    models: list[ModelRecord],
    options: dict[str, Any],
    clock: Stopwatch | None = None,
    data: list[Path] | None = None,
) -> Evaluation:
    """Leave-one-out retrieval over the labelled patches (or slides) of ``index``."""
    clock = clock or Stopwatch()
    k = sorted(set(k))
    patches = index.labelled_patches()
    if not patches:
        raise SearchIndexError(
            f"the index at {index.path} has no labelled patches to evaluate; build it with "
            "`histopilot index images FOLDER` or `histopilot index build SLIDES --label L`"
        )
    query = _patch_queries if level == "patch" else _slide_queries
    queries, truth, ranked, similarities = query(index, patches, max(k))
    scores = retrieval_scores(truth, ranked, similarities, k=k)
    return Evaluation(
        task="retrieval",
        scores={"level": level, "encoder": index.encoder, **scores.model_dump()},
        notes=[
            f"leave-one-out {level} retrieval through the index (cosine, encoder "
            f"{index.encoder}); the query's own slide is left out of its results",
            "acc@k: the label among the first k results; MV@k: the majority of the first k "
            "has the label (k-NN accuracy); mMV@k: MV@k averaged per class, then over classes",
        ],
        tables=[_table(scores, level), _class_table(truth, ranked, similarities, k)],
        figures=[_figure(scores)],
        items=[
            {"query": query, "label": label, "ranked": labels}
            for query, label, labels in zip(queries, truth, ranked, strict=True)
        ],
        card=run_card(
            "retrieval",
            clock,
            data=data or [index.path / name for name in (MANIFEST, METADATA, VECTORS)],
            records=len(truth),
            options=options,
            models=models,
        ),
    )


def _patch_queries(index: PatchIndex, patches, k: int):
    """Each labelled patch searches the labelled patches (exact cosine) with its own slide's
    patches left out.

    Patches of small slides (every patch image is a slide of one) are searched in batches
    that ask for as many extra results as the largest slide in the batch has patches, dropping
    their own; the patches of larger slides are searched slide by slide, excluded inside the
    search.
    """
    slides = [row[1] for row in patches]
    vectors = index.vectors([row[0] for row in patches])
    exact = build_faiss_index(vectors, kind="flat")
    sizes = Counter(slides)
    positions = {slide: [] for slide in sizes}
    for position, slide in enumerate(slides):
        positions[slide].append(position)
    found: dict[int, tuple[list[int], list[float]]] = {}
    small = [p for p, slide in enumerate(slides) if sizes[slide] <= BATCHED_SLIDE_PATCHES]
    for start in range(0, len(small), QUERY_BATCH):
        batch = small[start : start + QUERY_BATCH]
        depth = k + max(sizes[slides[p]] for p in batch)
        scores, hits = search(exact, vectors[batch], depth)
        for position, row_scores, row_hits in zip(batch, scores, hits, strict=True):
            kept = [
                (int(h), float(s))
                for h, s in zip(row_hits, row_scores, strict=True)
                if h >= 0 and slides[h] != slides[position]
            ][:k]
            found[position] = ([h for h, _ in kept], [s for _, s in kept])
    for slide, own in positions.items():
        if sizes[slide] > BATCHED_SLIDE_PATCHES:
            scores, hits = search(exact, vectors[own], k, exclude=np.array(own))
            for position, row_scores, row_hits in zip(own, scores, hits, strict=True):
                kept = [
                    (int(h), float(s)) for h, s in zip(row_hits, row_scores, strict=True) if h >= 0
                ]
                found[position] = ([h for h, _ in kept], [s for _, s in kept])
    return (
        [f"{row[1]}#{row[0]}" for row in patches],
        [row[2] for row in patches],
        [[patches[h][2] for h in found[p][0]] for p in range(len(patches))],
        [found[p][1] for p in range(len(patches))],
    )


def _slide_queries(index: PatchIndex, patches, k: int):
    """Each labelled slide searches with its mosaic for other slides (itself left out)."""
    labels = {entry.slide_id: entry.label for entry in index.slides()}
    queries, truth, ranked, similarities = [], [], [], []
    for slide_id, group in groupby(patches, key=lambda row: row[1]):
        rows = list(group)
        features = index.vectors([row[0] for row in rows])
        coords = np.array([[row[3], row[4]] for row in rows])
        hits = search_slides(index, features[mosaic(features, coords)], k=k, exclude_slide=slide_id)
        queries.append(slide_id)
        truth.append(labels[slide_id])
        ranked.append([hit.label or "" for hit in hits])
        similarities.append([hit.median_similarity for hit in hits])
    return queries, truth, ranked, similarities


def _table(scores: RetrievalScores, level: str) -> Table:
    return Table(
        title=f"{level.capitalize()} retrieval ({scores.count} queries)",
        header=["k", "acc@k", "MV@k", "mMV@k"],
        rows=[
            [
                k,
                scores.accuracy_at_k[k],
                scores.majority_vote_at_k[k],
                scores.mean_majority_vote_at_k[k],
            ]
            for k in scores.k
        ],
    )


def _class_table(truth, ranked, similarities, ks: Sequence[int]) -> Table:
    """MV@k per class, to see which classes the encoder confuses."""
    rows = []
    for label in sorted(set(truth)):
        mine = [i for i, t in enumerate(truth) if t == label]
        scores = retrieval_scores(
            [label] * len(mine), [ranked[i] for i in mine], [similarities[i] for i in mine], k=ks
        )
        rows.append([label, len(mine), *(scores.majority_vote_at_k[k] for k in scores.k)])
    return Table(
        title="MV@k per class", header=["class", "queries", *(f"MV@{k}" for k in ks)], rows=rows
    )


def _figure(scores: RetrievalScores) -> Figure:
    return Figure(
        name="retrieval",
        kind="line",
        title="Retrieval quality against k",
        x_label="k",
        y_label="score",
        y_range=(0.0, 1.0),
        series=[
            Series(name=name, x=list(scores.k), y=[values[k] for k in scores.k])
            for name, values in (
                ("acc@k", scores.accuracy_at_k),
                ("MV@k", scores.majority_vote_at_k),
                ("mMV@k", scores.mean_majority_vote_at_k),
            )
        ],
    )
