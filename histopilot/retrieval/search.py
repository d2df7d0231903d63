"""Similar-tissue search: patches by image, slide region or text, and slides by slide.

Patch queries embed the query with the index's own encoder and return the nearest patches.
Slide queries follow Yottixel (Kalra et al., Med Image Anal 2020): a *mosaic* of a few
representative patches stands for the query slide (cluster the patches by appearance, then pick
spread-out patches within each cluster), every mosaic patch searches the index, and slides are
ranked by how many mosaic patches vote for them (majority of each patch's top-k), ties broken
by the median of each mosaic patch's best similarity to that slide.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Self

import numpy as np
from pydantic import BaseModel, Field, model_validator
from scipy.cluster.vq import kmeans2

from histopilot.errors import RegionError
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.features import SlideFeatures
from histopilot.retrieval.patch_index import PatchHit, PatchIndex
from histopilot.slide import Slide, open_slide
from histopilot.tools.images import read_rgb

#: Query images beyond this many pixels are refused before decoding (below Pillow's own
#: decompression-bomb limit, so the message is ours); query a slide region instead.
QUERY_HINT = "crop it, or query a region of the slide with --slide/--region"
MAX_QUERY_PIXELS = 64_000_000
#: Yottixel's mosaic: 9 appearance clusters, 5 % of each cluster's patches (at least one).
MOSAIC_CLUSTERS, MOSAIC_FRACTION = 9, 0.05
#: Region queries beyond this many encoder tiles are refused (a 20 x 20 tile field at 0.5
#: µm/px is 2.2 mm across, far more than "a region").
MAX_REGION_TILES = 400


class PatchQuery(BaseModel):
    """Find indexed patches that look like an image, a slide region or a description."""

    image_path: str | None = Field(None, description="An image file to match.")
    slide_path: str | None = Field(None, description="A slide; give region too.")
    region: tuple[int, int, int, int] | None = Field(
        None, description="Level-0 x, y, width, height of the region of slide_path to match."
    )
    text: str | None = Field(None, description="A description, e.g. 'tumour with necrosis'.")
    k: int = Field(5, ge=1, le=1000, description="How many patches to return.")

    @model_validator(mode="after")
    def _one_query(self) -> Self:
        if self.region is not None and self.slide_path is None:
            raise ValueError("a region needs the slide it belongs to (slide_path)")
        if (self.slide_path is None) != (self.region is None):
            raise ValueError("a slide query needs the region to match (region)")
        given = [self.image_path is not None, self.slide_path is not None, self.text is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one query: an image, a slide region or a text")
        return self


def query_vectors(
    query: PatchQuery, encoder: PatchEncoder, *, slide_mpp: float | None = None
) -> np.ndarray:
    """The query embedded by ``encoder``: one vector, or one per tile of a slide region."""
    if query.text is not None:
        return encoder.encode_text([query.text])
    if query.image_path is not None:
        return encoder.encode_images([load_query_image(query.image_path)])
    with open_slide(Path(query.slide_path), mpp=slide_mpp) as slide:
        return encoder.encode_images(region_tiles(slide, encoder, *query.region))


class SlideHit(BaseModel):
    """A slide ranked by how much of the query it matches."""

    slide_id: str
    slide_path: str
    rank: int
    votes: int
    vote_share: float
    median_similarity: float
    label: str | None
    best_patches: list[PatchHit]


def load_query_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8, refused when it is too large to be a query."""
    return read_rgb(path, max_pixels=MAX_QUERY_PIXELS, too_large_hint=QUERY_HINT, grayscale=True)


def region_tiles(
    slide: Slide, encoder: PatchEncoder, x: int, y: int, width: int, height: int
) -> list[np.ndarray]:
    """A level-0 region read at the encoder's resolution and cut into its tile size.

    A region smaller than one tile is returned as a single image (the encoder resizes it).
    """
    downsample = encoder.mpp / slide.require_mpp("a region query at the encoder's resolution")
    out_width, out_height = round(width / downsample), round(height / downsample)
    if out_width < 8 or out_height < 8:
        raise RegionError(f"the region {width}x{height} px is too small to embed.")
    size = encoder.tile_size
    if out_width * out_height > MAX_REGION_TILES * size * size:
        raise RegionError(
            f"the region covers more than {MAX_REGION_TILES} tiles at {encoder.mpp} µm/px; "
            "query a smaller region, or search by the whole slide without --region."
        )
    pixels = slide.read_region_at(x, y, out_width, out_height, downsample=downsample)
    if out_width < size or out_height < size:
        return [pixels]
    return [
        pixels[top : top + size, left : left + size]
        for top in range(0, out_height - size + 1, size)
        for left in range(0, out_width - size + 1, size)
    ]


def merge_hits(hit_lists: list[list[PatchHit]], k: int) -> list[PatchHit]:
    """One ranking from several queries' hits: each patch keeps its best score."""
    best: dict[int, PatchHit] = {}
    for hits in hit_lists:
        for hit in hits:
            if hit.id not in best or hit.score > best[hit.id].score:
                best[hit.id] = hit
    ranked = sorted(best.values(), key=lambda hit: -hit.score)[:k]
    return [hit.model_copy(update={"rank": rank}) for rank, hit in enumerate(ranked, 1)]


def search_patches(index: PatchIndex, queries: np.ndarray, k: int = 10) -> list[PatchHit]:
    """The ``k`` patches most similar to any of the query vectors."""
    return merge_hits(index.search(queries, k), k)


def mosaic(features: np.ndarray, coords: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Indices of the patches that represent a slide (Yottixel's mosaic).

    Patches are clustered by appearance (their embeddings); within each cluster, a share of
    patches is chosen by clustering their positions, so the mosaic spans the tissue.
    """
    count = len(features)
    if count == 0:
        return np.zeros(0, np.int64)
    clusters = min(MOSAIC_CLUSTERS, count)
    _, appearance = kmeans2(features.astype(np.float64), clusters, minit="++", seed=seed)
    chosen: list[int] = []
    for cluster in range(clusters):
        members = np.flatnonzero(appearance == cluster)
        if len(members) == 0:
            continue
        picks = max(1, round(MOSAIC_FRACTION * len(members)))
        points = coords[members].astype(np.float64)
        if picks >= len(members):
            chosen.extend(members.tolist())
            continue
        centres, _ = kmeans2(points, picks, minit="++", seed=seed)
        for centre in centres:
            nearest = members[np.argmin(((points - centre) ** 2).sum(1))]
            chosen.append(int(nearest))
    return np.unique(chosen)


def search_slides(
    index: PatchIndex,
    query: SlideFeatures | np.ndarray,
    *,
    k: int = 5,
    patches_per_query: int = 5,
    exclude_slide: str | None = None,
) -> list[SlideHit]:
    """Slides ranked by majority votes of each query patch's top ``patches_per_query`` hits.

    ``query`` is a slide's features (a mosaic is drawn from them) or query vectors as they are.
    ``exclude_slide`` leaves the query's own slide out of the ranking.
    """
    if isinstance(query, SlideFeatures):
        exclude_slide = exclude_slide or query.slide_id
        vectors = query.features[mosaic(query.features, query.coords)]
    else:
        vectors = np.atleast_2d(query)
    if len(vectors) == 0:
        raise RegionError("the query has no tissue patches to search with.")
    votes: Counter[str] = Counter()
    best: dict[str, list[float]] = {}
    examples: dict[str, list[PatchHit]] = {}
    for hits in index.search(vectors, patches_per_query, exclude_slide=exclude_slide):
        if not hits:
            continue
        tally = Counter(hit.slide_id for hit in hits)
        top = max(tally, key=lambda slide: (tally[slide], _max_score(hits, slide)))
        votes[top] += 1
        for slide in tally:
            best.setdefault(slide, []).append(_max_score(hits, slide))
            examples.setdefault(slide, []).extend(h for h in hits if h.slide_id == slide)
    labels = {entry.slide_id: entry for entry in index.slides()}
    ranked = sorted(
        best,
        key=lambda slide: (-votes[slide], -_median_over(best[slide], len(vectors))),
    )[:k]
    return [
        SlideHit(
            slide_id=slide,
            slide_path=labels[slide].slide_path,
            rank=rank,
            votes=votes[slide],
            vote_share=votes[slide] / len(vectors),
            median_similarity=_median_over(best[slide], len(vectors)),
            label=labels[slide].label,
            best_patches=merge_hits([examples[slide]], 3),
        )
        for rank, slide in enumerate(ranked, 1)
    ]


def _max_score(hits: list[PatchHit], slide_id: str) -> float:
    return max(hit.score for hit in hits if hit.slide_id == slide_id)


def _median_over(similarities: list[float], queries: int) -> float:
    """Median best similarity over all query patches (0 where the slide was not among the hits)."""
    padded = similarities + [0.0] * (queries - len(similarities))
    return float(np.median(padded))
