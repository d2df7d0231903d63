"""Pick the reader for a file: OpenSlide first, then DICOM, TIFF and plain-image fallbacks.

Detection is by content, not by extension, so a renamed file still opens and a random file
named ``.svs`` is refused with a message instead of a crash deep inside a decoder.
"""

from __future__ import annotations

from pathlib import Path

import openslide
from PIL import Image, UnidentifiedImageError

from histopilot.errors import (
    CorruptSlideError,
    HistopilotError,
    RegionError,
    SlideNotFoundError,
    UnsupportedSlideFormatError,
)
from histopilot.slide.readers.base import ReaderMetadata, SlideReader
from histopilot.slide.readers.dicom_reader import DicomReader
from histopilot.slide.readers.openslide_reader import OpenSlideReader
from histopilot.slide.readers.pillow_reader import MAX_IMAGE_PIXELS, PillowReader
from histopilot.slide.readers.tiff_reader import TiffReader

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "WHOLE_SLIDE_SUFFIXES",
    "ReaderMetadata",
    "SlideReader",
    "open_reader",
]

SUPPORTED_EXTENSIONS = [
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".mrxs",
    ".scn",
    ".bif",
    ".czi",
    ".svslide",
    ".dcm",
    ".qptiff",
    ".ome.tif",
    ".ome.tiff",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
]
#: Formats that are always whole slides; plain TIFF and PNG files may be tiles or slides.
WHOLE_SLIDE_SUFFIXES = frozenset(
    {".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide", ".dcm", ".qptiff"}
)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_reader(path: Path) -> SlideReader:
    """Open ``path`` with the first reader that understands its contents."""
    path = _resolve_input(path)
    vendor = openslide.OpenSlide.detect_format(path)
    head = _read_head(path)
    if vendor == "dicom" or head[128:132] == b"DICM":
        return _open_dicom(path, vendor)
    if vendor is not None:
        return OpenSlideReader(path, vendor)
    if head[:4] in _TIFF_MAGIC:
        return TiffReader(path)
    return _open_with_pillow(path)


def _resolve_input(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise SlideNotFoundError(f"{path}: no such file. Check the path and try again.")
    if path.is_dir():
        dicom_files = sorted(path.glob("*.dcm"))
        if not dicom_files:
            raise SlideNotFoundError(
                f"{path} is a folder. Pass a slide file; for a DICOM WSI series, pass the "
                "folder that holds its .dcm files."
            )
        return dicom_files[0]
    if path.stat().st_size == 0:
        raise CorruptSlideError(f"{path} is empty (0 bytes): the copy or upload did not finish.")
    return path


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(132)
    except OSError as error:
        raise SlideNotFoundError(f"{path}: cannot be read ({error.strerror}).") from error


def _open_dicom(path: Path, vendor: str | None) -> SlideReader:
    if vendor == "dicom":
        try:
            return OpenSlideReader(path, vendor)
        except HistopilotError:
            pass  # incomplete headers: the pydicom reader below is more lenient
    return DicomReader(path)


def _open_with_pillow(path: Path) -> SlideReader:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise RegionError(
            f"{path} declares more than {MAX_IMAGE_PIXELS:,} pixels, too many for a flat image. "
            "Convert it to a tiled pyramidal TIFF and open that."
        ) from error
    except (UnidentifiedImageError, OSError) as error:
        hint = (
            f"Its extension '{path.suffix}' is not one histopilot reads"
            if path.suffix.lower() not in SUPPORTED_EXTENSIONS
            else f"Its contents do not match its '{path.suffix}' extension"
        )
        raise UnsupportedSlideFormatError(
            f"{path} is not a slide or image histopilot can read. {hint}. Supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)} (OpenSlide formats, DICOM WSI, TIFF incl. "
            "QPTIFF, and plain images)."
        ) from error
    return PillowReader(path, image)
