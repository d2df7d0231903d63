"""DICOM VL Whole Slide Microscopy files that OpenSlide rejects.

OpenSlide only opens DICOM WSI with complete headers (ImageType "flavor", functional groups).
Files written by converters often lack them: TCGA slides converted with early pydicom scripts,
for example, have no ImageType and no Pixel Measures. This reader accepts any single-file,
TILED_FULL instance, one pyramid level, decoding frames with Pillow (JPEG baseline) or pydicom.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames

from histopilot.errors import CorruptSlideError, UnsupportedSlideFormatError
from histopilot.slide.readers.base import ReaderMetadata, SlideReader, plausible_mpp

VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


class DicomReader(SlideReader):
    """One tiled VL WSI instance read with pydicom."""

    name = "dicom"

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            self._ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as error:
            raise CorruptSlideError(f"{path}: not a readable DICOM file ({error}).") from error
        sop_class = str(
            self._ds.get("SOPClassUID", "")
            or getattr(self._ds.file_meta, "MediaStorageSOPClassUID", "")
        )
        if sop_class == VL_WSI_SOP_CLASS and "SOPClassUID" not in self._ds:
            raise CorruptSlideError(
                f"{path}: a whole-slide DICOM whose data set is missing; the file is truncated."
            )
        if sop_class != VL_WSI_SOP_CLASS:
            raise UnsupportedSlideFormatError(
                f"{path}: this DICOM object is not a VL Whole Slide Microscopy image "
                f"(SOP class {sop_class or 'missing'})."
            )
        organisation = str(self._ds.get("DimensionOrganizationType", "TILED_FULL"))
        if organisation != "TILED_FULL":
            raise UnsupportedSlideFormatError(
                f"{path}: DICOM tiles organised as {organisation} are not supported here; "
                "open the whole series folder so OpenSlide can read it."
            )
        try:
            self._tile_w, self._tile_h = int(self._ds.Columns), int(self._ds.Rows)
            width = int(self._ds.TotalPixelMatrixColumns)
            height = int(self._ds.TotalPixelMatrixRows)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise CorruptSlideError(
                f"{path}: the DICOM header lacks the tile or matrix size ({error}); the file "
                "is incomplete or was not written as a whole-slide image."
            ) from error
        if min(self._tile_w, self._tile_h, width, height) <= 0:
            raise CorruptSlideError(f"{path}: the DICOM header gives an empty image size.")
        self._tiles_across = -(-width // self._tile_w)
        n_frames = int(self._ds.get("NumberOfFrames", 1))
        if n_frames != self._tiles_across * -(-height // self._tile_h):
            raise CorruptSlideError(
                f"{path}: {n_frames} frames do not tile a {width}x{height} matrix "
                f"in {self._tile_w}x{self._tile_h} tiles; the file is incomplete."
            )
        self._tiles_down = n_frames // self._tiles_across
        self._frames = self._split_frames(n_frames)
        self._decode = lru_cache(maxsize=64)(self._decode_frame)
        self._column_major = self._frames_are_column_major(width, height)
        mpp = self._pixel_spacing()
        self.metadata = ReaderMetadata(
            format="dicom",
            level_dimensions=[(width, height)],
            level_downsamples=[1.0],
            mpp=mpp,
            mpp_note=None if mpp else "the DICOM header has no Pixel Spacing",
            objective_power=self._objective_power(),
            notes=["frames are stored column by column, contrary to TILED_FULL; read accordingly"]
            if self._column_major
            else [],
        )

    def _split_frames(self, n_frames: int) -> list[bytes]:
        try:
            if self._ds.file_meta.TransferSyntaxUID.is_encapsulated:
                return list(generate_frames(self._ds.PixelData, number_of_frames=n_frames))
            pixels = self._ds.pixel_array
        except (AttributeError, ValueError, KeyError, EOFError) as error:
            raise CorruptSlideError(f"{self._path}: pixel data unreadable ({error}).") from error
        return [np.ascontiguousarray(frame).tobytes() for frame in pixels.reshape(n_frames, -1)]

    def _frames_are_column_major(self, width: int, height: int) -> bool:
        """Detect writers that store TILED_FULL frames column by column.

        The standard orders frames row by row. Some converters wrote them column by column;
        read row by row, such a slide comes out shuffled. Edge tiles tell the two apart: the
        part of an edge tile beyond the pixel matrix is uniform padding under the right order.
        """
        pad_x = self._tiles_across * self._tile_w - width
        pad_y = self._tiles_down * self._tile_h - height
        if pad_x == 0 and pad_y == 0:
            return False

        def padding_spread(column_major: bool) -> float:
            spread = 0.0
            for row in range(self._tiles_down):
                tile = self._decode(self._frame_index(row, self._tiles_across - 1, column_major))
                spread += float(tile[:, tile.shape[1] - pad_x :].std()) if pad_x else 0.0
            for col in range(self._tiles_across):
                tile = self._decode(self._frame_index(self._tiles_down - 1, col, column_major))
                spread += float(tile[tile.shape[0] - pad_y :].std()) if pad_y else 0.0
            return spread

        return padding_spread(column_major=True) < padding_spread(column_major=False)

    def _frame_index(self, row: int, col: int, column_major: bool) -> int:
        if column_major:
            return col * self._tiles_down + row
        return row * self._tiles_across + col

    def _pixel_spacing(self) -> tuple[float, float] | None:
        try:
            measures = self._ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            row_mm, col_mm = (float(v) for v in measures.PixelSpacing)
        except (AttributeError, IndexError, ValueError):
            return None
        return plausible_mpp(col_mm * 1000, row_mm * 1000)

    def _objective_power(self) -> float | None:
        for optical_path in self._ds.get("OpticalPathSequence", []):
            if "ObjectiveLensPower" in optical_path:
                return float(optical_path.ObjectiveLensPower)
        return None

    def _decode_frame(self, index: int) -> np.ndarray:
        data = self._frames[index]
        if self._ds.file_meta.TransferSyntaxUID.is_encapsulated:
            try:
                with Image.open(io.BytesIO(data)) as frame:
                    return np.asarray(frame.convert("RGB"))
            except OSError as error:
                raise CorruptSlideError(
                    f"{self._path}: frame {index} cannot be decoded ({error})."
                ) from error
        return np.frombuffer(data, dtype=np.uint8).reshape(self._tile_h, self._tile_w, -1)[..., :3]

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        full_w, full_h = self.metadata.level_dimensions[0]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, full_w), min(y + height, full_h)
        for row in range(y0 // self._tile_h, -(-y1 // self._tile_h) if y1 > y0 else 0):
            for col in range(x0 // self._tile_w, -(-x1 // self._tile_w) if x1 > x0 else 0):
                tile = self._decode(self._frame_index(row, col, self._column_major))
                tx, ty = col * self._tile_w, row * self._tile_h
                ix0, iy0 = max(x0, tx), max(y0, ty)
                ix1 = min(x1, tx + tile.shape[1])
                iy1 = min(y1, ty + tile.shape[0])
                out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = tile[
                    iy0 - ty : iy1 - ty, ix0 - tx : ix1 - tx
                ]
        return out

    def associated_image(self, name: str) -> np.ndarray:
        raise KeyError(name)
