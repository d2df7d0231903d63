"""A conditional denoising model for tiles: a diffusers UNet, a DDIM schedule, named conditions.

Conditions are names (tissue classes such as ``TUM``, or stain domains such as ``scanner-A``)
mapped to the UNet's class embeddings. With a VAE the UNet works on its latents (a latent
diffusion model); without one, on pixels. Pixels enter as uint8 RGB and are scaled to [−1, 1].

Saved folders hold diffusers components (``unet/``, ``scheduler/``, optionally ``vae/``) and
``histopilot.json`` with the condition names. Any other diffusers pipeline whose denoiser is a
``UNet2DModel`` (a local folder, or a hub id already in the local cache) loads as an
unconditional model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from pydantic import BaseModel, Field

from histopilot.errors import DiffusionError
from histopilot.storage import atomic_directory

MODEL_FILE = "histopilot.json"


class ModelCard(BaseModel):
    """What a saved model needs besides its diffusers components."""

    format: str = "histopilot-diffusion"
    conditions: list[str] = Field(description="Condition names, in class-embedding order")
    image_size: int = Field(gt=0, description="Tile side in pixels the model was trained on")
    latent: bool = Field(description="Whether the UNet denoises VAE latents")


@dataclass
class TileDiffusion:
    """The parts of a conditional diffusion model and the conversions between their spaces."""

    unet: UNet2DModel
    scheduler: DDIMScheduler
    conditions: list[str]
    image_size: int
    vae: AutoencoderKL | None = None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: str | torch.device) -> TileDiffusion:
        self.unet.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def condition_ids(self, names: str | list[str], count: int) -> torch.Tensor | None:
        """Class-embedding ids for ``names`` (one name for all ``count`` images, or one each)."""
        if not self.conditions:
            if names:
                raise DiffusionError("this model is unconditional; give no condition")
            return None
        names = [names] * count if isinstance(names, str) else list(names)
        unknown = sorted(set(names) - set(self.conditions))
        if unknown or len(names) != count:
            raise DiffusionError(
                f"unknown condition(s) {', '.join(unknown)}; this model knows "
                f"{', '.join(self.conditions)}"
                if unknown
                else f"{len(names)} conditions for {count} images"
            )
        ids = [self.conditions.index(name) for name in names]
        return torch.tensor(ids, device=self.device)

    def noise_prediction(
        self, sample: torch.Tensor, timestep: int, labels: torch.Tensor | None
    ) -> torch.Tensor:
        steps = torch.full((len(sample),), timestep, device=sample.device)
        return self.unet(sample, steps, class_labels=labels).sample

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, H, W, 3) at the model's size → the space the UNet denoises."""
        tensor = torch.as_tensor(images).to(self.device)
        if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
            raise DiffusionError(
                f"expected uint8 RGB tiles (B, H, W, 3), got {tensor.dtype} {tuple(tensor.shape)}"
            )
        if tensor.shape[1:3] != (self.image_size, self.image_size):
            raise DiffusionError(
                f"images are {tensor.shape[2]}×{tensor.shape[1]} px; this model works on "
                f"{self.image_size} px tiles (resize or crop first)"
            )
        pixels = tensor.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels).latent_dist.mode()
        return latents * self.vae.config.scaling_factor

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        """The UNet's space → float RGB in [−1, 1], (B, 3, H, W), differentiable."""
        if self.vae is None:
            return sample
        return self.vae.decode(sample / self.vae.config.scaling_factor).sample

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model atomically: a folder that exists is complete."""
        folder = Path(folder)
        with atomic_directory(folder) as building:
            self.unet.save_pretrained(building / "unet")
            self.scheduler.save_pretrained(building / "scheduler")
            if self.vae is not None:
                self.vae.save_pretrained(building / "vae")
            card = ModelCard(
                conditions=self.conditions, image_size=self.image_size, latent=self.vae is not None
            )
            (building / MODEL_FILE).write_text(card.model_dump_json(indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: str = "cpu") -> TileDiffusion:
        """A histopilot model folder, or any diffusers pipeline with a ``UNet2DModel``."""
        folder = Path(source)
        if (folder / MODEL_FILE).is_file():
            try:
                card = ModelCard.model_validate(json.loads((folder / MODEL_FILE).read_text()))
                unet = UNet2DModel.from_pretrained(folder / "unet")
                scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
                vae = AutoencoderKL.from_pretrained(folder / "vae") if card.latent else None
            except (OSError, ValueError, json.JSONDecodeError) as error:
                raise DiffusionError(f"{folder}: incomplete or damaged model ({error})") from error
            if len(card.conditions) != (unet.config.num_class_embeds or 0):
                raise DiffusionError(
                    f"{folder}: {MODEL_FILE} names {len(card.conditions)} conditions, the UNet "
                    f"has {unet.config.num_class_embeds or 0} class embeddings"
                )
            return cls(unet, scheduler, card.conditions, card.image_size, vae).to(device)
        return _foreign_pipeline(str(source)).to(device)


def _foreign_pipeline(source: str) -> TileDiffusion:
    from diffusers import DiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not Path(source).exists()
    try:
        pipeline = DiffusionPipeline.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as error:
        raise DiffusionError(
            f"cannot load a diffusion model from {source!r}: {error}. Give a folder written by "
            "`histopilot finetune diffusion`, or a diffusers pipeline folder or cached hub id"
        ) from error
    unet = getattr(pipeline, "unet", None)
    if not isinstance(unet, UNet2DModel):
        raise DiffusionError(
            f"{source}: its denoiser is {type(unet).__name__}, not a UNet2DModel; "
            "text-conditioned pipelines are not supported here"
        )
    vae = getattr(pipeline, "vae", None)
    classes = unet.config.num_class_embeds or 0
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    if vae is not None:
        size *= 2 ** (len(vae.config.block_out_channels) - 1)
    return TileDiffusion(
        unet=unet,
        scheduler=DDIMScheduler.from_config(pipeline.scheduler.config),
        conditions=[f"class-{index}" for index in range(classes)],
        image_size=size,
        vae=vae,
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float RGB in [−1, 1] (B, 3, H, W) → uint8 (B, H, W, 3)."""
    scaled = ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()
