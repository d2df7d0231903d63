"""Training recipe for the conditional tile diffusion model (``histopilot finetune diffusion``).

A YAML recipe names a folder of tiles (and a labels CSV whose column gives each tile's
condition: tissue class or stain domain), the UNet's size, and the training schedule. Training
keeps an exponential moving average of the weights (sampled from and saved, as is usual for
diffusion models), writes resumable checkpoints and sample grids, and ends with the model, a
tile classifier and an independent second classifier (for counterfactuals), and a run card.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from pydantic import Field, model_validator

from histopilot.errors import DiffusionError
from histopilot.finetune.memory import MemoryEstimate, estimate
from histopilot.finetune.recipe import (
    Announce,
    Progress,
    Recipe,
    RunResult,
    Strict,
    loss_summary,
    write_run_card,
)
from histopilot.slide.render import save_png
from histopilot.storage import atomic_directory
from histopilot.tools.diffusion.classifier import random_dihedral, train_classifier
from histopilot.tools.diffusion.model import TileDiffusion, to_uint8
from histopilot.tools.diffusion.sampling import generate, timesteps
from histopilot.tools.images import list_images, read_rgb, side_by_side

CONDITION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


class DataSpec(Strict):
    images: Path = Field(description="Folder of tiles (searched recursively)")
    labels: Path | None = Field(
        default=None, description="CSV with a 'file' column (relative to images) and a label"
    )
    column: str = Field(default="label", description="Labels column used as the condition")


class UNetSpec(Strict):
    block_out_channels: list[int] = Field(default=[32, 64, 64], min_length=1)
    layers_per_block: int = Field(default=1, ge=1)
    attention: bool = Field(default=False, description="Self-attention in the deepest block")
    norm_num_groups: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _groups_divide(self) -> UNetSpec:
        if any(channels % self.norm_num_groups for channels in self.block_out_channels):
            raise ValueError("norm_num_groups must divide every block_out_channels value")
        return self


class TrainSpec(Strict):
    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    seed: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    sample_every: int = Field(default=500, ge=1)
    sample_steps: int = Field(default=25, ge=1)
    num_train_timesteps: int = Field(default=1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    device: str = "cpu"


class ClassifierSpec(Strict):
    train: bool = Field(
        default=True, description="Train the tile classifier counterfactuals explain"
    )
    oracle: bool = Field(default=True, description="Train a second, independent one to check flips")
    steps: int = Field(default=400, ge=1)
    width: int = Field(default=16, ge=2)


class DiffusionRecipe(Recipe):
    """The whole recipe; relative paths are relative to the recipe file."""

    local_or_hub = ("pretrained", "vae")
    data: DataSpec
    image_size: int = Field(default=64, ge=8, le=1024)
    model: UNetSpec = UNetSpec()
    pretrained: str | None = Field(
        default=None, description="Start from a saved model, diffusers folder or cached hub id"
    )
    vae: str | None = Field(default=None, description="AutoencoderKL folder: train on latents")
    train: TrainSpec = TrainSpec()
    classifier: ClassifierSpec = ClassifierSpec()


class TrainingResult(RunResult):
    model: Path
    classifier: Path | None
    oracle: Path | None
    steps: int


def load_tiles(spec: DataSpec, size: int) -> tuple[np.ndarray, list[str] | None]:
    """Tiles resized to ``size`` px, and their conditions when a labels file is given."""
    if spec.labels is None:
        paths = list_images([spec.images])
        labels = None
    else:
        paths, labels = _labelled(spec)
    if len(paths) < 2:
        raise DiffusionError(f"{spec.images}: found {len(paths)} tile(s); training needs more")
    tiles = [
        cv2.resize(read_rgb(path), (size, size), interpolation=cv2.INTER_AREA) for path in paths
    ]
    return np.stack(tiles), labels


def _labelled(spec: DataSpec) -> tuple[list[Path], list[str]]:
    root = spec.images.resolve()
    try:
        with spec.labels.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise DiffusionError(f"cannot read the labels file {spec.labels}: {error}") from error
    if not rows or "file" not in rows[0] or spec.column not in rows[0]:
        raise DiffusionError(f"{spec.labels} needs 'file' and '{spec.column}' columns")
    paths, labels = [], []
    for number, row in enumerate(rows, start=2):
        file, label = (row.get("file") or "").strip(), (row.get(spec.column) or "").strip()
        path = (root / file).resolve()
        if not file or not path.is_relative_to(root):
            raise DiffusionError(f"{spec.labels}:{number}: {file!r} is not a file under {root}")
        if not CONDITION_NAME.fullmatch(label):
            raise DiffusionError(
                f"{spec.labels}:{number}: the {spec.column} {label!r} is empty or not a usable "
                "condition name (letters, digits, '_', '-', '.', '+'; starting with a letter "
                "or digit)"
            )
        paths.append(path)
        labels.append(label)
    return paths, labels


def build_model(recipe: DiffusionRecipe, conditions: list[str]) -> TileDiffusion:
    """A fresh model sized by the recipe, or the pretrained one it names."""
    if recipe.pretrained:
        model = TileDiffusion.from_pretrained(recipe.pretrained)
        if model.conditions != conditions and (conditions or model.conditions):
            raise DiffusionError(
                f"{recipe.pretrained} knows conditions {model.conditions}, the data has "
                f"{conditions}; train from scratch or relabel"
            )
        return model
    vae = AutoencoderKL.from_pretrained(recipe.vae) if recipe.vae else None
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae else 1
    channels = vae.config.latent_channels if vae else 3
    spec = recipe.model
    depth = len(spec.block_out_channels)
    if recipe.image_size % (scale * 2 ** (depth - 1)):
        raise DiffusionError(
            f"image_size {recipe.image_size} must be a multiple of {scale * 2 ** (depth - 1)} "
            f"for {depth} UNet blocks" + (" and the VAE" if vae else "")
        )
    unet = _unet(recipe, len(conditions), channels, recipe.image_size // scale)
    scheduler = DDIMScheduler(
        num_train_timesteps=recipe.train.num_train_timesteps,
        beta_schedule=recipe.train.beta_schedule,
        clip_sample=False,
    )
    return TileDiffusion(unet, scheduler, conditions, recipe.image_size, vae)


def _unet(recipe: DiffusionRecipe, classes: int, channels: int, size: int) -> UNet2DModel:
    """The UNet the recipe describes, for ``size``-pixel inputs of ``channels`` channels."""
    spec = recipe.model
    depth = len(spec.block_out_channels)
    down = ["DownBlock2D"] * depth
    up = ["UpBlock2D"] * depth
    if spec.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=spec.norm_num_groups,
        num_class_embeds=classes or None,
        add_attention=spec.attention,
    )


def expected_memory(recipe: DiffusionRecipe) -> MemoryEstimate:
    """Float32 UNet weights with AdamW and EMA copies, and one batch's activations: at each
    resolution the down and up paths keep about six feature maps per ResNet layer. Sized for
    pixels (a VAE's latents are smaller, so the estimate errs high there)."""
    spec = recipe.model
    with torch.device("meta"):
        unet = _unet(recipe, 0, 3, recipe.image_size)
    parameters = sum(p.numel() for p in unet.parameters())
    maps = sum(
        2 * (spec.layers_per_block + 1) * 6 * channels * (recipe.image_size // 2**level) ** 2
        for level, channels in enumerate(spec.block_out_channels)
    )
    return estimate(
        weights=parameters * 4,  # the EMA copy
        trainable_parameters=parameters,
        activations=recipe.train.batch_size * maps * 4,
        device=recipe.train.device,
    )


def train_diffusion(
    recipe: DiffusionRecipe,
    *,
    resume: bool = True,
    on_progress: Progress | None = None,
    announce: Announce | None = None,
) -> TrainingResult:
    """Train the recipe's model, continuing from its last checkpoint when ``resume`` (and
    discarding the checkpoints otherwise); see the module docstring."""
    started = time.perf_counter()
    train = recipe.train
    if announce:
        announce(expected_memory(recipe).line())
    if not resume:
        shutil.rmtree(recipe.out / "checkpoints", ignore_errors=True)
    tiles, labels = load_tiles(recipe.data, recipe.image_size)
    conditions = sorted(set(labels)) if labels else []
    if recipe.classifier.train and labels and len(conditions) < 2:
        raise DiffusionError(
            f"the labels name one class ({conditions[0]}); a classifier needs two or more. "
            "Set classifier.train: false to train the diffusion model alone"
        )
    torch.manual_seed(train.seed)  # the UNet's initial weights
    model = build_model(recipe, conditions).to(train.device)
    if model.vae is not None:
        model.vae.requires_grad_(False)
    with torch.no_grad():  # in chunks: a VAE encoder on thousands of tiles at once would not fit
        data = torch.cat([model.encode(tiles[i : i + 64]) for i in range(0, len(tiles), 64)])
    ids = model.condition_ids(labels, len(labels)) if labels else None

    generator = torch.Generator().manual_seed(train.seed)
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=train.learning_rate)
    ema = EMAModel(model.unet.parameters(), decay=train.ema_decay)
    losses: list[float] = []
    checkpoints = recipe.out / "checkpoints"
    data_sha = _data_digest(tiles, labels).hexdigest()
    fingerprint = _fingerprint(recipe, data_sha)
    step = _resume(checkpoints, fingerprint, model, ema, optimizer, generator, losses)

    model.unet.train()
    while step < train.steps:
        batch = torch.randint(
            0, len(data), (min(train.batch_size, len(data)),), generator=generator
        )
        clean = random_dihedral(data[batch], generator)
        noise = torch.randn(clean.shape, generator=generator).to(clean)
        times = torch.randint(0, train.num_train_timesteps, (len(batch),), generator=generator)
        noisy = model.scheduler.add_noise(clean, noise, times.to(clean.device))
        predicted = model.unet(
            noisy, times.to(clean.device), class_labels=None if ids is None else ids[batch]
        ).sample
        loss = torch.nn.functional.mse_loss(predicted, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.unet.parameters(), 1.0)
        optimizer.step()
        ema.step(model.unet.parameters())
        step += 1
        losses.append(loss.item())
        if on_progress:
            on_progress(step, train.steps, losses[-1])
        if step % train.sample_every == 0 or step == train.steps:
            with _ema_weights(ema, model):
                save_sample_grid(model, recipe.out / "samples" / f"step-{step:07d}.png", train)
        if step % train.checkpoint_every == 0 or step == train.steps:
            state = (model, ema, optimizer, generator, losses)
            _checkpoint(checkpoints, step, fingerprint, state, train.keep_checkpoints)

    model.unet.eval()
    with _ema_weights(ema, model):
        saved = model.save_pretrained(recipe.out / "model")
    classifier, oracle = _classifiers(recipe, tiles, labels)
    card = _run_card(recipe, len(tiles), data_sha, losses, started, model)
    return TrainingResult(
        model=saved, classifier=classifier, oracle=oracle, run_card=card, steps=step, losses=losses
    )


@contextmanager
def _ema_weights(ema: EMAModel, model: TileDiffusion) -> Iterator[None]:
    """The EMA weights in the UNet for the duration of the block, the trained ones after."""
    parameters = list(model.unet.parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def save_sample_grid(model: TileDiffusion, path: Path, train: TrainSpec, per_row: int = 4) -> Path:
    """One row of generated tiles per condition (one row if unconditional), fixed seed."""
    rows = model.conditions or [""]
    generator = torch.Generator().manual_seed(train.seed)
    shape = (per_row, model.unet.config.in_channels, *(2 * [model.unet.config.sample_size]))
    schedule = timesteps(model, train.sample_steps)
    images = []
    with torch.no_grad():
        for condition in rows:
            noise = torch.randn(shape, generator=generator).to(model.device)
            labels = model.condition_ids(condition, per_row) if condition else None
            images.append(
                side_by_side(*to_uint8(model.decode(generate(model, noise, labels, schedule))))
            )
    grid = np.concatenate(
        [np.pad(row, ((0, 4), (0, 0), (0, 0)), constant_values=255) for row in images]
    )
    return save_png(grid, path)


def _fingerprint(recipe: DiffusionRecipe, data_sha: str) -> str:
    """What a checkpoint must match to be resumed: the data and everything but the schedule."""
    digest = hashlib.sha256(data_sha.encode())
    digest.update(
        recipe.model_dump_json(include={"image_size", "model", "pretrained", "vae"}).encode()
    )
    return digest.hexdigest()


def _data_digest(tiles: np.ndarray, labels):
    digest = hashlib.sha256(tiles.tobytes())
    digest.update(json.dumps(labels).encode())
    return digest


def _checkpoint(folder: Path, step: int, fingerprint: str, state, keep: int) -> None:
    model, ema, optimizer, generator, losses = state
    with atomic_directory(folder / f"step-{step:07d}") as building:
        model.unet.save_pretrained(building / "unet")
        torch.save(
            {
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "torch": torch.get_rng_state(),
            },
            building / "state.pt",
        )
        progress = {"step": step, "fingerprint": fingerprint, "losses": losses}
        (building / "progress.json").write_text(json.dumps(progress))
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(folder, fingerprint, model, ema, optimizer, generator, losses) -> int:
    """Load the newest checkpoint (checkpoints are written whole or not at all)."""
    found = sorted(folder.glob("step-*"))
    if not found:
        return 0
    latest = found[-1]
    progress = json.loads((latest / "progress.json").read_text())
    if progress.get("fingerprint") != fingerprint:
        raise DiffusionError(
            f"the checkpoints in {folder} come from another model or other data; "
            "rerun with --restart to start over, or give another out folder"
        )
    trained = UNet2DModel.from_pretrained(latest / "unet")
    model.unet.load_state_dict(trained.state_dict())
    state = torch.load(latest / "state.pt", weights_only=True)
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    losses.extend(progress["losses"])
    return int(progress["step"])


def _classifiers(recipe, tiles, labels) -> tuple[Path | None, Path | None]:
    spec = recipe.classifier
    if not (spec.train and labels):
        return None, None
    seed, steps = recipe.train.seed, spec.steps
    device = recipe.train.device
    first = train_classifier(tiles, labels, steps=steps, width=spec.width, seed=seed, device=device)
    path = first.save(recipe.out / "classifier")
    if not spec.oracle:
        return path, None
    # Independent in initialisation, sampling order and capacity, so agreement means something.
    second = train_classifier(
        tiles, labels, steps=steps, width=spec.width * 2, seed=seed + 1, device=device
    )
    return path, second.save(recipe.out / "oracle")


def _run_card(recipe, tiles: int, data_sha: str, losses, started: float, model) -> Path:
    return write_run_card(
        recipe,
        data={"tiles": tiles, "sha256": data_sha, "conditions": model.conditions},
        metrics={"steps": len(losses)} | loss_summary(losses),
        started=started,
        extra={"parameters": sum(p.numel() for p in model.unet.parameters())},
    )
