"""The contract every patch encoder keeps, so indexes, search and agents never care which.

An encoder turns RGB tiles into L2-normalised float32 vectors of a fixed ``dim``; encoders
with a text tower also embed text into the same space, which is what makes search by text and
zero-shot scoring possible. ``mpp`` is the resolution the encoder expects its tiles at, so a
slide is tiled to match it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from histopilot.errors import EncoderError, ImageInputError
from histopilot.retrieval.vectors import normalized

#: Most pathology encoders were trained on 20x tiles (about 0.5 µm/px).
DEFAULT_MPP = 0.5
ImageBatch = np.ndarray | Sequence[np.ndarray]


class PatchEncoder(ABC):
    """Embeds tiles (and, for vision-language encoders, text) as unit-length vectors."""

    #: The registry name that loads this encoder again (stored with every index and cache).
    name: str
    #: Length of every vector it returns.
    dim: int
    #: Resolution, in µm per pixel, that tiles should be read at for this encoder.
    mpp: float = DEFAULT_MPP
    #: Pixels per side of a tile at ``mpp``.
    tile_size: int = 224

    @property
    def has_text(self) -> bool:
        """Whether ``encode_text`` is available."""
        return False

    @property
    def fingerprint(self) -> str:
        """Changes whenever the vectors would: caches made under another fingerprint are stale.

        Subclasses add what their output depends on beyond the name (weights, statistics).
        """
        return self.name

    def encode_images(self, images: ImageBatch, *, batch_size: int = 64) -> np.ndarray:
        """Unit-length float32 vectors (n, dim) for RGB uint8 images of any size."""
        batch = [as_rgb(image) for image in images]
        if not batch:
            return np.zeros((0, self.dim), np.float32)
        parts = [
            self._embed_images(batch[start : start + batch_size])
            for start in range(0, len(batch), batch_size)
        ]
        return normalized(np.concatenate(parts))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors (n, dim) for ``texts``, in the images' space."""
        raise EncoderError(
            f"the encoder {self.name!r} has no text tower, so it cannot search by text; "
            "use a vision-language encoder such as 'quiltnet-b-32' or 'plip'."
        )

    @abstractmethod
    def _embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Raw (not yet normalised) embeddings of one batch."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``image`` as a contiguous uint8 (H, W, 3) array; grey is expanded, alpha dropped."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ImageInputError(f"expected 8-bit RGB pixels, got an array of {array.dtype}.")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 8:
        raise ImageInputError(
            f"expected an RGB image of at least 8x8 pixels, got an array of shape {array.shape}."
        )
    return np.ascontiguousarray(array[..., :3])
