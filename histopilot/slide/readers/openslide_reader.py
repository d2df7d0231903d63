"""OpenSlide: the first reader tried for every file.

openslide-bin ships the C library, so Aperio SVS (JPEG and JPEG 2000), Hamamatsu NDPI/VMS,
MIRAX, Leica SCN, Philips TIFF, Ventana, Zeiss CZI, DICOM WSI and generic tiled TIFF work from
a plain ``pip install``. The C library releases the GIL while decoding, which is what lets the
tiler read with threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from histopilot.errors import CorruptSlideError
from histopilot.slide.readers.base import (
    ReaderMetadata,
    SlideReader,
    mpp_from_resolution,
    plausible_mpp,
)


def rgb_on_white(image: Image.Image) -> np.ndarray:
    """OpenSlide's RGBA output as RGB, transparent areas (no scan data = glass) made white.

    The checks and conversions run in Pillow's C code: on a fully opaque tissue tile this is
    one extrema scan and one copy, cheaper than the same work in numpy.
    """
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    if image.getextrema()[3][0] < 255:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return np.asarray(image.convert("RGB"))


class OpenSlideReader(SlideReader):
    """Any format the OpenSlide C library recognises."""

    name = "openslide"

    def __init__(self, path: Path, vendor: str) -> None:
        self._path = path
        try:
            self._slide = openslide.OpenSlide(path)
        except openslide.OpenSlideError as error:
            raise CorruptSlideError(
                f"{path}: OpenSlide recognises this as a '{vendor}' slide but cannot read it "
                f"({error}). The file is probably truncated or damaged: copy it again from the "
                "scanner or archive."
            ) from error
        self.metadata = self._read_metadata(vendor)

    def _read_metadata(self, vendor: str) -> ReaderMetadata:
        props = self._slide.properties
        mpp = _mpp_from_properties(props)
        power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        return ReaderMetadata(
            format=vendor,
            level_dimensions=list(self._slide.level_dimensions),
            level_downsamples=[float(d) for d in self._slide.level_downsamples],
            mpp=mpp,
            mpp_note=None if mpp else "the file declares no microns-per-pixel",
            objective_power=float(power) if power else None,
            associated_images=sorted(self._slide.associated_images.keys()),
        )

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            region = self._slide.read_region((x, y), level, (width, height))
        except openslide.OpenSlideError as error:
            raise CorruptSlideError(
                f"{self._path}: reading pixels failed ({error}). The file is probably "
                "truncated or damaged: copy it again from the scanner or archive."
            ) from error
        return rgb_on_white(region)

    def associated_image(self, name: str) -> np.ndarray:
        try:
            image = self._slide.associated_images[name]
        except openslide.OpenSlideError as error:
            raise CorruptSlideError(f"{self._path}: associated image '{name}': {error}") from error
        return rgb_on_white(image)

    def close(self) -> None:
        self._slide.close()


def _mpp_from_properties(props: Mapping[str, str]) -> tuple[float, float] | None:
    mpp_x = props.get(openslide.PROPERTY_NAME_MPP_X)
    mpp_y = props.get(openslide.PROPERTY_NAME_MPP_Y)
    if mpp_x and mpp_y:
        return plausible_mpp(float(mpp_x), float(mpp_y))
    # Generic TIFF: OpenSlide exposes the resolution tags but does not convert them.
    res_x, res_y = props.get("tiff.XResolution"), props.get("tiff.YResolution")
    if res_x and res_y:
        return mpp_from_resolution(props.get("tiff.ResolutionUnit", ""), float(res_x), float(res_y))
    return None
