"""Pydantic models the slide layer hands to the rest of histopilot.

They are small and serialisable: the agent graph, the API and ``--json`` output all carry them.
Pixel arrays never go in here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Modality = Literal["brightfield", "fluorescence"]
ReaderName = Literal["openslide", "dicom", "tifffile", "pillow"]

#: Associated images that may show patient identifiers: the label (barcode, handwriting) and
#: photos of the whole glass, label included ("macro"; DICOM calls it "overview"). A name that
#: contains one of these words ("Label Image", "slide_macro") is protected too.
PROTECTED_ASSOCIATED_IMAGES = frozenset({"label", "macro", "overview"})


def is_protected_image(name: str) -> bool:
    """Whether the associated image ``name`` may show patient identifiers."""
    lowered = name.lower()
    return any(word in lowered for word in PROTECTED_ASSOCIATED_IMAGES)


class MPP(BaseModel):
    """Microns per pixel at level 0, and where the figure came from."""

    model_config = ConfigDict(frozen=True)

    x: float = Field(gt=0, description="µm per pixel along x at level 0")
    y: float = Field(gt=0, description="µm per pixel along y at level 0")
    source: Literal["metadata", "user"] = Field(
        description="'metadata' when read from the file, 'user' when supplied with --slide-mpp"
    )

    @property
    def mean(self) -> float:
        """One figure for square-pixel arithmetic (scanners differ from square by < 0.1 %)."""
        return (self.x + self.y) / 2


class LevelInfo(BaseModel):
    """One pyramid level."""

    index: int
    width: int
    height: int
    downsample: float = Field(description="level-0 pixels per pixel of this level")
    mpp: float | None = Field(default=None, description="µm per pixel, when level 0's is known")


class SlideInfo(BaseModel):
    """Everything a user or an agent needs to know about a slide before reading pixels."""

    path: str
    name: str
    reader: ReaderName
    format: str = Field(description="vendor or container format, e.g. 'aperio', 'qptiff', 'png'")
    width: int = Field(description="level-0 width in pixels")
    height: int = Field(description="level-0 height in pixels")
    levels: list[LevelInfo]
    mpp: MPP | None = None
    mpp_note: str | None = Field(
        default=None, description="why the MPP is missing and how to supply it"
    )
    objective_power: float | None = Field(
        default=None, description="scanner objective as declared in the file (e.g. 20, 40)"
    )
    modality: Modality
    channels: list[str] = Field(description="channel names: R,G,B for brightfield RGB")
    associated_images: list[str] = Field(
        description="names of associated images (thumbnail, macro, label); the label and the "
        "macro can show patient identifiers and are only read when asked for explicitly"
    )
    file_size_bytes: int
    notes: list[str] = Field(
        default_factory=list, description="repairs applied to non-conformant files"
    )
    generated: str | None = Field(
        default=None,
        description="what made the image when a model did (a virtual stain, a counterfactual); "
        "such an image is never evidence",
    )
