"""Deterministic DDIM sampling and its inversion, with optional guidance.

One update serves both directions: DDIM (Song et al. 2021, η = 0) moves a sample from noise
level t to level s along the model's predicted clean image and noise, for s < t (generation)
and s > t (inversion: the same path walked backwards). Inverting a tile under one condition
and regenerating under another is stain transfer or a counterfactual without retraining.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from histopilot.errors import DiffusionError
from histopilot.tools.diffusion.model import TileDiffusion

# Guidance gets the predicted clean sample and returns the gradient to climb, same shape.
Guidance = Callable[[torch.Tensor], torch.Tensor]


def timesteps(model: TileDiffusion, steps: int, strength: float = 1.0) -> list[int]:
    """Descending DDIM timesteps that start at noise level ``strength`` (0–1] of the schedule."""
    if steps < 1:
        raise DiffusionError("give at least one sampling step")
    if not 0 < strength <= 1:
        raise DiffusionError(f"strength must lie in (0, 1], got {strength}")
    if steps > model.scheduler.config.num_train_timesteps:
        raise DiffusionError(
            f"{steps} steps is more than the model's "
            f"{model.scheduler.config.num_train_timesteps} training timesteps"
        )
    model.scheduler.set_timesteps(steps)
    schedule = [int(t) for t in model.scheduler.timesteps]
    return schedule[len(schedule) - max(1, round(steps * strength)) :]


def _alpha(model: TileDiffusion, timestep: int) -> torch.Tensor:
    """ᾱ at ``timestep``; −1 stands for the clean image (ᾱ = 1)."""
    cumulative = model.scheduler.alphas_cumprod
    return torch.tensor(1.0) if timestep < 0 else cumulative[timestep]


def ddim_move(
    model: TileDiffusion,
    sample: torch.Tensor,
    noise: torch.Tensor,
    source: int,
    target: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``sample`` from timestep ``source`` to ``target``; also return the clean estimate."""
    alpha_from = _alpha(model, source).to(sample)
    alpha_to = _alpha(model, target).to(sample)
    clean = (sample - (1 - alpha_from).sqrt() * noise) / alpha_from.sqrt()
    return alpha_to.sqrt() * clean + (1 - alpha_to).sqrt() * noise, clean


@torch.no_grad()
def invert(
    model: TileDiffusion,
    sample: torch.Tensor,
    labels: torch.Tensor | None,
    schedule: list[int],
) -> torch.Tensor:
    """Walk a clean sample up the (descending) ``schedule`` to its first timestep's noise."""
    ascending = schedule[::-1]
    previous = -1
    for timestep in ascending:
        # The noise is predicted where the sample is, as in the generation step it undoes.
        noise = model.noise_prediction(sample, max(previous, 0), labels)
        sample, _ = ddim_move(model, sample, noise, previous, timestep)
        previous = timestep
    return sample


def generate(
    model: TileDiffusion,
    sample: torch.Tensor,
    labels: torch.Tensor | None,
    schedule: list[int],
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """Denoise ``sample`` down the (descending) ``schedule`` to a clean sample.

    With ``guidance``, each step's noise estimate is shifted by −√(1−ᾱ)·∇ (classifier
    guidance, Dhariwal & Nichol 2021), with the gradient taken at the predicted clean sample
    as DiME (Jeanneret et al. 2022) does, so an ordinary classifier can guide.
    """
    for index, timestep in enumerate(schedule):
        following = schedule[index + 1] if index + 1 < len(schedule) else -1
        with torch.no_grad():
            noise = model.noise_prediction(sample, timestep, labels)
        if guidance is not None:
            _, clean = ddim_move(model, sample, noise, timestep, following)
            noise = noise - (1 - _alpha(model, timestep)).sqrt().to(sample) * guidance(clean)
        with torch.no_grad():
            sample, _ = ddim_move(model, sample, noise, timestep, following)
    return sample


def add_noise(
    model: TileDiffusion, sample: torch.Tensor, timestep: int, generator: torch.Generator
) -> torch.Tensor:
    """Forward-diffuse a clean sample to ``timestep`` with seeded noise (SDEdit's start)."""
    noise = torch.randn(sample.shape, generator=generator).to(sample)
    alpha = _alpha(model, timestep).to(sample)
    return alpha.sqrt() * sample + (1 - alpha).sqrt() * noise
