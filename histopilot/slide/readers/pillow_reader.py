"""Plain raster images (PNG, JPEG, BMP, …) as single-level slides.

Screenshots, exported fields of view and dataset patches arrive this way. Their dpi fields are
image-editor defaults, so no resolution is read from them: users pass ``--slide-mpp``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from histopilot.errors import CorruptSlideError, RegionError
from histopilot.slide.readers.base import (
    GENERATED_KEY,
    ReaderMetadata,
    SlideReader,
    crop_padded,
)

#: Pillow's own decompression-bomb guard, raised to what a slide-sized image can be.
MAX_IMAGE_PIXELS = 1_000_000_000


class PillowReader(SlideReader):
    """A raster image Pillow can decode, read once into memory."""

    name = "pillow"

    def __init__(self, path: Path, image: Image.Image) -> None:
        self._path = path
        self._format = (image.format or path.suffix.lstrip(".")).lower()
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise RegionError(
                f"{path}: {width}x{height} pixels is beyond the {MAX_IMAGE_PIXELS:,} pixel limit "
                "for flat images. Convert it to a tiled pyramidal TIFF and open that."
            )
        self._image = image
        self._pixels: np.ndarray | None = None
        # Overviews read strips on several threads; Pillow decodes a file on one at a time.
        self._decoding = threading.Lock()
        self.metadata = ReaderMetadata(
            format=self._format,
            level_dimensions=[(width, height)],
            level_downsamples=[1.0],
            mpp_note="plain images carry no trustworthy resolution",
            generated=image.info.get(GENERATED_KEY),
        )

    def _rgb(self) -> np.ndarray:
        with self._decoding:
            return self._decoded()

    def _decoded(self) -> np.ndarray:
        if self._pixels is None:
            try:
                image = self._image
                if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                    image = Image.alpha_composite(background, image.convert("RGBA"))
                self._pixels = np.asarray(image.convert("RGB"))
            except (OSError, SyntaxError, ValueError) as error:
                raise CorruptSlideError(
                    f"{self._path}: the image data cannot be decoded ({error}); the file is "
                    "probably truncated."
                ) from error
        return self._pixels

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return crop_padded(self._rgb(), x, y, width, height)

    def associated_image(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:
        self._image.close()
