"""``open_slide`` and the ``Slide`` object every other part of histopilot reads pixels through.

The reader below knows a container format; ``Slide`` adds what is the same for all of them:
an MPP the user can supply, bounds and size checks with clear errors, reads at a target
resolution from the best pyramid level, and whole-slide overviews read in bounded strips.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from histopilot.errors import MissingMPPError, NotBrightfieldError, RegionError
from histopilot.slide.magnification import plan_read
from histopilot.slide.models import MPP, LevelInfo, Modality, SlideInfo, is_protected_image
from histopilot.slide.readers import SlideReader, open_reader

#: Largest region returned by one read (RGB, ~300 MB). Larger areas go through the tiler.
MAX_REGION_PIXELS = 100_000_000
#: Level pixels per strip when a whole level is read for an overview: bounds peak memory
#: and lets strips decode in parallel.
_STRIP_PIXELS = 1_000_000
#: Resolution of the overview that modality checks and tissue detection share (µm/px), and
#: its size when the slide's MPP is unknown.
ANALYSIS_MPP = 8.0
ANALYSIS_MAX_SIZE_NO_MPP = 2048


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open any supported slide or image.

    Args:
        path: a slide file (SVS, NDPI, MRXS, SCN, DICOM, TIFF, QPTIFF, PNG, …) or a DICOM
            WSI folder.
        mpp: level-0 microns per pixel, for files that do not declare it. A value in the file
            is overridden by this one, since users pass it to correct broken metadata.
    """
    if mpp is not None and not 0 < mpp < 1000:
        raise MissingMPPError(f"--slide-mpp must be a positive resolution in µm/px, got {mpp}.")
    return Slide(Path(path), open_reader(Path(path)), mpp_override=mpp)


class Slide:
    """An open slide: geometry, metadata and validated pixel reads (RGB uint8 arrays)."""

    def __init__(self, path: Path, reader: SlideReader, *, mpp_override: float | None) -> None:
        self.path = path
        self.reader = reader
        meta = reader.metadata
        if mpp_override is not None:
            self.mpp: MPP | None = MPP(x=mpp_override, y=mpp_override, source="user")
        elif meta.mpp is not None:
            self.mpp = MPP(x=meta.mpp[0], y=meta.mpp[1], source="metadata")
        else:
            self.mpp = None
        self._analysis_overview: tuple[np.ndarray, float] | None = None

    # -- geometry -------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.reader.metadata.level_dimensions[0]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return self.reader.metadata.level_dimensions

    @property
    def level_downsamples(self) -> list[float]:
        return self.reader.metadata.level_downsamples

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    # -- metadata -------------------------------------------------------------------------
    @cached_property
    def modality(self) -> Modality:
        """From the header when it says; else from the pixels: brightfield glass is bright."""
        declared = self.reader.metadata.modality
        if declared is not None:
            return declared
        overview = self.analysis_overview()[0]
        brightness = float(np.percentile(overview.mean(axis=-1), 90))
        return "brightfield" if brightness > 120 else "fluorescence"

    @cached_property
    def info(self) -> SlideInfo:
        meta = self.reader.metadata
        levels = [
            LevelInfo(
                index=index,
                width=width,
                height=height,
                downsample=downsample,
                mpp=self.mpp.mean * downsample if self.mpp else None,
            )
            for index, ((width, height), downsample) in enumerate(
                zip(meta.level_dimensions, meta.level_downsamples, strict=True)
            )
        ]
        mpp_note = None
        if self.mpp is None:
            mpp_note = f"{meta.mpp_note}; pass --slide-mpp to supply the scan resolution"
        return SlideInfo(
            path=str(self.path),
            name=self.path.name,
            reader=self.reader.name,
            format=meta.format,
            width=self.dimensions[0],
            height=self.dimensions[1],
            levels=levels,
            mpp=self.mpp,
            mpp_note=mpp_note,
            objective_power=meta.objective_power,
            modality=self.modality,
            channels=meta.channels,
            associated_images=meta.associated_images,
            file_size_bytes=self.path.stat().st_size,
            notes=meta.notes,
            generated=meta.generated,
        )

    def require_mpp(self, purpose: str) -> float:
        """Level-0 µm/px, or an error that tells the user how to supply it."""
        if self.mpp is None:
            raise MissingMPPError(
                f"{self.path.name} does not declare its resolution (microns per pixel), which "
                f"{purpose} needs. Pass --slide-mpp (e.g. 0.25 for a 40x scan, 0.5 for 20x) "
                "or open_slide(path, mpp=...)."
            )
        return self.mpp.mean

    def require_brightfield(self, purpose: str) -> None:
        if self.modality != "brightfield":
            channels = ", ".join(self.reader.metadata.channels)
            raise NotBrightfieldError(
                f"{self.path.name} is a fluorescence image (channels: {channels}); {purpose} is "
                "built for brightfield stains (H&E, IHC). Use a brightfield scan of the section."
            )

    # -- pixels ---------------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB pixels of ``width`` x ``height`` at ``level``, top-left at level-0 ``(x, y)``."""
        if not 0 <= level < self.level_count:
            raise RegionError(
                f"level {level} does not exist; {self.path.name} has levels "
                f"0–{self.level_count - 1}."
            )
        downsample = self.level_downsamples[level]
        self._check_region(x, y, width, height, downsample)
        return _writable(self.reader.read(x, y, level, width, height))

    def read_region_at(
        self, x: int, y: int, width: int, height: int, *, downsample: float
    ) -> np.ndarray:
        """``width`` x ``height`` output pixels of level-0 rectangle at ``downsample``.

        Reads the coarsest level at least as fine as asked and shrinks, so a 0.5 µm/px request
        on a 0.25 µm/px scan with a 2x level reads that level directly without resizing.
        """
        self._check_region(x, y, width, height, downsample)
        plan = plan_read(self.level_downsamples, x, y, width, height, downsample)
        pixels = self.reader.read(plan.x, plan.y, plan.level, plan.read_width, plan.read_height)
        if plan.needs_resize:
            pixels = resize(pixels, plan.out_width, plan.out_height)
        return _writable(pixels)

    def read_region_at_mpp(
        self, x: int, y: int, width: int, height: int, *, mpp: float
    ) -> np.ndarray:
        """Like ``read_region_at`` with the resolution in µm/px (needs the slide's MPP)."""
        downsample = mpp / self.require_mpp("reading at a physical resolution")
        return self.read_region_at(x, y, width, height, downsample=downsample)

    def analysis_overview(self) -> tuple[np.ndarray, float]:
        """The low-resolution view that modality checks and tissue detection share.

        About 8 µm/px when the MPP is known (2048 px on the longest side otherwise); computed
        once per slide, since on a single-level scan it means decoding the whole image.
        """
        if self._analysis_overview is None:
            if self.mpp is not None:
                self._analysis_overview = self.overview(downsample=ANALYSIS_MPP / self.mpp.mean)
            else:
                self._analysis_overview = self.overview(max_size=ANALYSIS_MAX_SIZE_NO_MPP)
        return self._analysis_overview

    def overview(
        self, *, max_size: int | None = None, downsample: float | None = None
    ) -> tuple[np.ndarray, float]:
        """The whole slide at low resolution and the level-0 pixels per overview pixel.

        Give ``max_size`` (longest side in pixels) or ``downsample``. The chosen level is read
        in horizontal strips, so memory stays bounded even on single-level gigapixel TIFFs.
        """
        width0, height0 = self.dimensions
        if downsample is None:
            downsample = max(width0, height0) / (max_size or 1024)
        downsample = max(downsample, 1.0)
        out_w = max(1, math.ceil(width0 / downsample))
        out_h = max(1, math.ceil(height0 / downsample))
        plan = plan_read(self.level_downsamples, 0, 0, out_w, out_h, downsample)
        level_ds = self.level_downsamples[plan.level]
        level_w, level_h = self.level_dimensions[plan.level]
        scale = level_h / out_h  # level rows per output row; the whole level is resized

        rows_per_strip = max(1, int(_STRIP_PIXELS / max(level_w, 1) / max(scale, 1)))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)

        def fill_strip(out_y0: int) -> None:
            out_y1 = min(out_h, out_y0 + rows_per_strip)
            level_y0 = math.floor(out_y0 * scale)
            level_y1 = min(level_h, max(level_y0 + 1, math.ceil(out_y1 * scale)))
            strip = self.reader.read(
                0, round(level_y0 * level_ds), plan.level, level_w, level_y1 - level_y0
            )
            out[out_y0:out_y1] = resize(strip, out_w, out_y1 - out_y0)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(fill_strip, range(0, out_h, rows_per_strip)))
        return out, width0 / out_w

    def associated_image(self, name: str, *, allow_protected: bool = False) -> np.ndarray:
        """An associated image by name. The label and macro images are refused unless
        explicitly allowed: they can show the patient's name and record number."""
        names = self.reader.metadata.associated_images
        if name not in names:
            available = ", ".join(names) or "none"
            raise RegionError(f"{self.path.name} has no '{name}' image (available: {available}).")
        if is_protected_image(name) and not allow_protected:
            raise RegionError(
                f"The '{name}' image can show patient identifiers (the slide label) and is not "
                "read by default. Ask for it explicitly with "
                f"Slide.associated_image({name!r}, allow_protected=True) if you need it."
            )
        return self.reader.associated_image(name)

    def _check_region(self, x: int, y: int, width: int, height: int, downsample: float) -> None:
        if width <= 0 or height <= 0:
            raise RegionError(f"region size must be positive, got {width}x{height}.")
        if width * height > MAX_REGION_PIXELS:
            raise RegionError(
                f"a {width}x{height} region ({width * height / 1e6:.0f} MP) is larger than the "
                f"{MAX_REGION_PIXELS / 1e6:.0f} MP read limit; read it in tiles "
                "(histopilot slide tiles) or at a lower resolution."
            )
        slide_w, slide_h = self.dimensions
        x1, y1 = x + width * downsample, y + height * downsample
        if x >= slide_w or y >= slide_h or x1 <= 0 or y1 <= 0:
            raise RegionError(
                f"region at ({x}, {y}) of {width}x{height} px (downsample {downsample:g}) lies "
                f"outside the slide, which is {slide_w}x{slide_h} px at level 0."
            )

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        width, height = self.dimensions
        return f"Slide({self.path.name!r}, {width}x{height}, levels={self.level_count})"


def _writable(pixels: np.ndarray) -> np.ndarray:
    """Callers own what they read: decoders may hand out read-only buffers, copy those."""
    return pixels if pixels.flags.writeable else pixels.copy()


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-averaging resize (the right filter for shrinking histology without aliasing)."""
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return pixels
    shrinking = width < pixels.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(pixels, (width, height), interpolation=interpolation)
