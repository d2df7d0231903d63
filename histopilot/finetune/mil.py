"""Train the attention-MIL triage head on slide features (``histopilot finetune mil``).

Input: a labels table (slide, label) and a folder of per-slide feature files, the HDF5 cache
``features`` + ``coords`` that histopilot's retrieval writes (and CLAM and TRIDENT share). A
slide named by its file path whose features are not cached yet is embedded first with the
recipe's encoder, into that folder. The head (:mod:`histopilot.agents.mil`) is trained with
class-weighted cross-entropy, one bag per step, and the epoch with the best validation AUC is
kept and saved where ``[agents] mil_head`` points triage. Validation AUC and balanced accuracy
go into the run card beside the chance levels they should beat.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from pydantic import BaseModel, Field
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from histopilot.agents.mil import CONFIG_FILE as HEAD_CONFIG
from histopilot.agents.mil import AttentionMIL, MILHeadConfig
from histopilot.errors import FinetuneError, HistopilotError, TrainingDataError
from histopilot.finetune.conversations import ConversionReport
from histopilot.finetune.memory import MemoryEstimate, estimate
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
from histopilot.finetune.tables import table_rows
from histopilot.runcard import file_digest
from histopilot.storage import atomic_directory


class MILData(Strict):
    labels: Path = Field(description="Table with a slide column (id or slide file) and a label")
    features: Path = Field(description="Folder of <slide id>.h5 feature files")
    slide_column: str = "slide"
    label_column: str = "label"
    split_column: str | None = Field(None, description="Column saying train or validation")
    mpp_column: str = Field("mpp", description="Optional column: µm/px of slides lacking it")
    validation_fraction: float = Field(0.25, gt=0, lt=1)
    encoder: str | None = Field(
        None,
        description="Encoder that embeds slides named by file, and that made feature files "
        "which do not record it (CLAM, TRIDENT)",
    )


class MILArchitecture(Strict):
    hidden_dim: int = Field(128, ge=1)
    attention_dim: int = Field(64, ge=1)


class MILTrain(Strict):
    epochs: int = Field(40, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    max_tiles: int = Field(4096, ge=1, description="Tiles sampled per bag per step")
    seed: int = Field(0, ge=0)


class MILRecipe(Recipe):
    data: MILData
    model: MILArchitecture = MILArchitecture()
    train: MILTrain = MILTrain()
    risk_classes: list[str] = Field(
        default_factory=list, description="Classes whose probability is the risk (default: all "
        "but the first in sorted order)",
    )  # fmt: skip

    def output_folders(self) -> dict[Path, tuple[str, str]]:
        return {self.out / "mil_head": ("triage head", HEAD_CONFIG)}


class Bag(BaseModel, arbitrary_types_allowed=True):
    slide_id: str
    label: str
    features: np.ndarray
    validation: bool | None = Field(description="None until the split decides")


class MILResult(RunResult):
    head: Path
    validation: dict[str, float | None]
    chance: dict[str, float]
    best_epoch: int
    risk_classes: list[str] = Field(description="Classes whose probability triage reads as risk")
    agents_config: str


def train_mil(
    recipe: MILRecipe,
    *,
    on_progress: Progress | None = None,
    announce: Announce | None = None,
) -> MILResult:
    started = time.perf_counter()
    recipe.check_outputs()
    bags, encoder, report = load_bags(recipe)
    classes = sorted({bag.label for bag in bags})
    train_bags = [bag for bag in bags if not bag.validation]
    validation = [bag for bag in bags if bag.validation]
    config = MILHeadConfig(
        encoder=encoder,
        in_dim=bags[0].features.shape[1],
        hidden_dim=recipe.model.hidden_dim,
        attention_dim=recipe.model.attention_dim,
        classes=classes,
        risk_classes=recipe.risk_classes,
    )
    unknown = set(recipe.risk_classes) - set(classes)
    if unknown:
        raise FinetuneError(f"risk_classes {sorted(unknown)} are not labels ({classes})")
    torch.manual_seed(recipe.train.seed)
    head = AttentionMIL(config)
    if announce:
        announce(expected_memory(head, recipe).line())
    best, losses = _fit(head, train_bags, validation, classes, recipe, on_progress)
    head.load_state_dict(best["state"])
    target = recipe.out / "mil_head"
    with atomic_directory(target) as building:
        head.save(building)
    chance = {"auc": 0.5, "balanced_accuracy": 1 / len(classes)}
    card = write_run_card(
        recipe,
        data={
            "sha256": _bags_digest(recipe, bags),
            "slides": len(bags),
            "train_slides": len(train_bags),
            "validation_slides": len(validation),
            "classes": {c: sum(b.label == c for b in bags) for c in classes},
            "encoder": encoder,
            "skipped": len(report.skipped),
        },
        metrics={"epochs": len(losses), **loss_summary(losses)}
        | {"validation": best["metrics"], "chance": chance, "best_epoch": best["epoch"]},
        started=started,
    )
    return MILResult(
        head=target,
        run_card=card,
        losses=losses,
        validation=best["metrics"],
        chance=chance,
        best_epoch=best["epoch"],
        risk_classes=[classes[i] for i in config.risk_columns()],
        skipped=len(report.skipped),
        agents_config=f"[agents]\nmil_head = {json.dumps(str(target.resolve()))}\n",
    )


# -- data ---------------------------------------------------------------------------------------
def load_bags(recipe: MILRecipe) -> tuple[list[Bag], str, ConversionReport]:
    """Every labelled slide's features, which side of the split it is on, and the encoder."""
    data = recipe.data
    if not data.labels.is_file():
        raise TrainingDataError(f"no labels table at {data.labels}")
    report = ConversionReport(source=str(data.labels), format="slide labels")
    columns = (data.slide_column, data.label_column, *filter(None, [data.split_column]))
    source = _FeatureSource(data)
    bags: dict[str, Bag] = {}
    encoders = set()
    for number, row in table_rows(data.labels, report, columns):
        slide = str(row.get(data.slide_column) or "").strip()
        label = str(row.get(data.label_column) or "").strip()
        side = _SIDES.get(str(row.get(data.split_column) or "").strip().lower())
        if not slide or not label:
            report.skip(number, "empty slide or label")
            continue
        if data.split_column and side is None:
            report.skip(number, f"invalid record: {data.split_column} must be train or validation")
            continue
        try:
            mpp = float(row[data.mpp_column]) if row.get(data.mpp_column) else None
        except ValueError:
            report.skip(number, f"invalid record: {data.mpp_column} is not a number")
            continue
        try:
            slide_id, features, encoder = source.read(slide, mpp)
        except HistopilotError as error:
            report.skip(number, f"no features: {error}")
            continue
        if slide_id in bags:
            report.skip(number, f"duplicate slide: {slide_id}")
            continue
        bags[slide_id] = Bag(slide_id=slide_id, label=label, features=features, validation=side)
        encoders.add(encoder)
    report.kept = len(bags)
    report.write(recipe.out)
    _check(list(bags.values()), encoders, data, report)
    if not data.split_column:
        _split(list(bags.values()), data.validation_fraction, recipe.train.seed)
    if all(bag.validation for bag in bags.values()) or not any(
        bag.validation for bag in bags.values()
    ):
        raise TrainingDataError("training and validation each need at least one slide")
    return list(bags.values()), encoders.pop(), report


#: Values of the split column: training (False) or validation (True).
_SIDES = {"train": False, "training": False, "val": True, "valid": True, "validation": True}


class _FeatureSource:
    """A slide's features: embedded (or taken from the embedding cache, which checks that file,
    encoder and tiling still match) when the table names a slide file, read from
    ``<features>/<id>.h5`` when it names an id."""

    def __init__(self, data: MILData) -> None:
        self.data = data
        self._encoder = None

    def read(self, slide: str, mpp: float | None) -> tuple[str, np.ndarray, str]:
        """(slide id, features, encoder name)."""
        path = (self.data.labels.parent / slide).resolve()
        if path.is_file() or path.is_dir():
            return self._embed(path, mpp)
        return self._cached(slide)

    def _embed(self, path: Path, mpp: float | None) -> tuple[str, np.ndarray, str]:
        from histopilot.retrieval.features import embed_slide
        from histopilot.slide import open_slide

        with open_slide(path, mpp=mpp) as slide:
            found = embed_slide(slide, self.encoder(), cache_dir=self.data.features)
        if not len(found):
            raise TrainingDataError(f"{path.name}: no tissue tiles to embed")
        return found.slide_id, found.features, found.encoder

    def _cached(self, slide_id: str) -> tuple[str, np.ndarray, str]:
        cache = self.data.features / f"{Path(slide_id).name}.h5"  # never a path out of it
        try:
            with h5py.File(cache, "r") as handle:
                features = np.asarray(handle["features"][:], np.float32)
                encoder = handle.attrs.get("encoder")
        except FileNotFoundError as error:
            raise TrainingDataError(
                f"{slide_id} is neither a slide file nor {cache.name} in {self.data.features}"
            ) from error
        except (OSError, KeyError) as error:
            raise TrainingDataError(f"{cache.name} is not a feature file: {error}") from error
        if features.ndim != 2 or not len(features) or not np.isfinite(features).all():
            raise TrainingDataError(f"{cache.name} holds no usable feature rows")
        if encoder is None:  # written by another tool (CLAM, TRIDENT): the recipe says which
            encoder = self._required_encoder_name(f"{cache.name} does not record its encoder")
        return slide_id, features, encoder.decode() if isinstance(encoder, bytes) else str(encoder)

    def encoder(self):
        if self._encoder is None:
            from histopilot.retrieval.encoders import load_encoder

            name = self._required_encoder_name("slides named by file are embedded")
            self._encoder = load_encoder(name)
        return self._encoder

    def _required_encoder_name(self, why: str) -> str:
        if not self.data.encoder:
            raise TrainingDataError(f"{why}: set data.encoder to the patch encoder's name")
        return self.data.encoder


def _check(bags: list[Bag], encoders: set[str], data: MILData, report) -> None:
    if not bags:
        raise TrainingDataError(
            f"no slide in {data.labels} has usable features: {report.summary()}"
        )
    if len(encoders) > 1:
        raise TrainingDataError(
            f"the feature files come from different encoders ({', '.join(sorted(encoders))}); "
            "a head reads one encoder's vectors"
        )
    dims = {bag.features.shape[1] for bag in bags}
    if len(dims) > 1:
        raise TrainingDataError(f"the feature files have different widths {sorted(dims)}")
    if len({bag.label for bag in bags}) < 2:
        raise TrainingDataError(
            f"the usable slides have one label; a triage head needs two or more "
            f"({report.summary()})"
        )


def _split(bags: list[Bag], fraction: float, seed: int) -> None:
    """Stratified: each class gives the same share of its slides to validation."""
    rng = random.Random(seed)
    for label in sorted({bag.label for bag in bags}):
        members = [bag for bag in bags if bag.label == label]
        chosen = {id(bag) for bag in held_out(members, fraction, rng)}
        for bag in members:
            bag.validation = id(bag) in chosen


def _bags_digest(recipe: MILRecipe, bags: list[Bag]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for bag in sorted(bags, key=lambda b: b.slide_id):
        digest.update(f"{bag.slide_id}\0{bag.label}\0{bag.validation}\0".encode())
        digest.update(bag.features.tobytes())
    return file_digest([recipe.data.labels], digest)


# -- training -----------------------------------------------------------------------------------
def _fit(head, train_bags, validation, classes, recipe: MILRecipe, on_progress):
    train = recipe.train
    targets = {label: index for index, label in enumerate(classes)}
    counts = np.bincount([targets[b.label] for b in train_bags], minlength=len(classes))
    weights = torch.tensor(
        len(train_bags) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32
    )
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay
    )
    rng = np.random.default_rng(train.seed)
    best: dict = {"score": -1.0}
    losses: list[float] = []
    for epoch in range(1, train.epochs + 1):
        head.train()
        epoch_loss = []
        for index in rng.permutation(len(train_bags)):
            bag = train_bags[index]
            tiles = bag.features
            if len(tiles) > train.max_tiles:
                tiles = tiles[rng.choice(len(tiles), train.max_tiles, replace=False)]
            logits, _ = head(torch.from_numpy(tiles))
            target = targets[bag.label]
            # One bag per step: a weighted mean over one sample would cancel its own weight.
            loss = weights[target] * torch.nn.functional.cross_entropy(
                logits[None], torch.tensor([target])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss.append(loss.item())
        losses.append(float(np.mean(epoch_loss)))
        metrics = evaluate_head(head, validation, classes)
        # AUC when defined, else balanced accuracy: the number that chooses the kept epoch.
        score = metrics["auc"] if metrics["auc"] is not None else metrics["balanced_accuracy"]
        if score > best["score"]:
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            best = {"score": score, "epoch": epoch, "metrics": metrics, "state": state}
        if on_progress:
            on_progress(epoch, train.epochs, losses[-1])
    return best, losses


@torch.no_grad()
def evaluate_head(head: AttentionMIL, bags: list[Bag], classes: list[str]) -> dict:
    """AUC (one-vs-rest macro over classes when more than two) and balanced accuracy."""
    head.eval()
    probabilities = np.stack(
        [torch.softmax(head(torch.from_numpy(b.features))[0], 0).numpy() for b in bags]
    )
    truth = np.array([classes.index(b.label) for b in bags])
    present = set(truth.tolist())
    if len(present) < 2:
        auc = None  # AUC is undefined with one class among the validation slides
    elif len(classes) == 2:
        auc = float(roc_auc_score(truth, probabilities[:, 1]))
    elif present == set(range(len(classes))):
        auc = float(roc_auc_score(truth, probabilities, multi_class="ovr", average="macro"))
    else:
        auc = None
    predicted = probabilities.argmax(1)
    return {
        "auc": auc,
        "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
        "accuracy": float((predicted == truth).mean()),
    }


def expected_memory(head: AttentionMIL, recipe: MILRecipe) -> MemoryEstimate:
    """One bag's tiles through the head, its weights and AdamW state (float32, CPU or GPU)."""
    config = head.config
    per_tile = (config.in_dim + 3 * config.hidden_dim + 3 * config.attention_dim) * 4 * 2
    parameters = sum(p.numel() for p in head.parameters())
    return estimate(
        weights=0,
        trainable_parameters=parameters,
        activations=recipe.train.max_tiles * per_tile,
        device="cpu",
    )
