"""Measurements a pathologist reads off a field: cellularity, nuclear density and size, stain.

They go with every description, from a model or not, so a claim such as "densely cellular"
can be checked against a number. Nuclei are segmented on the hematoxylin channel with the same
rule the offline encoder uses; they are counted only at ≤ 1 µm/px, where a nucleus spans
enough pixels to be told from noise, and reported per mm² only when the scan's µm/px is known.
"""

from __future__ import annotations

import cv2
import numpy as np

from histopilot.agents.state import Magnification, Measurements
from histopilot.retrieval.encoders.handcrafted import (
    GLASS_OD,
    nucleus_mask,
    stain_densities,
)

#: Coarsest resolution at which nuclei are counted (µm/px).
NUCLEI_MAX_MPP = 1.0
#: Smaller hematoxylin blobs are not counted as nuclei (a lymphocyte nucleus is ~30 µm²);
#: chosen on CRC-VAL-HE-7K patches, where it separates lymphoid from stromal density.
MIN_NUCLEUS_UM2 = 16.0


def measure_region(image: np.ndarray, mpp: float | None) -> Measurements:
    """Measure an RGB field read at ``mpp`` µm/px (``None``: resolution unknown)."""
    rgb = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    hed = stain_densities(rgb[None])[0]
    total_od = -np.log10(np.maximum(rgb, 1).astype(np.float32) / 255.0).sum(-1)
    tissue = total_od >= GLASS_OD
    tissue_px = int(tissue.sum())
    if tissue_px == 0:
        return Measurements(tissue_fraction=0.0, hematoxylin=0.0, eosin=0.0)
    hematoxylin = float(hed[..., 0][tissue].mean())
    eosin = float(hed[..., 1][tissue].mean())
    common = {
        "tissue_fraction": tissue_px / tissue.size,
        "hematoxylin": round(hematoxylin, 4),
        "eosin": round(eosin, 4),
    }
    if mpp is None or mpp > NUCLEI_MAX_MPP:
        return Measurements(**common)
    mask = nucleus_mask(hed[..., 0])
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    pixel_um2 = mpp * mpp
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64) * pixel_um2
    areas = areas[areas >= MIN_NUCLEUS_UM2]
    tissue_mm2 = tissue_px * pixel_um2 / 1e6
    if len(areas) == 0:
        return Measurements(**common, cellularity=0.0, nuclei_per_mm2=0.0)
    return Measurements(
        **common,
        cellularity=round(float(areas.sum() / (tissue_px * pixel_um2)), 4),
        nuclei_per_mm2=round(len(areas) / tissue_mm2, 1),
        nuclear_area_um2=round(float(np.median(areas)), 1),
        nuclear_area_cv=_robust_cv(areas),
    )


def _robust_cv(areas: np.ndarray) -> float | None:
    """Spread of nuclear areas as 1.4826 × MAD / median: touching nuclei segment as one large
    blob, and a plain standard deviation would let a few such clumps dominate."""
    if len(areas) < 3:
        return None
    median = float(np.median(areas))
    return round(1.4826 * float(np.median(np.abs(areas - median))) / median, 3)


def measured_description(
    measurements: Measurements, magnification: Magnification, mpp: float | None
) -> str:
    """A sentence stating the measurements in a pathologist's vocabulary, numbers included."""
    m = measurements
    power = f"{magnification}-power field" + (f" ({mpp:g} µm/px)" if mpp else "")
    if m.tissue_fraction < 0.05:
        return f"{power}: almost no tissue ({m.tissue_fraction:.0%} of the field)."
    parts = [f"tissue covers {m.tissue_fraction:.0%}"]
    if m.nuclei_per_mm2 is not None:
        parts.append(
            f"{_cellularity_word(m.cellularity)} (nuclei cover {m.cellularity:.0%} of the "
            f"tissue; {m.nuclei_per_mm2:,.0f} separable nuclei/mm²)"
        )
    if m.nuclear_area_um2 is not None:
        spread = (
            f", area CV {m.nuclear_area_cv:.2f} ({_pleomorphism_word(m.nuclear_area_cv)})"
            if m.nuclear_area_cv is not None
            else ""
        )
        parts.append(f"median nuclear area {m.nuclear_area_um2:.0f} µm²{spread}")
    parts.append(
        f"{_stain_word(m.hematoxylin, m.eosin)} (H {m.hematoxylin:.2f}, E {m.eosin:.2f} OD)"
    )
    if m.nuclei_per_mm2 is None and mpp and mpp > NUCLEI_MAX_MPP:
        parts.append("nuclear detail needs higher power")
    return f"{power}: " + "; ".join(parts) + "."


def _cellularity_word(cellularity: float) -> str:
    # Share of tissue area in nuclei, measured with this segmentation on CRC-VAL-HE-7K:
    # carcinoma and lymphoid tissue ~0.35, stroma and muscle ~0.15, mucin ~0.05. (Counts per
    # mm² undercount where nuclei touch, so the word follows the area share.)
    if cellularity >= 0.3:
        return "densely cellular"
    if cellularity >= 0.15:
        return "moderately cellular"
    return "sparsely cellular"


def _pleomorphism_word(cv: float) -> str:
    if cv >= 0.7:
        return "marked size variation"
    if cv >= 0.5:
        return "moderate size variation"
    return "uniform nuclei"


def _stain_word(hematoxylin: float, eosin: float) -> str:
    if hematoxylin > 1.2 * eosin:
        return "hematoxylin-dominant"
    if eosin > 1.2 * hematoxylin:
        return "eosinophilic"
    return "balanced staining"
