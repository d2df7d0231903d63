"""Pictures drawn on overviews, and the level/resize arithmetic behind target-MPP reads."""

from __future__ import annotations

import numpy as np
import pytest

from histopilot.slide.magnification import best_level, plan_read
from histopilot.slide.render import draw_regions, draw_tissue_outline, overlay_heatmap
from histopilot.slide.tissue import detect_tissue_in_image
from tests.conftest import EOSIN, quadrant_image

APERIO_LEVELS = [1.0, 4.0, 16.0, 32.0]


@pytest.mark.parametrize(
    ("downsample", "level"),
    [(1.0, 0), (2.0, 0), (4.0, 1), (4.05, 1), (3.9, 0), (20.0, 2), (100.0, 3), (0.5, 0)],
)
def test_best_level_never_enlarges(downsample: float, level: int) -> None:
    assert best_level(APERIO_LEVELS, downsample) == level


def test_plan_reads_close_levels_without_resizing() -> None:
    plan = plan_read([1.0], 0, 0, 256, 256, downsample=1.002)  # 0.5 µm/px on a 0.499 scan
    assert not plan.needs_resize
    plan = plan_read(APERIO_LEVELS, 0, 0, 256, 256, downsample=8.0)
    assert (plan.level, plan.read_width, plan.needs_resize) == (1, 512, True)


def test_regions_are_drawn_where_their_level0_coordinates_point() -> None:
    overview = np.full((100, 200, 3), 255, np.uint8)
    drawn = draw_regions(overview, 10.0, [(500, 200, 300, 300)], labels=["R1"])
    changed = np.argwhere((drawn != 255).any(axis=-1))
    assert changed[:, 1].min() == 50  # x = 500 / 10
    assert changed[:, 0].min() == 20  # y = 200 / 10
    assert changed[:, 1].max() <= 81


def test_heatmap_colours_only_inside_the_mask() -> None:
    overview = np.full((40, 40, 3), 255, np.uint8)
    heat = np.array([[0.0, 1.0], [np.nan, 0.5]], np.float32)
    mask = np.array([[True, True], [True, False]])
    blended = overlay_heatmap(overview, heat, mask=mask)
    assert (blended[:20, :20] != 255).any()  # top left: value 0 still coloured
    assert (blended[20:, :20] == 255).all()  # NaN stays transparent
    assert (blended[20:, 20:] == 255).all()  # outside the mask stays transparent


def test_tissue_outline_follows_the_tissue() -> None:
    image = quadrant_image()
    tissue = detect_tissue_in_image(image)
    outlined = draw_tissue_outline(image, tissue, overview_downsample=1.0)
    changed = (outlined != image).any(axis=-1)
    assert changed[256, 600] or changed[255, 600]  # the top edge of the eosin block
    assert not changed[400, 100]  # glass far from tissue
    assert tuple(outlined[380, 640]) == EOSIN  # inside the block untouched
