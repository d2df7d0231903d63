"""Deep Zoom tiles, thumbnails and tissue outlines for the viewer, with a byte-bounded cache.

Tiles come from OpenSlide's ``DeepZoomGenerator``. It drives any slide histopilot opens, not
only OpenSlide's formats: :class:`SlideForDeepZoom` presents a :class:`~histopilot.slide.Slide`
(DICOM, QPTIFF, plain TIFF, images) through OpenSlide's ``AbstractSlide`` interface. Bounds are
not cropped (``limit_bounds=False``), so the deepest zoom level's pixel grid *is* level 0 and
region coordinates from an analysis land where they belong. Label and macro images are never
exposed.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from openslide import AbstractSlide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from histopilot.errors import HistopilotError
from histopilot.serve.api.background import run_on
from histopilot.serve.api.catalog import CatalogSlide
from histopilot.slide import Slide, open_slide
from histopilot.slide.models import SlideInfo
from histopilot.slide.readers.base import crop_padded
from histopilot.slide.tissue import detect_tissue

T = TypeVar("T")
TILE_SIZE = 254  # + 1 px overlap on each side: 256 px images, the usual Deep Zoom layout
TILE_OVERLAP = 1
#: Slides kept open at once; the least recently used one is dropped first.
OPEN_SLIDES = 32
THUMBNAIL_MAX = 2048
#: The longest side of the overview level added to slides whose coarsest level is larger.
OVERVIEW_MAX_SIDE = 2048


class TileRequestError(HistopilotError):
    """A tile address or image request outside what the slide has."""


class SlideForDeepZoom(AbstractSlide):
    """A histopilot :class:`Slide` behind OpenSlide's slide interface, for DeepZoomGenerator.

    When the slide's coarsest level is still large (a single-level scan, a pyramid that stops
    early), one more level is added: the whole slide at most :data:`OVERVIEW_MAX_SIDE` pixels
    on its longest side, read once and kept. Every zoomed-out tile is cut from it instead of
    decoding the full-resolution image again, which is what a plain DeepZoomGenerator does.

    OpenSlide's own reads are thread-safe; the other readers (tifffile, pydicom, Pillow) are
    serialised with a lock.
    """

    def __init__(self, slide: Slide) -> None:
        super().__init__()
        self.slide = slide
        self.read_lock: AbstractContextManager[Any] = (
            nullcontext() if slide.reader.name == "openslide" else threading.Lock()
        )
        self._overview_lock = threading.Lock()
        self._overview: np.ndarray | None = None
        self._dimensions = list(slide.level_dimensions)
        self._downsamples = list(slide.level_downsamples)
        coarsest = max(self._dimensions[-1])
        if coarsest > OVERVIEW_MAX_SIDE:
            factor = 2 ** math.ceil(math.log2(coarsest / OVERVIEW_MAX_SIDE))
            downsample = self._downsamples[-1] * factor
            width, height = slide.dimensions
            self._dimensions.append((math.ceil(width / downsample), math.ceil(height / downsample)))
            self._downsamples.append(downsample)
        self._real_levels = slide.level_count

    @classmethod
    def detect_format(cls, filename: Any) -> str | None:
        return None

    def close(self) -> None:
        self.slide.close()

    @property
    def level_count(self) -> int:
        return len(self._dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._downsamples)

    @property
    def properties(self) -> Mapping[str, str]:
        return {}

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        return {}  # label and macro images can carry patient identifiers

    def get_best_level_for_downsample(self, downsample: float) -> int:
        levels = [i for i, d in enumerate(self._downsamples) if d <= downsample + 1e-6]
        return levels[-1] if levels else 0

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        if level < self._real_levels:
            with self.read_lock:
                pixels = self.slide.read_region(location[0], location[1], level, *size)
        else:
            downsample = self._downsamples[level]
            x, y = round(location[0] / downsample), round(location[1] / downsample)
            pixels = crop_padded(self._overview_pixels(downsample), x, y, *size)
        return Image.fromarray(pixels).convert("RGBA")

    def _overview_pixels(self, downsample: float) -> np.ndarray:
        with self._overview_lock:
            if self._overview is None:
                with self.read_lock:
                    self._overview, _ = self.slide.overview(downsample=downsample)
            return self._overview


@dataclass
class OpenedSlide:
    source: SlideForDeepZoom
    deep_zoom: DeepZoomGenerator
    tissue: dict | None = None

    @property
    def slide(self) -> Slide:
        return self.source.slide


class TileService:
    """Open slides by catalog entry and serve their Deep Zoom pyramid, encoded and cached."""

    def __init__(self, *, cache_bytes: int, tile_format: str = "jpeg", quality: int = 80) -> None:
        self.tile_format = tile_format
        self.quality = quality
        self.cache_bytes = cache_bytes
        self._tiles: OrderedDict[tuple, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._open: OrderedDict[str, OpenedSlide] = OrderedDict()
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        # Decoding is CPU-bound: more at once than the cores can run only adds memory and
        # latency. A pool's queue is first come, first served, so no request starves.
        self._workers = ThreadPoolExecutor(
            max_workers=2 * (os.cpu_count() or 1), thread_name_prefix="tiles"
        )

    async def run(self, work: Callable[[], T]) -> T:
        """Run slide work (decoding, encoding) on the tile workers; the event loop waits."""
        return await run_on(self._workers, work)

    # -- slides -----------------------------------------------------------------------------
    def opened(self, entry: CatalogSlide) -> OpenedSlide:
        """The open slide for ``entry`` (reopened when its file changed)."""
        with self._lock:
            current = self._open.get(entry.version)
            if current is not None:
                self._open.move_to_end(entry.version)
                return current
            opening = self._opening.setdefault(entry.version, threading.Lock())
        try:
            with opening:
                with self._lock:
                    if entry.version in self._open:
                        return self._open[entry.version]
                source = SlideForDeepZoom(_open_listed(entry))
                opened = OpenedSlide(
                    source=source,
                    deep_zoom=DeepZoomGenerator(
                        source, tile_size=TILE_SIZE, overlap=TILE_OVERLAP, limit_bounds=False
                    ),
                )
                with self._lock:
                    self._open[entry.version] = opened
                    while len(self._open) > OPEN_SLIDES:
                        # Dropped, not closed: a request may still be reading it; the handle
                        # closes when the last reference goes.
                        self._open.popitem(last=False)
                return opened
        finally:
            with self._lock:
                self._opening.pop(entry.version, None)

    def info(self, entry: CatalogSlide) -> SlideInfo:
        return self.opened(entry).slide.info

    def dzi(self, entry: CatalogSlide) -> str:
        return self.opened(entry).deep_zoom.get_dzi(self.tile_format)

    def tile(self, entry: CatalogSlide, level: int, column: int, row: int) -> bytes:
        key = (entry.version, level, column, row)
        with self._lock:
            cached = self._tiles.get(key)
            if cached is not None:
                self._tiles.move_to_end(key)
                return cached
        deep_zoom = self.opened(entry).deep_zoom
        if not 0 <= level < deep_zoom.level_count:
            raise TileRequestError(
                f"zoom level {level} does not exist; this slide has levels "
                f"0–{deep_zoom.level_count - 1}."
            )
        columns, rows = deep_zoom.level_tiles[level]
        if not (0 <= column < columns and 0 <= row < rows):
            raise TileRequestError(
                f"tile {column}_{row} is outside zoom level {level} "
                f"({columns} columns × {rows} rows)."
            )
        encoded = self._encode(deep_zoom.get_tile(level, (column, row)))
        self._remember(key, encoded)
        return encoded

    def thumbnail(self, entry: CatalogSlide, size: int) -> bytes:
        if not 16 <= size <= THUMBNAIL_MAX:
            raise TileRequestError(f"thumbnail size must be 16–{THUMBNAIL_MAX} pixels.")
        source = self.opened(entry).source
        with source.read_lock:
            pixels, _ = source.slide.overview(max_size=size)
        return self._encode(Image.fromarray(pixels))

    def tissue(self, entry: CatalogSlide) -> dict:
        """Tissue polygons (level-0 pixels) as GeoJSON, computed once per slide."""
        opened = self.opened(entry)
        if opened.tissue is None:
            mpp = opened.slide.mpp.mean if opened.slide.mpp else None
            with opened.source.read_lock:
                opened.tissue = detect_tissue(opened.slide).to_geojson(mpp)
        return opened.tissue

    @property
    def media_type(self) -> str:
        return f"image/{self.tile_format}"

    def _encode(self, image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        if self.tile_format == "jpeg":
            image.convert("RGB").save(buffer, format="JPEG", quality=self.quality)
        else:
            image.save(buffer, format="PNG")
        return buffer.getvalue()

    def _remember(self, key: tuple, encoded: bytes) -> None:
        if len(encoded) > self.cache_bytes:
            return
        with self._lock:
            if key in self._tiles:
                return
            self._tiles[key] = encoded
            self._cached_bytes += len(encoded)
            while self._cached_bytes > self.cache_bytes:
                _, dropped = self._tiles.popitem(last=False)
                self._cached_bytes -= len(dropped)

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for opened in self._open.values():
                opened.slide.close()
            self._open.clear()
            self._tiles.clear()
            self._cached_bytes = 0


class UnreadableSlideError(HistopilotError):
    """A listed slide file that cannot be opened (damaged, replaced, removed)."""


def _open_listed(entry: CatalogSlide) -> Slide:
    """Open a catalog slide; errors name the slide as the catalog does, never by its path."""
    try:
        return open_slide(entry.path)
    except HistopilotError as error:
        message = str(error).replace(str(entry.path), entry.name)
        raise UnreadableSlideError(f"slide {entry.name} cannot be read: {message}") from None


def heatmap_png(importance: np.ndarray) -> bytes:
    """An RGBA image of per-tile importance (NaN = no tissue, transparent)."""
    from histopilot.slide.render import heatmap_colours

    rgba = heatmap_colours(importance)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()
