"""TIFF files OpenSlide does not take: stripped (non-tiled) RGB TIFF and multi-channel TIFF.

Multi-channel fluorescence (Akoya/PerkinElmer QPTIFF, OME-TIFF) opens here and reports its
channels; its RGB rendering is a false-colour composite for viewing only.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tifffile

from histopilot.errors import CorruptSlideError, RegionError
from histopilot.slide.readers.base import (
    ReaderMetadata,
    SlideReader,
    crop_padded,
    mpp_from_resolution,
)

#: Decoded bytes above which a non-tiled level is refused rather than loaded whole.
MAX_DECODED_LEVEL_BYTES = 2 * 1024**3

_RESOLUTION_UNIT_NAMES = {2: "inch", 3: "centimeter"}  # TIFF ResolutionUnit codes
_DEFAULT_CHANNEL_COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (255, 255, 0), (255, 0, 255)]


class TiffReader(SlideReader):
    """One image series of a TIFF file, pyramid levels included."""

    name = "tifffile"

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            # One file only: an OME-TIFF can name other files (any path) in its metadata, and a
            # slide must never read pixels from outside itself.
            self._tiff = tifffile.TiffFile(path, _multifile=False)
            series = self._tiff.series[0]
            self._levels = list(series.levels)
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as error:
            raise CorruptSlideError(f"{path}: the TIFF structure is damaged ({error}).") from error
        self._axes = series.axes
        self._cache: dict[int, np.ndarray] = {}
        self._channel_colours: list[tuple[int, int, int]] = []
        self.metadata = self._read_metadata(series)

    def _read_metadata(self, series: tifffile.TiffPageSeries) -> ReaderMetadata:
        dims = [
            (self._size(level.shape, "X"), self._size(level.shape, "Y")) for level in self._levels
        ]
        page = series.pages[0] if series.pages else self._tiff.pages[0]
        channel_count = self._size(series.shape, "C") if "C" in self._axes else 1
        is_rgb = "S" in self._axes and self._size(series.shape, "S") in (3, 4)
        if self._tiff.is_qpi:
            names, colours = _qptiff_channels(self._tiff)
            fmt = "qptiff"
        else:
            names = [f"channel {i}" for i in range(channel_count)]
            colours = []
            fmt = "ome-tiff" if self._tiff.is_ome else "tiff"
        multichannel = not is_rgb and channel_count > 1
        self._channel_colours = colours or _DEFAULT_CHANNEL_COLOURS
        mpp = _mpp_from_page(page)
        return ReaderMetadata(
            format=fmt,
            level_dimensions=dims,
            level_downsamples=[dims[0][0] / w for w, _ in dims],
            mpp=mpp,
            mpp_note=None if mpp else "the TIFF has no usable resolution tags",
            objective_power=_qptiff_objective(page.description) if fmt == "qptiff" else None,
            channels=names if multichannel else ["R", "G", "B"] if is_rgb else ["gray"],
            modality="fluorescence" if multichannel else None,
            associated_images=[s.name.lower() for s in self._tiff.series[1:] if s.name],
        )

    def _size(self, shape: tuple[int, ...], axis: str) -> int:
        return int(shape[self._axes.index(axis)])

    def _level_rgb(self, level: int) -> np.ndarray:
        if level not in self._cache:
            entry = self._levels[level]
            if entry.nbytes > MAX_DECODED_LEVEL_BYTES:
                raise RegionError(
                    f"{self._path}: level {level} is a {entry.nbytes / 1024**3:.1f} GiB untiled "
                    "image. Convert it to a tiled pyramidal TIFF (e.g. `vips tiffsave in.tif "
                    "out.tif --tile --pyramid`) and open that."
                )
            try:
                data = entry.asarray()
            except (ValueError, OSError, tifffile.TiffFileError) as error:
                raise CorruptSlideError(
                    f"{self._path}: pixel data cannot be decoded ({error}); the file is "
                    "probably truncated."
                ) from error
            self._cache = {level: self._to_rgb(data)}
        return self._cache[level]

    def _to_rgb(self, data: np.ndarray) -> np.ndarray:
        axes = self._axes
        if "S" in axes:
            rgb = np.moveaxis(data, axes.index("S"), -1)[..., :3]
            return np.ascontiguousarray(_to_uint8(rgb))
        if "C" in axes:
            return _false_colour(np.moveaxis(data, axes.index("C"), -1), self._channel_colours)
        grey = _to_uint8(data)
        return np.repeat(grey[..., None], 3, axis=-1)

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        downsample = self.metadata.level_downsamples[level]
        image = self._level_rgb(level)
        return crop_padded(image, round(x / downsample), round(y / downsample), width, height)

    def associated_image(self, name: str) -> np.ndarray:
        for series in self._tiff.series[1:]:
            if series.name.lower() == name:
                data = series.asarray()
                if data.ndim == 2:
                    data = np.repeat(data[..., None], 3, axis=-1)
                return np.ascontiguousarray(_to_uint8(data[..., :3]))
        raise KeyError(name)

    def close(self) -> None:
        self._tiff.close()


def _to_uint8(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.uint8:
        return data
    high = float(np.percentile(data, 99.8)) or 1.0
    return np.clip(data.astype(np.float32) * (255.0 / high), 0, 255).astype(np.uint8)


def _false_colour(channels: np.ndarray, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """Additive composite of fluorescence channels, each scaled to its 99.8th percentile."""
    out = np.zeros((*channels.shape[:2], 3), dtype=np.float32)
    for index in range(channels.shape[-1]):
        channel = channels[..., index].astype(np.float32)
        high = float(np.percentile(channel, 99.8)) or 1.0
        colour = np.asarray(colours[index % len(colours)], dtype=np.float32) / 255.0
        out += np.clip(channel / high, 0, 1)[..., None] * colour
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def _mpp_from_page(page: tifffile.TiffPage) -> tuple[float, float] | None:
    unit_tag = page.tags.get("ResolutionUnit")
    x_tag, y_tag = page.tags.get("XResolution"), page.tags.get("YResolution")
    if not (unit_tag and x_tag and y_tag):
        return None
    (x_num, x_den), (y_num, y_den) = x_tag.value, y_tag.value
    if not (x_den and y_den):
        return None
    unit = _RESOLUTION_UNIT_NAMES.get(int(unit_tag.value), "")
    return mpp_from_resolution(unit, x_num / x_den, y_num / y_den)


def _qptiff_channels(tiff: tifffile.TiffFile) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Channel names and display colours from the per-page PerkinElmer XML descriptions."""
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    for page in tiff.series[0].pages:
        description = page.description or ""
        name = re.search(r"<Name>([^<]+)</Name>", description)
        colour = re.search(r"<Color>(\d+),(\d+),(\d+)</Color>", description)
        names.append(name.group(1) if name else f"channel {len(names)}")
        if colour:
            colours.append(tuple(int(c) for c in colour.groups()))  # type: ignore[arg-type]
    return names, colours if len(colours) == len(names) else []


def _qptiff_objective(description: str) -> float | None:
    match = re.search(r"<Objective>(\d+(?:\.\d+)?)x</Objective>", description or "")
    return float(match.group(1)) if match else None
