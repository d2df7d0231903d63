"""The `histopilot finetune` commands as a user runs them: shipped recipes, data conversion and
export, a VLM run configured from a YAML file with --set overrides, and clear one-line errors."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from histopilot.cli import app
from histopilot.finetune.clip import ClipRecipe
from histopilot.finetune.diffusion import DiffusionRecipe
from histopilot.finetune.mil import MILRecipe
from histopilot.finetune.recipe import shipped_recipes
from histopilot.finetune.vlm import VLMRecipe
from tests.crc_patches import caption_table, crc_rows
from tests.tiny_models import save, tiny_vlm

runner = CliRunner()
KINDS = {"vlm": VLMRecipe, "clip": ClipRecipe, "mil": MILRecipe, "diffusion": DiffusionRecipe}


@pytest.fixture
def captions(test_data: Path, tmp_path: Path) -> Path:
    _, rows = crc_rows(test_data)
    return caption_table(tmp_path / "captions.csv", rows[::2])


def test_every_shipped_recipe_is_listed_and_valid():
    listed = runner.invoke(app, ["finetune", "recipes", "--json"])
    assert listed.exit_code == 0, listed.output
    names = json.loads(listed.stdout)
    assert names == shipped_recipes() and len(names) >= 5
    kinds = {"qwen": "vlm", "quiltnet": "clip", "triage": "mil", "tile": "diffusion"}
    for name in names:
        kind = next(k for prefix, k in kinds.items() if name.startswith(prefix))
        KINDS[kind].load(name)  # validates, with the shipped defaults


def test_convert_then_export_from_the_command_line(captions, test_data, tmp_path):
    images = test_data / "patches" / "crc_val_he_7k"
    converted = runner.invoke(
        app,
        ["finetune", "convert", str(captions), "--from", "captions", "--images", str(images),
         "--out", str(tmp_path / "dataset"), "--json"],
    )  # fmt: skip
    assert converted.exit_code == 0, converted.output
    assert json.loads(converted.stdout)["kept"] == 16

    exported = runner.invoke(
        app,
        ["finetune", "export", str(tmp_path / "dataset"), "--to", "llava",
         "--out", str(tmp_path / "llava.json"), "--json"],
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output
    assert len(json.loads((tmp_path / "llava.json").read_text())) == 16


def test_vlm_recipe_from_yaml_with_overrides(captions, test_data, tmp_path, isolated_config):
    base = save(*tiny_vlm(), tmp_path / "base")
    runner.invoke(
        app,
        ["finetune", "convert", str(captions), "--from", "captions",
         "--images", str(test_data / "patches" / "crc_val_he_7k"), "--out", "data"],
    )  # fmt: skip
    recipe = {
        "model": "../base",  # relative to the recipe file
        "data": {"train": "../somewhere-else", "eval_fraction": 0.25},
        "max_image_pixels": 3136,
        "train": {"steps": 50, "batch_size": 2, "gradient_accumulation": 1, "device": "cpu"},
        "out": "../run",
    }
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "describer.yaml").write_text(yaml.safe_dump(recipe))

    result = runner.invoke(
        app,
        ["finetune", "vlm", "--config", "recipes/describer.yaml", "--set", "train.steps=2",
         "--set", "lora.r=4", "--set", "data.train=data", "--json"],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and Path(summary["adapter"]) == tmp_path / "run" / "adapter"
    assert "steps: 2" in result.stderr and "r: 4" in result.stderr  # the effective recipe
    assert f"train: {tmp_path / 'data'}" in result.stderr  # typed paths: from the shell's folder
    assert "expected memory ≈" in result.stderr
    assert f"model: {base}" in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["vlm", "--config", "no-such-recipe"], "no shipped recipe of that name"),
        (["mil", "--config", "triage-mil", "--set", "train.epochs"], "--set takes KEY=VALUE"),
        (["mil", "--config", "triage-mil", "--set", "train.epoch=3"], "Extra inputs"),
        (["mil", "--config", "triage-mil", "--set", "out=/tmp/x"], "no labels table"),
        (["convert", "x.csv", "--from", "word", "--out", "o"], "--from takes llava"),
    ],
)
def test_mistakes_are_one_clear_line(arguments, message, isolated_config):
    result = runner.invoke(app, ["finetune", *arguments])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
