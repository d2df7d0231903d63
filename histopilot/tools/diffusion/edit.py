"""Editing real tiles with a conditional diffusion model: stain transfer and counterfactuals.

* **Stain transfer.** DDIM-invert the tile under its source condition, regenerate under the
  target condition (training-free given a model conditioned on stain domains), or SDEdit:
  noise it part of the way and denoise under the target. Structure is checked on the
  hematoxylin channel, where nuclei are.
* **Counterfactual.** Invert part of the way under the source class, then regenerate under the
  target class (when the model knows it) with classifier guidance toward the target and an L1
  pull back to the source (DiME-style), so only what the classifier needs changes. The result
  reports the classifier's probabilities before and after, a second independent classifier's
  when one is given, and how close the counterfactual stays to the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from histopilot.errors import DiffusionError
from histopilot.evals.metrics.image import lpips, mae, ssim
from histopilot.tools.diffusion.classifier import TileClassifier
from histopilot.tools.diffusion.closeness import difference_heatmap, hematoxylin_ssim
from histopilot.tools.diffusion.model import TileDiffusion, to_uint8
from histopilot.tools.diffusion.sampling import add_noise, generate, invert, timesteps
from histopilot.tools.images import side_by_side

TransferMethod = Literal["ddim", "sdedit"]


@dataclass(frozen=True)
class StainTransfer:
    images: np.ndarray  # uint8 (B, H, W, 3)
    hematoxylin_ssim: list[float]
    method: TransferMethod


def transfer_stain(
    model: TileDiffusion,
    images: np.ndarray,
    source: str | list[str],
    target: str,
    *,
    method: TransferMethod = "ddim",
    steps: int = 50,
    strength: float = 0.6,
    seed: int = 0,
) -> StainTransfer:
    """Restain uint8 tiles (B, H, W, 3) from condition ``source`` to ``target``.

    ``strength`` is used by SDEdit only: how far to noise (more = freer, less faithful).
    """
    if method not in ("ddim", "sdedit"):
        raise DiffusionError(f"unknown transfer method {method!r}; choose ddim or sdedit")
    start = model.encode(images)
    target_ids = model.condition_ids(target, len(images))
    if method == "ddim":
        schedule = timesteps(model, steps)
        noise = invert(model, start, model.condition_ids(source, len(images)), schedule)
    else:
        schedule = timesteps(model, steps, strength)
        generator = torch.Generator().manual_seed(seed)
        noise = add_noise(model, start, schedule[0], generator)
    with torch.no_grad():
        result = to_uint8(model.decode(generate(model, noise, target_ids, schedule)))
    return StainTransfer(result, hematoxylin_ssim(images, result), method)


def reconstruct(
    model: TileDiffusion, images: np.ndarray, condition: str | list[str], *, steps: int = 50
) -> np.ndarray:
    """Invert and regenerate under the same condition: how faithful inversion is."""
    labels = model.condition_ids(condition, len(images))
    schedule = timesteps(model, steps)
    noise = invert(model, model.encode(images), labels, schedule)
    with torch.no_grad():
        return to_uint8(model.decode(generate(model, noise, labels, schedule)))


@dataclass(frozen=True)
class Counterfactual:
    """One tile changed toward ``target``, with the evidence a reader needs to judge it."""

    source: np.ndarray
    image: np.ndarray
    heatmap: np.ndarray = field(repr=False)
    target: str
    before: dict[str, float]
    after: dict[str, float]
    ssim: float
    l1: float
    lpips: float | None
    oracle_before: dict[str, float] | None = None
    oracle_after: dict[str, float] | None = None

    @property
    def flipped(self) -> bool:
        """The explained classifier now calls the tile ``target``."""
        return max(self.after, key=self.after.get) == self.target

    @property
    def oracle_flipped(self) -> bool | None:
        if self.oracle_after is None:
            return None
        return max(self.oracle_after, key=self.oracle_after.get) == self.target

    def panel(self) -> np.ndarray:
        """Source, counterfactual and difference heatmap side by side."""
        return side_by_side(self.source, self.image, self.heatmap)

    def summary(self) -> dict:
        return {
            "target": self.target,
            "flipped": self.flipped,
            "oracle_flipped": self.oracle_flipped,
            "probabilities_before": self.before,
            "probabilities_after": self.after,
            "oracle_before": self.oracle_before,
            "oracle_after": self.oracle_after,
            "ssim": self.ssim,
            "l1": self.l1,
            "lpips": self.lpips,
            "lpips_note": None
            if self.lpips is not None
            else "LPIPS skipped: AlexNet weights are not in the local torch hub cache",
        }


@dataclass(frozen=True)
class Guide:
    """How hard to push: classifier guidance scale, L1 pull to the source, noise level."""

    scale: float = 8.0
    proximity: float = 2.0
    strength: float = 0.6
    steps: int = 50


def counterfactuals(
    model: TileDiffusion,
    classifier: TileClassifier,
    images: np.ndarray,
    target: str,
    *,
    guide: Guide | None = None,
    oracle: TileClassifier | None = None,
    source_condition: str | None = None,
) -> list[Counterfactual]:
    """Counterfactuals of uint8 tiles (B, H, W, 3) toward class ``target``.

    The inversion runs under ``source_condition`` or, by default, the class the classifier
    predicts for each tile (which must then be one of the model's conditions; give
    ``source_condition`` for a model conditioned on something else, such as stain domains).
    """
    guide = guide or Guide()
    for judge in (classifier, oracle):
        if judge is not None and target not in judge.classes:
            raise DiffusionError(f"the classifier knows {', '.join(judge.classes)}, not {target!r}")
    device = model.device
    source = model.encode(images)
    pixels = model.decode(source).detach() if model.vae is not None else source
    classifier = classifier.to(device)
    before = classifier.probabilities(pixels)
    predicted = [classifier.classes[index] for index in before.argmax(-1).tolist()]
    sources = [source_condition] * len(images) if source_condition else predicted
    start_labels = model.condition_ids(sources, len(sources)) if model.conditions else None
    # Regenerate under the target class when the model knows it; guidance does the rest.
    ends = [target] * len(images) if target in model.conditions else sources
    end_labels = model.condition_ids(ends, len(ends)) if model.conditions else None
    schedule = timesteps(model, guide.steps, guide.strength)
    noise = invert(model, source, start_labels, schedule)
    wanted = classifier.classes.index(target)

    def toward_target(clean: torch.Tensor) -> torch.Tensor:
        clean = clean.detach().requires_grad_(True)
        decoded = model.decode(clean)
        log_probability = classifier(decoded).log_softmax(-1)[:, wanted].sum()
        distance = (decoded - pixels).abs().mean((1, 2, 3)).sum()
        objective = guide.scale * log_probability - guide.proximity * guide.scale * distance
        (gradient,) = torch.autograd.grad(objective, clean)
        return gradient

    final = generate(model, noise, end_labels, schedule, guidance=toward_target)
    with torch.no_grad():
        decoded = model.decode(final)
    after = classifier.probabilities(decoded)
    result = to_uint8(decoded)
    judged = _oracle(oracle, pixels, decoded)
    similarity, distance, perceptual = (
        ssim(images, result),
        mae(images, result),
        lpips(images, result),
    )
    return [
        Counterfactual(
            source=images[index],
            image=result[index],
            target=target,
            before=_named(classifier, before[index]),
            after=_named(classifier, after[index]),
            ssim=similarity[index],
            l1=distance[index],
            lpips=None if perceptual is None else perceptual[index],
            oracle_before=None if judged is None else _named(oracle, judged[0][index]),
            oracle_after=None if judged is None else _named(oracle, judged[1][index]),
            heatmap=difference_heatmap(images[index], result[index]),
        )
        for index in range(len(images))
    ]


def _oracle(oracle, pixels, decoded):
    if oracle is None:
        return None
    oracle = oracle.to(pixels.device)
    return oracle.probabilities(pixels), oracle.probabilities(decoded)


def _named(classifier: TileClassifier, probabilities: torch.Tensor) -> dict[str, float]:
    return {
        name: round(float(p), 4) for name, p in zip(classifier.classes, probabilities, strict=True)
    }
