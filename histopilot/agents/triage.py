"""Triage: look at the whole slide at low power, score it, and say where to look first.

It embeds every tissue tile once (cached on disk), then builds a slide risk and a per-tile
importance map from the best source available:

1. a trained attention-MIL head (its attention is the map);
2. zero-shot prompts through a vision-language encoder's text tower;
3. offline heuristics: hematoxylin density at low power, the "blue areas" a pathologist
   scans a slide for first.

Triage is soft by design. A hard benign/at-risk gate loses the cases it misroutes (PathFinder's
triage has a benign-class F1 of 0.57); here the risk only shapes the navigation prior and the
region budget, and every slide is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from histopilot.errors import ConfigError
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.encoders.handcrafted import GLASS_OD, stain_densities
from histopilot.retrieval.features import SlideFeatures
from histopilot.retrieval.reference import ReferenceBank
from histopilot.slide import Slide

if TYPE_CHECKING:  # PyTorch loads only when a trained head is configured
    from histopilot.agents.mil import AttentionMIL

ZERO_SHOT_PROMPTS = {
    "lesion": [
        "an H&E image of tumor",
        "an H&E image of carcinoma",
        "malignant cells with atypical nuclei",
    ],
    "background": [
        "an H&E image of normal tissue",
        "an H&E image of benign stroma",
        "an H&E image of adipose tissue",
    ],
}
#: CLIP's logit scale: cosine similarities are multiplied by this before the softmax.
CLIP_LOGIT_SCALE = 100.0
#: Mean hematoxylin OD over tissue above which a tile counts as hematoxylin-dense: on
#: CRC-VAL-HE-7K, carcinoma and lymphoid patches average 0.21–0.22, stroma, muscle, fat and
#: mucin 0.14–0.17. An uncalibrated prior for navigation, not a risk model.
DENSE_HEMATOXYLIN_OD = 0.2


@dataclass
class TriageMaps:
    """Everything triage computed for one slide (kept in the run's workspace, not in state)."""

    features: SlideFeatures
    cells: np.ndarray  # int (N, 2): column, row of each tile on the tile grid
    grid_shape: tuple[int, int]  # rows, columns
    importance: np.ndarray  # float32 (N,) in [0, 1]
    risk: float
    method: str
    note: str
    votes: np.ndarray | None  # float32 (N, labels) from the reference bank

    @property
    def tile_size(self) -> int:
        return self.features.size_level0


def triage_maps(
    slide: Slide,
    features: SlideFeatures,
    encoder: PatchEncoder,
    *,
    mil_head: AttentionMIL | None = None,
    reference: ReferenceBank | None = None,
) -> TriageMaps:
    """Importance, risk and reference votes for the tiles in ``features``."""
    size = features.size_level0
    cells = (features.coords // max(size, 1)).astype(np.int64)
    columns = -(-slide.dimensions[0] // size)
    rows = -(-slide.dimensions[1] // size)
    if len(features) == 0:
        importance, risk = np.zeros(0, np.float32), 0.0
        method, note = "heuristic", "no tissue tiles: nothing to score"
    elif mil_head is not None:
        if mil_head.config.encoder != encoder.name:
            raise ConfigError(
                f"the triage head was trained on {mil_head.config.encoder!r} vectors but the "
                f"patch encoder is {encoder.name!r}; set encoders.patch to match, or retrain."
            )
        risk, importance = mil_head.score(features.features)
        method, note = "mil", "attention-MIL head: importance is its attention"
    elif encoder.has_text:
        risk, importance = _zero_shot(features.features, encoder)
        method, note = "zero-shot", "zero-shot prompts through the encoder's text tower"
    else:
        risk, importance = _hematoxylin_density(slide, features)
        method = "heuristic"
        note = "offline heuristic: hematoxylin density at low power (cellular areas first)"
    votes = None
    if reference is not None and len(features):
        if reference.encoder != encoder.name:
            raise ConfigError(
                f"the reference bank holds {reference.encoder!r} vectors but the patch encoder "
                f"is {encoder.name!r}; rebuild the bank with this encoder or change encoders."
            )
        votes = reference.votes(features.features)
    return TriageMaps(
        features=features,
        cells=cells,
        grid_shape=(int(rows), int(columns)),
        importance=np.asarray(importance, np.float32),
        risk=float(np.clip(risk, 0.0, 1.0)),
        method=method,
        note=note,
        votes=votes,
    )


def _zero_shot(vectors: np.ndarray, encoder: PatchEncoder) -> tuple[float, np.ndarray]:
    classes = [encoder.encode_text(prompts).mean(0) for prompts in ZERO_SHOT_PROMPTS.values()]
    text = np.stack([c / np.linalg.norm(c) for c in classes])
    logits = CLIP_LOGIT_SCALE * vectors @ text.T
    logits -= logits.max(1, keepdims=True)
    probability = np.exp(logits[:, 0]) / np.exp(logits).sum(1)
    return float(np.quantile(probability, 0.9)), probability.astype(np.float32)


def _hematoxylin_density(slide: Slide, features: SlideFeatures) -> tuple[float, np.ndarray]:
    """Mean hematoxylin OD over the tissue of each tile, read from the low-power overview."""
    overview, downsample = slide.analysis_overview()
    hed = stain_densities(overview[None])[0]
    total_od = -np.log10(np.maximum(overview, 1).astype(np.float32) / 255.0).sum(-1)
    tissue = (total_od >= GLASS_OD).astype(np.float64)
    hematoxylin = cv2.integral(hed[..., 0].astype(np.float64) * tissue)
    area = cv2.integral(tissue)
    height, width = tissue.shape
    xs, ys = features.coords[:, 0], features.coords[:, 1]
    size = features.size_level0
    x0 = np.clip(np.floor(xs / downsample), 0, width).astype(int)
    y0 = np.clip(np.floor(ys / downsample), 0, height).astype(int)
    x1 = np.clip(np.ceil((xs + size) / downsample), 0, width).astype(int)
    y1 = np.clip(np.ceil((ys + size) / downsample), 0, height).astype(int)

    def box_sum(integral: np.ndarray) -> np.ndarray:
        return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]

    density = box_sum(hematoxylin) / np.maximum(box_sum(area), 1.0)
    risk = float((density > DENSE_HEMATOXYLIN_OD).mean())
    # Rank-scaled so the map is comparable between slides stained darker or lighter.
    ranks = density.argsort().argsort().astype(np.float32)
    importance = (ranks + 1) / len(ranks)
    return risk, importance
