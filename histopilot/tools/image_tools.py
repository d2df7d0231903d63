"""Stain normalization and counterfactuals as LangChain tools, for the agents and chat.

Each tool takes an image file or a box on a slide, writes the result and a side-by-side PNG a
person can open, and answers with their paths and the measurements (JSON for the model, the
Pydantic result as the artifact). The resources (a fitted stain target, a diffusion model and
its classifiers) are bound when the tools are built, from the agents' settings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field, model_validator

from histopilot.errors import RegionError
from histopilot.retrieval.tools import structured_tool
from histopilot.slide import open_slide
from histopilot.slide.render import save_png
from histopilot.tools.images import GENERATED_NOTICE, read_rgb, side_by_side

MAX_BOX = 4096  # level-0 pixels on a side: larger boxes are views, not tiles


class ImageSource(BaseModel):
    """An image file, or a level-0 box on a slide read at ``mpp`` µm/px."""

    image_path: str | None = Field(None, description="A tile image file.")
    slide_path: str | None = Field(None, description="A slide, with the box below.")
    x: int | None = Field(None, ge=0, description="Box left, level-0 pixels.")
    y: int | None = Field(None, ge=0, description="Box top, level-0 pixels.")
    width: int | None = Field(None, gt=0, le=MAX_BOX, description="Box width, level-0 pixels.")
    height: int | None = Field(None, gt=0, le=MAX_BOX, description="Box height, level-0 px.")
    mpp: float = Field(0.5, gt=0, le=16, description="Resolution to read the box at, µm/px.")

    @model_validator(mode="after")
    def _one_source(self) -> ImageSource:
        box = (self.x, self.y, self.width, self.height)
        if (self.image_path is None) == (self.slide_path is None):
            raise ValueError("give an image_path, or a slide_path with x, y, width and height")
        if self.slide_path is not None and None in box:
            raise ValueError("a slide box needs x, y, width and height")
        return self

    def read(self) -> np.ndarray:
        if self.image_path is not None:
            return read_rgb(self.image_path)
        with open_slide(Path(self.slide_path)) as slide:
            if slide.mpp is None:
                raise RegionError(f"{self.slide_path} declares no µm/px; give an image instead")
            downsample = self.mpp / slide.mpp.mean
            width, height = round(self.width / downsample), round(self.height / downsample)
            return slide.read_region_at(
                self.x, self.y, max(width, 8), max(height, 8), downsample=downsample
            )

    def stem(self) -> str:
        """A file-name stem unique to this request (source, box and options)."""
        key = self.model_dump_json()
        return f"{safe_name(Path(self.image_path or self.slide_path).stem)}-{_digest(key)}"


def safe_name(text: str) -> str:
    """``text`` reduced to letters, digits, '-' and '_', for use in a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40] or "image"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


class NormalizeStainInput(ImageSource):
    """Normalize the stain of an image or slide region toward the configured target."""


class NormalizedImage(BaseModel):
    image: str
    side_by_side: str
    flag: str = Field(description="'normalized', or why the image was left unchanged")
    method: str


class CounterfactualInput(ImageSource):
    """Show how a tile would look as another tissue class (a model-made image, not evidence):
    returns the counterfactual, a difference heatmap and the classifier's probabilities."""

    target_class: str = Field(description="The class to change the tile toward.")


class CounterfactualResult(BaseModel):
    image: str
    side_by_side: str = Field(description="Source, counterfactual and difference heatmap")
    summary: dict
    virtual: bool = True
    notice: str = GENERATED_NOTICE + " It illustrates what the classifier responds to."


def image_tools(
    *,
    outputs: Path,
    stain_target: str | None = None,
    diffusion_model: str | None = None,
    classifier: str | None = None,
    oracle: str | None = None,
) -> list[BaseTool]:
    """The tools the configured resources support, writing their images under ``outputs``."""
    tools: list[BaseTool] = []
    if stain_target:
        tools.append(_normalize_tool(Path(stain_target), outputs))
    if diffusion_model and classifier:
        tools.append(_counterfactual_tool(diffusion_model, classifier, oracle, outputs))
    return tools


def _normalize_tool(target: Path, outputs: Path) -> BaseTool:
    from histopilot.tools.stain import StainNormalizer

    normalizer = StainNormalizer.load(target)

    def run(request: NormalizeStainInput) -> NormalizedImage:
        source = request.read()
        result = normalizer.transform(source[None])
        stem = outputs / f"{request.stem()}-{normalizer.method}"
        image = save_png(result.images[0], stem.with_name(stem.name + ".png"))
        panel = save_png(
            side_by_side(source, result.images[0]), stem.with_name(stem.name + "-compare.png")
        )
        return NormalizedImage(
            image=str(image),
            side_by_side=str(panel),
            flag=result.flags[0],
            method=normalizer.method,
        )

    return structured_tool(run, "normalize_stain", NormalizeStainInput)


def _counterfactual_tool(model_path: str, classifier_path: str, oracle_path, outputs) -> BaseTool:
    from histopilot.tools.diffusion import TileClassifier, TileDiffusion, counterfactuals

    model = TileDiffusion.from_pretrained(model_path)
    classifier = TileClassifier.load(classifier_path)
    oracle = TileClassifier.load(oracle_path) if oracle_path else None

    def run(request: CounterfactualInput) -> CounterfactualResult:
        size = model.image_size
        tile = cv2.resize(request.read(), (size, size), interpolation=cv2.INTER_AREA)
        (result,) = counterfactuals(
            model, classifier, tile[None], request.target_class, oracle=oracle
        )
        stem = outputs / request.stem()  # the stem covers the target class too
        made = f"counterfactual toward {request.target_class} (diffusion model {model_path})"
        image = save_png(result.image, stem.with_name(stem.name + ".png"), generated=made)
        panel = save_png(
            _enlarged(result.panel()), stem.with_name(stem.name + "-compare.png"), generated=made
        )
        return CounterfactualResult(
            image=str(image), side_by_side=str(panel), summary=result.summary()
        )

    return structured_tool(run, "generate_counterfactual", CounterfactualInput)


def _enlarged(panel: np.ndarray, height: int = 256) -> np.ndarray:
    """Small model tiles enlarged (nearest neighbour, no smoothing) so people can see them."""
    factor = max(1, height // panel.shape[0])
    return cv2.resize(panel, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
