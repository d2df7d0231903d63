"""`finetune clip` and `finetune mil`: a tiny open_clip model learns the CRC tissue captions,
and an attention-MIL head learns which bags hold lymphocyte tiles; both judged on data they
did not train on, and both saved where histopilot loads them."""

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from histopilot.agents.mil import load_mil_head
from histopilot.cli import app
from histopilot.errors import FinetuneError, OutputError, TrainingDataError
from histopilot.finetune.clip import (
    ClipRecipe,
    evaluate_clip,
    load_open_clip_model,
    load_pairs,
    train_clip,
)
from histopilot.finetune.mil import MILRecipe, train_mil
from histopilot.retrieval.encoders import load_encoder
from tests.crc_patches import TISSUE, caption_table, crc_rows, split_by_patch
from tests.tiny_encoders import save_tiny_open_clip

CAPTION = "an H&E image of {}."


@pytest.fixture(scope="module")
def crc(test_data: Path) -> tuple[Path, list[dict]]:
    return crc_rows(test_data)


def clip_recipe(crc, folder: Path, **changes) -> ClipRecipe:
    patches, rows = crc
    train_rows, held_out = split_by_patch(rows)
    fields = {
        "model": f"local-dir:{save_tiny_open_clip(folder / 'tiny-clip')}",
        "data": {
            "train": caption_table(folder / "train.csv", train_rows, CAPTION),
            "eval": caption_table(folder / "eval.csv", held_out, CAPTION),
            "image_root": patches,
            "label_column": "label",
        },
        "label_names": TISSUE,
        "out": folder / "run",
    }
    return ClipRecipe.model_validate(fields | changes)


def test_full_clip_tuning_improves_retrieval_on_held_out_patches(crc, tmp_path):
    recipe = clip_recipe(
        crc, tmp_path, mode="full", train={"steps": 60, "batch_size": 16, "learning_rate": 1e-3}
    )
    announced = []

    result = train_clip(recipe, announce=announced.append)

    assert announced[0].startswith("expected memory ≈")
    before, after = result.before, result.after
    assert after["image_to_text_recall@1"] > before["image_to_text_recall@1"]
    assert after["image_to_text_recall@5"] >= before["image_to_text_recall@5"]
    assert {"text_to_image_recall@1", "zero_shot_balanced_accuracy"} <= set(after)
    # The saved model is an encoder histopilot loads by name.
    encoder = load_encoder(result.encoder, device="cpu")
    patches, rows = crc
    image = np.asarray(Image.open(patches / rows[0]["file"]).convert("RGB"))
    assert encoder.encode_images([image]).shape == (1, 32)
    assert encoder.encode_text(["an H&E image of mucus."]).shape == (1, 32)


def test_lora_clip_tuning_saves_an_adapter_and_a_merged_model_that_scores_the_same(crc, tmp_path):
    recipe = clip_recipe(
        crc, tmp_path, mode="lora", train={"steps": 30, "batch_size": 16, "learning_rate": 1e-2}
    )

    result = train_clip(recipe)

    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    # Every adapted layer learned, attention included (open_clip's attention reads its
    # projection weights directly, so LoRA must wrap the attention module as a whole).
    with safe_open(str(result.adapter / "adapter_model.safetensors"), "pt") as weights:
        names = weights.keys()
        learned = {name: weights.get_tensor(name).abs().sum().item() for name in names}
    assert any(".attn." in key for key in learned)
    assert all(total > 0 for key, total in learned.items() if "lora_B" in key)
    model, transform, tokenizer, _ = load_open_clip_model(
        recipe.model_copy(update={"model": f"local-dir:{result.model}", "mode": "full"}),
        torch.device("cpu"),
    )
    _, held_out, _, _ = load_pairs(recipe)
    rescored = evaluate_clip(model, transform, tokenizer, held_out, recipe, torch.device("cpu"))
    assert rescored == pytest.approx(result.after, abs=1e-3)


def test_clip_needs_captions_it_can_read(crc, tmp_path):
    patches, _ = crc
    table = tmp_path / "few.csv"
    table.write_text("image,caption,label\nmissing.png,a caption,ADI\n")
    recipe = ClipRecipe(
        model=f"local-dir:{save_tiny_open_clip(tmp_path / 'tiny-clip')}",
        data={"train": table, "image_root": patches},
        out=tmp_path / "run",
    )
    with pytest.raises(TrainingDataError, match="training needs two or more"):
        train_clip(recipe)


def write_bags(folder: Path, crc, *, bags: int = 60) -> Path:
    """Bags of offline-encoder features of real patches: a bag is positive when it holds
    lymphocyte tiles. Training bags draw on two patches per class, validation bags on the
    other two, so validation asks about patches the head never saw."""
    patches, rows = crc
    encoder = load_encoder("offline")
    features = encoder.encode_images(
        [np.asarray(Image.open(patches / row["file"]).convert("RGB")) for row in rows]
    )
    sides = split_by_patch(rows)
    index = {row["file"]: i for i, row in enumerate(rows)}
    rng = np.random.default_rng(0)
    (folder / "features").mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "label", "split"])
        for number in range(bags):
            side = sides[0] if number < bags * 2 // 3 else sides[1]
            positive = number % 2 == 1
            others = [index[r["file"]] for r in side if r["label"] != "LYM"]
            members = list(rng.choice(others, 12))
            if positive:
                members += list(
                    rng.choice([index[r["file"]] for r in side if r["label"] == "LYM"], 2)
                )
            noise = rng.normal(0, 0.01, (len(members), encoder.dim))
            with h5py.File(folder / "features" / f"bag-{number:03d}.h5", "w") as h5:
                h5["features"] = (features[members] + noise).astype(np.float32)
                h5["coords"] = np.zeros((len(members), 2), np.int64)
                h5.attrs["encoder"] = encoder.name
            split = "train" if side is sides[0] else "validation"
            writer.writerow([f"bag-{number:03d}", "lymphocytic" if positive else "other", split])
    return folder


def mil_recipe(folder: Path, **changes) -> MILRecipe:
    fields = {
        "data": {
            "labels": folder / "labels.csv",
            "features": folder / "features",
            "split_column": "split",
        },
        "train": {"epochs": 15, "learning_rate": 1e-3},
        "risk_classes": ["lymphocytic"],
        "out": folder / "run",
    }
    return MILRecipe.model_validate(fields | changes)


def test_mil_head_beats_chance_on_held_out_bags_and_triage_loads_it(crc, tmp_path):
    folder = write_bags(tmp_path, crc)

    result = train_mil(mil_recipe(folder))

    assert result.validation["auc"] > 0.75 > result.chance["auc"]
    assert result.validation["balanced_accuracy"] > result.chance["balanced_accuracy"]
    assert result.losses[-1] < result.losses[0]
    head = load_mil_head(result.head)
    assert head.config.encoder == "offline" and head.config.risk_classes == ["lymphocytic"]
    with h5py.File(folder / "features" / "bag-059.h5") as h5:  # a positive validation bag
        risk, attention = head.score(h5["features"][:])
    assert 0 <= risk <= 1 and attention.max() == pytest.approx(1.0)
    assert str(result.head.resolve()) in result.agents_config


def test_mil_refuses_or_reports_what_it_cannot_use(crc, tmp_path):
    folder = write_bags(tmp_path, crc, bags=12)
    with pytest.raises(FinetuneError, match="risk_classes"):
        train_mil(mil_recipe(folder, risk_classes=["malignant"]))

    # A folder that is not a triage head is never replaced.
    (folder / "run" / "mil_head").mkdir(parents=True)
    (folder / "run" / "mil_head" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="would delete its contents"):
        train_mil(mil_recipe(folder))
    (folder / "run" / "mil_head" / "notes.txt").unlink()

    # Rows that cannot be used are reported with their reason; training goes on without them.
    with (folder / "labels.csv").open("a") as handle:
        handle.write("bag-000,other,train\nbag-001,lymphocytic,holdout\nnowhere,other,train\n")
    with h5py.File(folder / "features" / "bag-002.h5", "a") as h5:
        del h5.attrs["encoder"]  # as CLAM or TRIDENT write them
    recipe = mil_recipe(folder, train={"epochs": 1})
    (folder / "recipe.yaml").write_text(yaml.safe_dump(json.loads(recipe.model_dump_json())))
    ran = CliRunner().invoke(app, ["finetune", "mil", "--config", str(folder / "recipe.yaml")])
    assert ran.exit_code == 0, ran.output
    assert "risk = P(lymphocytic)" in ran.stderr and "mil_head = " in ran.stderr
    skipped = json.loads((folder / "run" / "skipped.json").read_text())["skipped"]
    reasons = sorted(item["reason"].split(":")[0] for item in skipped)
    assert reasons == ["duplicate slide", "invalid record", "no features", "no features"]
    assert any("set data.encoder" in item["reason"] for item in skipped)

    with h5py.File(folder / "features" / "bag-003.h5", "a") as h5:
        h5.attrs["encoder"] = "quiltnet-b-32"
    with pytest.raises(TrainingDataError, match="different encoders"):
        train_mil(mil_recipe(folder))


def test_mil_embeds_slides_named_by_path_and_reports_those_it_cannot(
    wsi_dir, feature_cache, tmp_path
):
    labels = tmp_path / "labels.csv"
    slides = [  # name, label, µm/px for scans that do not record it
        ("CMU-1-Small-Region.svs", "benign", ""),
        ("dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm", "benign", "0.25"),
        ("tcga-cr-7395-01a-01-ts1.svs", "tumour", "0.25"),
        ("hamamatsu-test3-DAPI-2-387.ndpi", "tumour", ""),
        ("vectra-polaris-3ch-small.qptiff", "tumour", ""),
    ]
    labels.write_text(
        "slide,label,mpp\n" + "".join(f"{wsi_dir / n},{label},{mpp}\n" for n, label, mpp in slides)
    )
    recipe = MILRecipe.model_validate(
        {
            "data": {
                "labels": labels,
                "features": feature_cache,
                "validation_fraction": 0.5,
                "encoder": "offline",
            },
            "train": {"epochs": 2},
            "out": tmp_path / "run",
        }
    )

    result = train_mil(recipe)

    # The two fluorescence scans are no brightfield slides to embed, and say so.
    assert result.skipped == 2
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())["skipped"]
    assert all("fluorescence" in item["reason"] for item in skipped)
    assert (feature_cache / "tcga-cr-7395-01a-01-ts1.h5").is_file()
    assert load_mil_head(result.head).config.classes == ["benign", "tumour"]
