"""Tissue detection on the slide's analysis overview (about 8 µm/px).

Classical and fast (well under a second per slide on a CPU): pen marks are removed first by
colour, then tissue is whatever is stained (HSV saturation above an Otsu threshold clamped to a
range that holds for H&E and IHC), cleaned with morphology sized in microns. The clamp is what
makes it work at both extremes: a field that is all tissue (Otsu would split the tissue in two)
and a slide whose tissue covers under 1 % of the glass (Otsu would split the background).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import BaseModel, Field
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from histopilot.slide.slide import Slide

#: Saturation threshold limits (0-255): glass sits below 15, pale stained tissue above 40.
SATURATION_THRESHOLD_RANGE = (15, 40)
#: Optical density (relative to the glass) above which a pixel absorbs light: catches pale,
#: unsaturated tissue (faint stroma, mucin) that saturation misses. 0.15 as in Macenko et al.
MIN_OPTICAL_DENSITY = 0.15
#: Objects and holes smaller than these are noise (dust, bubbles, gaps in loose stroma).
MIN_TISSUE_AREA_UM2 = 5_000.0
MAX_HOLE_AREA_UM2 = 20_000.0
#: Without MPP the same limits as fractions of the overview area.
MIN_TISSUE_AREA_FRACTION = 2e-5
MAX_HOLE_AREA_FRACTION = 1e-4


class TissuePolygon(BaseModel):
    """One connected piece of tissue in level-0 pixel coordinates."""

    exterior: list[tuple[int, int]]
    holes: list[list[tuple[int, int]]] = Field(default_factory=list)
    area_px: float = Field(description="area in level-0 pixels², holes subtracted")


@dataclass
class TissueMask:
    """A boolean tissue mask on an overview, with what is needed to map it to level 0."""

    mask: np.ndarray  # bool (H, W), True = tissue
    pen_mask: np.ndarray  # bool (H, W), True = pen ink
    downsample: float  # level-0 pixels per mask pixel
    saturation_threshold: float
    polygons: list[TissuePolygon]

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean())

    @property
    def pen_fraction(self) -> float:
        return float(self.pen_mask.mean())

    def fractions(self, xs: np.ndarray, ys: np.ndarray, size: float) -> np.ndarray:
        """Tissue fraction of each level-0 square ``(x, y, size)``, from an integral image."""
        integral = cv2.integral(self.mask.astype(np.uint8)).astype(np.float64)
        height, width = self.mask.shape
        x0 = np.clip(np.floor(xs / self.downsample), 0, width).astype(int)
        y0 = np.clip(np.floor(ys / self.downsample), 0, height).astype(int)
        x1 = np.clip(np.ceil((xs + size) / self.downsample), 0, width).astype(int)
        y1 = np.clip(np.ceil((ys + size) / self.downsample), 0, height).astype(int)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        return inside / area

    def to_geojson(self, mpp: float | None = None) -> dict:
        """A GeoJSON FeatureCollection of the tissue polygons (level-0 pixel coordinates)."""
        features = []
        for index, polygon in enumerate(self.polygons):
            rings = [_closed(polygon.exterior)] + [_closed(hole) for hole in polygon.holes]
            properties: dict = {"id": index, "classification": "tissue", "area_px": polygon.area_px}
            if mpp:
                properties["area_mm2"] = polygon.area_px * mpp * mpp / 1e6
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": properties,
                }
            )
        return {"type": "FeatureCollection", "features": features}


def detect_tissue(slide: Slide) -> TissueMask:
    """Tissue mask of a brightfield slide (H&E or IHC), pen marks excluded."""
    slide.require_brightfield("tissue detection")
    overview, downsample = slide.analysis_overview()
    mask_mpp = slide.mpp.mean * downsample if slide.mpp else None
    return detect_tissue_in_image(overview, downsample=downsample, mpp=mask_mpp)


def detect_tissue_in_image(
    rgb: np.ndarray, *, downsample: float = 1.0, mpp: float | None = None
) -> TissueMask:
    """Tissue mask of an RGB overview; ``mpp`` (of the overview) sizes the morphology."""
    hsv = cv2.cvtColor(cv2.medianBlur(rgb, 3), cv2.COLOR_RGB2HSV)
    pen = pen_marks(hsv)
    saturation = hsv[..., 1]
    candidates = saturation[~pen]
    threshold = float(threshold_otsu(candidates)) if np.ptp(candidates) > 0 else 255.0
    threshold = float(np.clip(threshold, *SATURATION_THRESHOLD_RANGE))
    mask = ((saturation > threshold) | (optical_density(rgb) > MIN_OPTICAL_DENSITY)) & ~pen

    pixels = mask.size
    if mpp:
        min_area = MIN_TISSUE_AREA_UM2 / mpp**2
        max_hole = MAX_HOLE_AREA_UM2 / mpp**2
        radius = max(1, round(16.0 / mpp))
    else:
        min_area = MIN_TISSUE_AREA_FRACTION * pixels
        max_hole = MAX_HOLE_AREA_FRACTION * pixels
        radius = 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool) & ~pen
    mask = remove_small_objects(mask, max_size=max(1, int(min_area)))
    mask = remove_small_holes(mask, max_size=max(1, int(max_hole))) & ~pen
    return TissueMask(
        mask=mask,
        pen_mask=pen,
        downsample=downsample,
        saturation_threshold=threshold,
        polygons=_polygons(mask, downsample),
    )


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Largest per-channel optical density, relative to the glass (98th percentile per channel).

    Estimating the glass level from the image, rather than assuming 255, keeps scanners with a
    grey or tinted background from reading as all tissue.
    """
    pixels = rgb.astype(np.float32)
    glass = np.maximum(np.percentile(pixels.reshape(-1, 3), 98, axis=0), 200.0)
    return (-np.log10(np.maximum(pixels, 1.0) / glass)).max(axis=-1)


def pen_marks(hsv: np.ndarray) -> np.ndarray:
    """Ink used to annotate glass: green/teal, blue, red and black markers (OpenCV HSV).

    Each rule sits outside the colours of stains, measured on TCGA thumbnails with ink and on
    an IHC slide: hematoxylin is purple (hue ≥ 110) or, as an IHC counterstain, pale blue
    (saturation < 85); eosin is pink and DAB brown. Teal ink is darker and more saturated than
    any counterstain, light-blue ink brighter and more saturated, red ink more saturated
    than eosin.
    """
    hue, sat, val = (hsv[..., channel].astype(np.int16) for channel in range(3))
    pen = pen_ink(hue, sat, val)
    # Ink edges blur into the glass and tissue next to them.
    return cv2.dilate(pen.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


INKS = frozenset({"green", "dark_teal", "light_blue", "red", "black"})


def pen_ink(hue, sat, val, *, inks: frozenset[str] = INKS):
    """The ``inks`` rules on OpenCV-scaled hue (0–180), saturation and value (0–255).

    Only comparisons and ``&``/``|``, so the same rules run on NumPy arrays and torch tensors.
    """
    rules = {
        "green": lambda: (hue >= 35) & (hue < 100) & (sat > 50) & (val > 30),
        "dark_teal": lambda: (
            (hue >= 100) & (hue < 110) & (((sat > 90) & (val < 140)) | ((sat > 55) & (val < 130)))
        ),
        "light_blue": lambda: (hue >= 95) & (hue <= 130) & (sat > 90) & (val > 160),
        "red": lambda: ((hue <= 8) | (hue >= 172)) & (sat > 170) & (val > 60),
        "black": lambda: val < 60,
    }
    found = None
    for name in sorted(inks):
        mask = rules[name]()
        found = mask if found is None else found | mask
    return found


def _polygons(mask: np.ndarray, downsample: float) -> list[TissuePolygon]:
    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return []
    polygons: list[TissuePolygon] = []
    links = hierarchy[0]  # [next, previous, first_child, parent]
    for index, contour in enumerate(contours):
        if links[index][3] != -1:
            continue  # a hole, collected with its parent
        holes = []
        area = cv2.contourArea(contour)
        child = links[index][2]
        while child != -1:
            holes.append(_scale(contours[child], downsample))
            area -= cv2.contourArea(contours[child])
            child = links[child][0]
        polygons.append(
            TissuePolygon(
                exterior=_scale(contour, downsample),
                holes=holes,
                area_px=float(area * downsample * downsample),
            )
        )
    polygons.sort(key=lambda polygon: -polygon.area_px)
    return polygons


def _scale(contour: np.ndarray, downsample: float) -> list[tuple[int, int]]:
    simplified = cv2.approxPolyDP(contour, 1.0, closed=True).reshape(-1, 2)
    return [(round(float(x) * downsample), round(float(y) * downsample)) for x, y in simplified]


def _closed(ring: list[tuple[int, int]]) -> list[list[int]]:
    points = [[x, y] for x, y in ring]
    return [*points, points[0]] if points and points[0] != points[-1] else points
