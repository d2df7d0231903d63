"""Contrastive fine-tuning of an open_clip model on image–caption pairs (``finetune clip``).

The patch encoder decides what retrieval finds and what zero-shot triage sees; a lab's own
captions pull it toward its stains and vocabulary. The recipe trains LoRA weights on the
attention and MLP layers of both towers (or every weight, ``mode: full``) with the
symmetric CLIP loss. Captions made from labels repeat, so every pair in a batch with the same
caption counts as a positive instead of a false negative.

Before and after training it measures, on held-out pairs, image→text and text→image recall@k
(a hit is any item with the right caption) and, when rows carry a label, zero-shot
classification from prompt templates. The trained model is written as an open_clip folder
that histopilot loads as ``open_clip:local-dir:PATH``, with the LoRA adapter beside it.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from sklearn.metrics import balanced_accuracy_score
from torch.nn import functional as F  # noqa: N812

from histopilot.errors import FinetuneError, TrainingDataError
from histopilot.finetune.conversations import ConversionReport
from histopilot.finetune.memory import MemoryEstimate, block_activation_bytes, estimate
from histopilot.finetune.recipe import (
    Announce,
    Progress,
    Recipe,
    RunResult,
    Strict,
    held_out,
    loss_summary,
    write_run_card,
)
from histopilot.finetune.tables import ImageCells, table_rows
from histopilot.retrieval.encoders.neural import open_clip_parts, resolve_device
from histopilot.retrieval.search import load_query_image
from histopilot.runcard import file_digest
from histopilot.serve.lora import CONFIG_FILE as ADAPTER_CONFIG
from histopilot.storage import atomic_directory

#: Attention (PEFT adapts ``nn.MultiheadAttention``'s input and output projections; open_clip
#: reads ``out_proj.weight`` directly, so adapting ``out_proj`` alone would never be used) and
#: the MLP of every residual block, image and text towers.
CLIP_BLOCK_LAYERS = r".*transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)"
RECALL_AT = (1, 5, 10)


class ClipData(Strict):
    train: Path = Field(description="Caption table: CSV, TSV, JSON Lines or Parquet")
    eval: Path | None = Field(None, description="Held-out table; default: split from train")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Used when eval is not given")
    image_root: Path | None = Field(None, description="Image paths' base (default: table's)")
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str | None = Field(None, description="Class column for zero-shot scores")


class ClipLora(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str = CLIP_BLOCK_LAYERS


class ClipTrain(Strict):
    steps: int = Field(500, ge=1)
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    augment: bool = Field(True, description="Random flips and 90° turns (tissue has no up)")
    seed: int = Field(0, ge=0)
    device: str = "auto"
    workers: int = Field(0, ge=0, description="Image decoding processes")


class ClipRecipe(Recipe):
    model: str = Field(
        "hf-hub:wisdomik/QuiltNet-B-32", description="open_clip name, hf-hub: or local-dir:"
    )
    pretrained: str | None = Field(None, description="Weights tag or file for an arch name")
    mode: Literal["lora", "full"] = "lora"
    data: ClipData
    lora: ClipLora = ClipLora()
    train: ClipTrain = ClipTrain()
    prompts: list[str] = Field(
        default=["an H&E image of {}.", "a histopathology image showing {}."],
        min_length=1,
        description="Zero-shot templates; {} takes the class name",
    )
    label_names: dict[str, str] = Field(
        default_factory=dict, description="Label → name used in prompts (default: the label)"
    )

    local_or_hub = ("pretrained",)

    def output_folders(self) -> dict[Path, tuple[str, str]]:
        folders = {self.out / "model": ("model", "open_clip_config.json")}
        if self.mode == "lora":
            folders[self.out / "adapter"] = ("adapter", ADAPTER_CONFIG)
        return folders

    def relative_to(self, base: Path, *, typed: set[str] | None = None) -> ClipRecipe:
        recipe = super().relative_to(base, typed=typed)
        scheme, _, folder = recipe.model.partition("local-dir:")
        if not scheme and folder:
            folder_base = Path.cwd() if "model" in (typed or ()) else base
            recipe = recipe.model_copy(
                update={"model": f"local-dir:{(folder_base / Path(folder).expanduser()).resolve()}"}
            )
        return recipe


class Pairs(BaseModel):
    images: list[Path]
    captions: list[str]
    labels: list[str] | None

    def subset(self, indices: list[int]) -> Pairs:
        return Pairs(
            images=[self.images[i] for i in indices],
            captions=[self.captions[i] for i in indices],
            labels=[self.labels[i] for i in indices] if self.labels else None,
        )


class ClipResult(RunResult):
    model: Path
    adapter: Path | None
    before: dict[str, float]
    after: dict[str, float]
    encoder: str = Field(description="The encoder name that loads the trained model")


def train_clip(
    recipe: ClipRecipe,
    *,
    on_progress: Progress | None = None,
    announce: Announce | None = None,
) -> ClipResult:
    """Train, evaluate before and after, and save; ``announce`` gets the memory estimate."""
    started = time.perf_counter()
    recipe.check_outputs()
    train_pairs, eval_pairs, report, data_sha = load_pairs(recipe)
    report.write(recipe.out)
    device = resolve_device(recipe.train.device)
    model, transform, tokenizer, config = load_open_clip_model(recipe, device)
    torch.manual_seed(recipe.train.seed)
    trainable = _make_trainable(model, recipe)
    if announce:
        count = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
        memory = expected_memory(model, recipe, count, device)
        announce(memory.line() if memory else "expected memory: unknown for this architecture")
    before = evaluate_clip(model, transform, tokenizer, eval_pairs, recipe, device)
    losses = _fit(model, trainable, transform, tokenizer, train_pairs, recipe, device, on_progress)
    after = evaluate_clip(model, transform, tokenizer, eval_pairs, recipe, device)
    adapter = None
    if recipe.mode == "lora":
        adapter = recipe.out / "adapter"
        with atomic_directory(adapter) as building:
            trainable.save_pretrained(str(building))
        model = trainable.merge_and_unload()
    saved = save_open_clip(model, tokenizer, config, recipe.out / "model")
    encoder = f"open_clip:local-dir:{saved.resolve()}"
    card = write_run_card(
        recipe,
        data={
            "sha256": data_sha,
            "train_pairs": len(train_pairs.images),
            "eval_pairs": len(eval_pairs.images),
            "skipped": len(report.skipped),
        },
        metrics={"steps": len(losses), **loss_summary(losses), "before": before, "after": after},
        started=started,
        extra={"encoder": encoder, "device": str(device)},
    )
    return ClipResult(
        model=saved,
        adapter=adapter,
        run_card=card,
        losses=losses,
        before=before,
        after=after,
        skipped=len(report.skipped),
        encoder=encoder,
    )


# -- data ---------------------------------------------------------------------------------------
def load_pairs(recipe: ClipRecipe) -> tuple[Pairs, Pairs, ConversionReport, str]:
    """Train and held-out pairs, what was skipped, and the data hash."""
    data = recipe.data
    train, report = _read_pairs(data.train, data, recipe.out)
    if data.eval is not None:
        held, eval_report = _read_pairs(data.eval, data, recipe.out)
        report.skipped += eval_report.skipped
    else:
        train, held = _split(train, data.eval_fraction, recipe.train.seed)
    if len(train.images) < 2 or not held.images:
        raise TrainingDataError(
            f"{data.train}: {len(train.images)} training and {len(held.images)} held-out "
            "pairs; training needs two or more and evaluation one or more"
        )
    files = [data.train, *([data.eval] if data.eval else [])]
    data_sha = file_digest([*files, *train.images, *held.images])
    return train, held, report, data_sha


def _read_pairs(table: Path, data: ClipData, out: Path) -> tuple[Pairs, ConversionReport]:
    if not table.is_file():
        raise TrainingDataError(f"no caption table at {table}")
    report = ConversionReport(source=str(table), format="captions")
    cells = ImageCells(data.image_root or table.parent, out)
    columns = (data.image_column, data.caption_column, *filter(None, [data.label_column]))
    images, captions, labels = [], [], []
    for number, row in table_rows(table, report, columns):
        path, problem = cells.resolve(row.get(data.image_column))
        caption = str(row.get(data.caption_column) or "").strip()
        label = str(row.get(data.label_column) or "").strip() if data.label_column else ""
        if problem or not caption or (data.label_column and not label):
            report.skip(number, problem or ("empty caption" if not caption else "empty label"))
            continue
        images.append(path)
        captions.append(caption)
        labels.append(label)
    report.kept = len(images)
    return Pairs(images=images, captions=captions, labels=labels if data.label_column else None), (
        report
    )


def _split(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """Held-out pairs drawn per label (or overall): every class with two or more pairs is seen
    on both sides; all pairs of one image stay on one side."""
    groups: dict[str, dict[Path, list[int]]] = {}
    for index, label in enumerate(pairs.labels or [""] * len(pairs.images)):
        groups.setdefault(label, {}).setdefault(pairs.images[index], []).append(index)
    rng = random.Random(seed)
    held: list[int] = []
    for by_image in groups.values():
        for image in held_out(list(by_image), fraction, rng):
            held += by_image[image]
    chosen = set(held)
    rest = [i for i in range(len(pairs.images)) if i not in chosen]
    return pairs.subset(rest), pairs.subset(sorted(held))


# -- model --------------------------------------------------------------------------------------
def load_open_clip_model(recipe: ClipRecipe, device: torch.device):
    """(model, image transform, tokenizer, open_clip model config) of the recipe's model."""
    import open_clip

    model, transform, tokenizer = open_clip_parts(
        recipe.model, recipe.pretrained, name=recipe.model, device=device
    )
    config = open_clip.get_model_config(recipe.model)  # cached by the load above
    if config is None:
        raise FinetuneError(f"open_clip has no configuration for {recipe.model}")
    return model, transform, tokenizer, config


def _make_trainable(model, recipe: ClipRecipe):
    """The module the optimizer updates: a PEFT wrapper (LoRA) or the model itself (full)."""
    if recipe.mode == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    spec = recipe.lora
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
    )  # fmt: skip
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise FinetuneError(f"lora.target_modules matches no layer of {recipe.model}") from error


def _fit(model, trainable, transform, tokenizer, pairs: Pairs, recipe, device, on_progress):
    train = recipe.train
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=train.learning_rate, weight_decay=train.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, train.steps)
    caption_ids = _caption_ids(pairs.captions)
    tokens = tokenizer(pairs.captions)
    generator = torch.Generator().manual_seed(train.seed)
    loader = torch.utils.data.DataLoader(
        _ImageSet(pairs.images, transform, train.augment),
        batch_size=min(train.batch_size, len(pairs.images)),
        sampler=torch.utils.data.RandomSampler(
            pairs.images, replacement=True, num_samples=train.steps * train.batch_size,
            generator=generator,
        ),
        num_workers=train.workers,
        drop_last=True,
    )  # fmt: skip
    model.train()
    losses: list[float] = []
    for step, (pixels, indices) in enumerate(loader, start=1):
        image = F.normalize(model.encode_image(pixels.to(device)), dim=-1)
        text = F.normalize(model.encode_text(tokens[indices].to(device)), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        same = caption_ids[indices][:, None] == caption_ids[indices][None, :]
        targets = (same / same.sum(1, keepdim=True)).to(device)
        loss = (_soft_cross_entropy(logits, targets) + _soft_cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_progress:
            on_progress(step, train.steps, losses[-1])
        if step == train.steps:
            break
    model.eval()
    return losses


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def _caption_ids(captions: list[str]) -> torch.Tensor:
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(c, len(index)) for c in captions])


class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], transform, augment: bool) -> None:
        self.paths, self.transform, self.augment = paths, transform, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        # Read as the encoder reads images at search time (16-bit scaled, alpha over white).
        pixels = self.transform(Image.fromarray(load_query_image(self.paths[index])))
        if self.augment:
            turns = int(torch.randint(0, 4, ()))
            pixels = torch.rot90(pixels, turns, dims=(1, 2))
            if torch.rand(()) < 0.5:
                pixels = pixels.flip(2)
        return pixels, index


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_clip(model, transform, tokenizer, pairs: Pairs, recipe, device) -> dict[str, float]:
    """Recall@k both ways over held-out pairs, and zero-shot scores when there are labels."""
    model.eval()
    loader = torch.utils.data.DataLoader(
        _ImageSet(pairs.images, transform, augment=False), batch_size=64
    )
    images = torch.cat([F.normalize(model.encode_image(x.to(device)), dim=-1) for x, _ in loader])
    positions = {caption: i for i, caption in enumerate(dict.fromkeys(pairs.captions))}
    unique = list(positions)
    texts = torch.cat(
        [
            F.normalize(model.encode_text(tokenizer(unique[i : i + 256]).to(device)), dim=-1)
            for i in range(0, len(unique), 256)
        ]
    )
    truth = np.array([positions[c] for c in pairs.captions])
    similarity = (images @ texts.T).cpu().numpy()
    metrics = {}
    for k in RECALL_AT:
        if k > 1 and k >= min(len(unique), len(pairs.images)):
            continue  # every item would be a hit: the number says nothing
        top = np.argsort(-similarity, axis=1)[:, :k]
        metrics[f"image_to_text_recall@{k}"] = float((top == truth[:, None]).any(1).mean())
        ranked = np.argsort(-similarity.T, axis=1)[:, :k]
        hits = [(truth[ranked[t]] == t).any() for t in range(len(unique))]
        metrics[f"text_to_image_recall@{k}"] = float(np.mean(hits))
    if pairs.labels:
        metrics |= _zero_shot(model, tokenizer, images, pairs.labels, recipe, device)
    return {key: round(value, 4) for key, value in metrics.items()}


def _zero_shot(model, tokenizer, images, labels, recipe, device) -> dict[str, float]:
    classes = sorted(set(labels))
    prompts = []
    for label in classes:
        name = recipe.label_names.get(label, label)
        encoded = model.encode_text(tokenizer([t.format(name) for t in recipe.prompts]).to(device))
        prompts.append(F.normalize(F.normalize(encoded, dim=-1).mean(0), dim=-1))
    predicted = (images @ torch.stack(prompts).T).argmax(1).cpu().numpy()
    truth = np.array([classes.index(label) for label in labels])
    return {
        "zero_shot_accuracy": float((predicted == truth).mean()),
        "zero_shot_balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
    }


# -- outputs ------------------------------------------------------------------------------------
def save_open_clip(model, tokenizer, config: dict, target: Path) -> Path:
    """An open_clip folder (config, safetensors weights, tokenizer files when it has them)."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    with atomic_directory(target) as building:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(building / "open_clip_model.safetensors"))
        save_config_for_hf(model, building / "open_clip_config.json", model_config=config)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(building))
    return target


def expected_memory(model, recipe: ClipRecipe, trainable: int, device) -> MemoryEstimate | None:
    """Float32 weights, the optimizer's share, and both towers' activations for one batch;
    ``None`` for models whose towers are not open_clip's own transformers (ResNets, timm or
    Hugging Face towers)."""
    try:
        towers = [
            (model.visual.transformer, int(np.prod(model.visual.grid_size)) + 1),
            (model.transformer, model.context_length),
        ]
    except AttributeError:
        return None
    activations = sum(
        block_activation_bytes(
            tokens=recipe.train.batch_size * tokens,
            hidden=tower.width,
            intermediate=tower.resblocks[0].mlp.c_fc.out_features,
            layers=tower.layers,
            checkpointing=False,
            dtype_bytes=4,
        )
        for tower, tokens in towers
    )
    return estimate(
        weights=sum(p.numel() for p in model.parameters()) * 4,
        trainable_parameters=trainable,
        activations=activations,
        device=str(device),
    )
