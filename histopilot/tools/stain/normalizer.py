"""Stain normalization: make tiles look as if stained and scanned like a target.

A :class:`StainTarget` (a small JSON file) holds what was fitted from one or more reference
images; :class:`StainNormalizer` applies it to batches on the CPU or a GPU. Tiles that cannot be
normalized safely (glass, marker ink, a single stain) are returned unchanged with a flag saying
why, so a training loop or a slide-wide job never stops on them.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from histopilot.errors import StainError
from histopilot.storage import atomic_file
from histopilot.tools.images import as_rgb8
from histopilot.tools.stain.colour import lab_to_rgb, pen_pixels, rgb_to_lab
from histopilot.tools.stain.estimate import (
    macenko_matrix,
    sparse_concentrations,
    stain_angle,
    usable,
    vahadane_matrix,
)
from histopilot.tools.stain.optical import (
    concentrations,
    from_optical_density,
    map_pixels,
    optical_density,
    percentile,
    pixels_of,
    tissue_pixels,
)

Method = Literal["macenko", "reinhard", "vahadane"]
Flag = Literal["normalized", "augmented", "no_tissue", "pen_marks", "single_stain", "degenerate"]
METHODS: tuple[Method, ...] = ("macenko", "reinhard", "vahadane")

MIN_TISSUE = 0.02  # a tile with less stained area is glass for this purpose
PEN_LIMIT = 0.02  # more coloured ink than this (share of pixels) and the tile is left alone;
# fresh blood can pass for red ink, so a haemorrhagic tile may be left alone too
MIN_STAIN_ANGLE = 0.12  # rad (≈7°); two-stain H&E tiles measure 0.22–0.72 on the shared patches
MAX_PERCENT = 99.0  # robust maximum concentration
# Pixels per image the stain estimate uses: at least this many, or one in SAMPLE_SHARE on
# large tiles, where the 1 % angle tails need more pixels to sit still.
ESTIMATE_PIXELS = 8192
SAMPLE_SHARE = 16


class StainTarget(BaseModel):
    """What normalization maps to, fitted from reference images; saved as JSON."""

    model_config = ConfigDict(frozen=True)

    format: Literal["histopilot-stain-target"] = "histopilot-stain-target"
    method: Method
    stain_matrix: list[list[float]] | None = Field(
        default=None, description="3×2 unit OD vectors, columns hematoxylin and eosin"
    )
    max_concentrations: list[float] | None = Field(
        default=None, description="99th-percentile hematoxylin and eosin concentrations"
    )
    lab_mean: list[float] | None = Field(default=None, description="Tissue L*a*b* means")
    lab_std: list[float] | None = Field(default=None, description="Tissue L*a*b* std devs")
    images: int = Field(ge=1, description="Reference images fitted")
    tissue_pixels: int = Field(ge=1, description="Tissue pixels the fit used")

    @field_validator("stain_matrix")
    @classmethod
    def _three_by_two(cls, value):
        if value is not None and (len(value) != 3 or any(len(row) != 2 for row in value)):
            raise ValueError("stain_matrix must be 3 rows of 2 values")
        return value

    @model_validator(mode="after")
    def _complete(self) -> StainTarget:
        needs = (
            ("lab_mean", "lab_std")
            if self.method == "reinhard"
            else ("stain_matrix", "max_concentrations")
        )
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.method} target needs {', '.join(missing)}")
        sizes = {"max_concentrations": 2, "lab_mean": 3, "lab_std": 3}
        for name, size in sizes.items():
            value = getattr(self, name)
            if value is not None and len(value) != size:
                raise ValueError(f"{name} must hold {size} values")
        numbers = [
            *(v for row in self.stain_matrix or [] for v in row),
            *(self.max_concentrations or []),
            *(self.lab_mean or []),
            *(self.lab_std or []),
        ]
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError("every value must be a finite number")
        if any(v <= 0 for v in [*(self.max_concentrations or []), *(self.lab_std or [])]):
            raise ValueError("concentrations and standard deviations must be positive")
        return self

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> StainTarget:
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError as error:
            raise StainError(f"{path}: no such stain target file") from error
        except OSError as error:
            raise StainError(f"{path}: cannot read the stain target ({error})") from error
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as error:
            raise StainError(
                f"{path}: not a histopilot stain target ({error}); "
                "create one with `histopilot stain fit`"
            ) from error


@dataclass(frozen=True)
class StainBatch:
    """Normalized (or augmented) images, in the caller's array type, with one flag each."""

    images: np.ndarray | torch.Tensor
    flags: list[Flag]


@dataclass(frozen=True)
class Screened:
    """A batch in OD with its usable-tissue mask and the flags decided before fitting."""

    pixels: torch.Tensor
    od: torch.Tensor
    tissue: torch.Tensor
    flags: list[Flag | None]


def screen(pixels: torch.Tensor, *, min_tissue: float, pen_limit: float | None) -> Screened:
    """OD, tissue mask (ink excluded) and glass/ink flags of a batch of pixels (B, N, 3)."""
    od = optical_density(pixels)
    tissue = tissue_pixels(od)
    pen_share = torch.zeros(len(pixels), device=pixels.device)
    if pen_limit is not None:
        ink = pen_pixels(pixels)
        tissue &= ~ink
        pen_share = ink.float().mean(1)
    tissue_share = tissue.float().mean(1)
    flags: list[Flag | None] = []
    for share, pen in zip(tissue_share.tolist(), pen_share.tolist(), strict=True):
        if share < min_tissue:
            flags.append("no_tissue")
        elif pen_limit is not None and pen > pen_limit:
            flags.append("pen_marks")
        else:
            flags.append(None)
    return Screened(pixels, od, tissue, flags)


def estimate_matrix(method: Method, od: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    return vahadane_matrix(od, tissue) if method == "vahadane" else macenko_matrix(od, tissue)


def stain_amounts(method: Method, od: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Concentrations of every pixel: sparse and non-negative for Vahadane, least squares else."""
    if method == "vahadane":
        return sparse_concentrations(od, matrix)
    return concentrations(od, matrix)


def matrix_flags(matrix: torch.Tensor, maxima: torch.Tensor | None = None) -> list[Flag | None]:
    """``single_stain`` where the vectors coincide, ``degenerate`` where numbers broke down."""
    angle = stain_angle(matrix).tolist()
    finite = torch.isfinite(matrix).flatten(1).all(1)
    if maxima is not None:
        finite &= torch.isfinite(maxima).all(1) & (maxima > 1e-3).all(1)
    flags: list[Flag | None] = []
    for ok, theta in zip(finite.tolist(), angle, strict=True):
        if not ok or theta != theta:  # NaN angle: too few tissue pixels to estimate from
            flags.append("degenerate")
        elif theta < MIN_STAIN_ANGLE:
            flags.append("single_stain")
        else:
            flags.append(None)
    return flags


class StainNormalizer:
    """Batched Macenko, Vahadane or Reinhard normalization toward a fitted target."""

    def __init__(
        self,
        target: StainTarget,
        *,
        device: str | torch.device = "cpu",
        min_tissue: float = MIN_TISSUE,
        pen_limit: float | None = PEN_LIMIT,
    ) -> None:
        self.target = target
        self.device = torch.device(device)
        self.min_tissue = min_tissue
        self.pen_limit = pen_limit
        if target.method == "reinhard":
            self._mean = torch.tensor(target.lab_mean, device=self.device)
            self._std = torch.tensor(target.lab_std, device=self.device)
        else:
            self._matrix = torch.tensor(target.stain_matrix, device=self.device)
            self._maxima = torch.tensor(target.max_concentrations, device=self.device)

    @property
    def method(self) -> Method:
        return self.target.method

    @classmethod
    def fit(
        cls,
        references: Sequence[np.ndarray] | np.ndarray,
        method: Method = "macenko",
        *,
        device: str | torch.device = "cpu",
        **options,
    ) -> StainNormalizer:
        """Fit to one reference image or pool the tissue of several (any sizes)."""
        if method not in METHODS:
            raise StainError(f"unknown stain method {method!r}; choose from {', '.join(METHODS)}")
        images = (
            [references]
            if isinstance(references, np.ndarray) and references.ndim == 3
            else (list(references))
        )
        if not images:
            raise StainError("no reference images to fit a stain target to")
        images = [as_rgb8(image, name=f"reference image {n + 1}") for n, image in enumerate(images)]
        pooled = torch.cat([pixels_of(image[None], device) for image in images], dim=1)
        screened = screen(pooled, min_tissue=0.0, pen_limit=options.get("pen_limit", PEN_LIMIT))
        tissue_count = int(screened.tissue.sum())
        if tissue_count < 64:
            raise StainError(
                "the reference images show no stained tissue to fit a target to; "
                "choose a tile that is mostly tissue"
            )
        target = _fit_target(method, pooled, screened, len(images), tissue_count)
        return cls(target, device=device, **options)

    @classmethod
    def load(cls, path: str | Path, **options) -> StainNormalizer:
        return cls(StainTarget.load(path), **options)

    def save(self, path: str | Path) -> Path:
        return self.target.save(path)

    def transform(self, images: np.ndarray | torch.Tensor) -> StainBatch:
        """Normalize uint8 RGB (B, H, W, 3); flagged images come back unchanged.

        The stain estimate of each image uses a fixed random sample of its pixels (at least
        :data:`ESTIMATE_PIXELS`, or one in :data:`SAMPLE_SHARE` on large tiles), then the
        mapping is applied to every pixel. The sample costs a little agreement with an
        all-pixel estimate on sparse tissue, where the 1 % angle tails rest on few pixels (see
        docs/stain-and-diffusion.md). Tensors come back on the normalizer's device.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise StainError(
                f"expected a batch of RGB images (B, H, W, 3), got {tuple(images.shape)}"
            )
        if 0 in images.shape:
            raise StainError(f"empty batch or empty images: shape {tuple(images.shape)}")
        if images.dtype not in (np.uint8, torch.uint8):
            raise StainError(
                f"expected uint8 RGB, got {images.dtype}; "
                "convert with histopilot.tools.images.as_rgb8"
            )
        pixels = torch.as_tensor(images).to(self.device).reshape(images.shape[0], -1, 3)
        output, flags = self._normalize(pixels)
        return StainBatch(as_input_type(images, output), flags)

    def _normalize(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[Flag]]:
        screened = screen(
            estimation_sample(pixels), min_tissue=self.min_tissue, pen_limit=self.pen_limit
        )
        if self.method == "reinhard":
            output, flags = self._reinhard(pixels, screened), screened.flags
        else:
            output, flags = self._stain_space(pixels, screened)
        keep = [index for index, flag in enumerate(flags) if flag is not None]
        output[keep] = pixels[keep]
        return output, [flag or "normalized" for flag in flags]

    def _stain_space(
        self, pixels: torch.Tensor, screened: Screened
    ) -> tuple[torch.Tensor, list[Flag | None]]:
        matrix = estimate_matrix(self.method, screened.od, screened.tissue)
        solvable = usable(matrix)
        maxima = percentile(
            stain_amounts(self.method, screened.od, solvable).transpose(1, 2), MAX_PERCENT
        )
        flags = [
            first or second
            for first, second in zip(screened.flags, matrix_flags(matrix, maxima), strict=True)
        ]
        scale = torch.nan_to_num(self._maxima / maxima, nan=1.0, posinf=1.0, neginf=1.0)
        if self.method == "vahadane":

            def remix(chunk: torch.Tensor, images: slice) -> torch.Tensor:
                amounts = sparse_concentrations(optical_density(chunk), solvable[images])
                return from_optical_density((amounts * scale[images, None]) @ self._matrix.T)

        else:
            # Least-squares unmixing, rescaling and remixing compose into one 3×3 map of OD.
            unmix = torch.linalg.pinv(solvable).transpose(1, 2) * scale.unsqueeze(1)
            mapping = unmix @ self._matrix.T

            def remix(chunk: torch.Tensor, images: slice) -> torch.Tensor:
                return from_optical_density(optical_density(chunk) @ mapping[images])

        return map_pixels(pixels, remix), flags

    def _reinhard(self, pixels: torch.Tensor, screened: Screened) -> torch.Tensor:
        mean, std = _masked_moments(rgb_to_lab(screened.pixels), screened.tissue)
        gain = (self._std / std).unsqueeze(1)
        shift = self._mean - mean.unsqueeze(1) * gain

        def restain(chunk: torch.Tensor, images: slice) -> torch.Tensor:
            return lab_to_rgb(rgb_to_lab(chunk) * gain[images] + shift[images])

        return map_pixels(pixels, restain)


def estimation_sample(pixels: torch.Tensor) -> torch.Tensor:
    """A fixed random sample of each image's pixels (B, N, 3), as float (see ESTIMATE_PIXELS).

    A fixed random subset rather than a stride: a stride that divides the tile width samples
    only a few columns.
    """
    count = max(ESTIMATE_PIXELS, pixels.shape[1] // SAMPLE_SHARE)
    if pixels.shape[1] <= count:
        return pixels.float()
    return pixels[:, _sample_positions(pixels.shape[1], count, pixels.device)].float()


@functools.cache
def _sample_positions(total: int, count: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(total)
    chosen = torch.randperm(total, generator=generator)[:count]
    return chosen.sort().values.to(device)


def _fit_target(
    method: Method, pixels: torch.Tensor, screened: Screened, images: int, tissue_count: int
) -> StainTarget:
    common = {"method": method, "images": images, "tissue_pixels": tissue_count}
    if method == "reinhard":
        mean, std = _masked_moments(rgb_to_lab(pixels), screened.tissue)
        return StainTarget(lab_mean=mean[0].tolist(), lab_std=std[0].tolist(), **common)
    tissue_od = screened.od[screened.tissue].unsqueeze(0)
    everything = torch.ones(tissue_od.shape[:2], dtype=torch.bool, device=tissue_od.device)
    matrix = estimate_matrix(method, tissue_od, everything)
    amounts = stain_amounts(method, screened.od, usable(matrix))
    maxima = percentile(amounts.transpose(1, 2), MAX_PERCENT)
    problem = matrix_flags(matrix, maxima)[0]
    if problem is not None:
        raise StainError(
            f"cannot fit a {method} target: the reference images show "
            + ("a single stain" if problem == "single_stain" else "too little usable stain")
            + "; choose references with both hematoxylin and eosin"
        )
    return StainTarget(
        stain_matrix=matrix[0].tolist(), max_concentrations=maxima[0].tolist(), **common
    )


def _masked_moments(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = mask.unsqueeze(-1).float()
    count = weights.sum(1).clamp_min(1.0)
    mean = (values * weights).sum(1) / count
    variance = (((values - mean.unsqueeze(1)) ** 2) * weights).sum(1) / count
    return mean, variance.sqrt().clamp_min(1e-3)


def as_input_type(
    original: np.ndarray | torch.Tensor, result: torch.Tensor
) -> np.ndarray | torch.Tensor:
    """``result`` (B, N, 3) shaped like ``original`` and of its array type."""
    shaped = result.reshape(original.shape)
    return shaped if isinstance(original, torch.Tensor) else shaped.cpu().numpy()


__all__ = ["METHODS", "Flag", "Method", "StainBatch", "StainNormalizer", "StainTarget"]
