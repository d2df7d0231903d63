"""`histopilot finetune vlm`: LoRA SFT of a tiny Qwen2.5-VL (built from a config, saved, and
loaded by path as a user's checkpoint is) on real CRC patches captioned from their labels.

The adapter must do what a served one does: reload in PEFT to the same outputs as the merged
model, keep to the language model, and pass the layout checks `serve-llm` applies for vLLM.
"""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from histopilot.config import load_config
from histopilot.errors import FinetuneError, OutputError
from histopilot.finetune.conversations import Conversation
from histopilot.finetune.converters import convert
from histopilot.finetune.vlm import LANGUAGE_MODEL_PROJECTIONS, VLMRecipe, split, train_vlm
from histopilot.serve.lora import lora_layout_problems
from histopilot.serve.vllm_launch import plan_servers
from tests.crc_patches import caption_table, crc_rows, split_by_patch
from tests.tiny_models import save, tiny_vlm


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return save(*tiny_vlm(), tmp_path_factory.mktemp("base") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="module")
def crc_dataset(test_data: Path, tmp_path_factory) -> Path:
    """Two patches of each tissue class captioned from the label, as a conversation dataset."""
    folder = tmp_path_factory.mktemp("crc")
    patches, rows = crc_rows(test_data)
    rows, _ = split_by_patch(rows)
    table = caption_table(folder / "captions.csv", rows)
    convert(table, folder / "dataset", "captions", image_root=patches)
    return folder / "dataset"


def recipe(base: Path, data: Path, out: Path, **changes) -> VLMRecipe:
    train = {"steps": 12, "batch_size": 2, "gradient_accumulation": 1, "learning_rate": 5e-3}
    train |= {"log_every": 1, "eval_every": 6, "save_every": 6, "device": "cpu"}
    fields = {
        "model": str(base),
        "data": {"train": data, "eval_fraction": 0.25},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "max_image_pixels": 56 * 56,
        "train": train | changes.pop("train", {}),
        "out": out,
    }
    return VLMRecipe.model_validate(fields | changes)


@pytest.fixture(scope="module")
def trained(base_model, crc_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train_vlm(recipe(base_model, crc_dataset, out, merge=True)), out


def test_lora_training_lowers_the_loss_on_train_and_held_out_patches(trained):
    result, out = trained
    tenth = len(result.losses) // 4
    assert sum(result.losses[-tenth:]) < sum(result.losses[:tenth])
    assert result.eval_after["loss"] < result.eval_before["loss"]
    card = json.loads((out / "run.json").read_text())
    assert card["data"]["conversations"] == 16 and len(card["data"]["sha256"]) == 64
    assert card["metrics"]["eval_after"] == result.eval_after
    assert {"torch", "transformers", "peft", "trl"} <= set(card["versions"])


def test_the_adapter_has_the_layout_vllm_loads(trained):
    result, _ = trained
    config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == LANGUAGE_MODEL_PROJECTIONS
    assert not config["modules_to_save"]
    with safe_open(str(result.adapter / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(".language_model." in key and "lora_" in key for key in keys)
    assert lora_layout_problems(result.adapter, max_rank=8) == []
    assert lora_layout_problems(result.adapter, max_rank=4) == [
        "rank 8 is above the server's max_lora_rank 4"
    ]


def test_the_adapter_reloads_to_the_merged_models_outputs(trained, base_model, test_data):
    result, _ = trained
    processor = AutoProcessor.from_pretrained(result.merged)
    image = next((test_data / "patches" / "crc_val_he_7k").glob("TUM-*.png"))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(
        text=[prompt], images=[Image.open(image).convert("RGB")], return_tensors="pt"
    )

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(**inputs).logits

    base = AutoModelForImageTextToText.from_pretrained(base_model)
    untouched = logits(base)
    adapted = logits(PeftModel.from_pretrained(base, str(result.adapter)))
    merged = logits(AutoModelForImageTextToText.from_pretrained(result.merged))
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(adapted, untouched, atol=1e-3)


def test_serve_llm_serves_the_adapter_from_the_printed_configuration(trained, isolated_config):
    result, _ = trained
    Path("histopilot.toml").write_text('profile = "gpu"\n' + result.serve_config)

    (server,) = plan_servers(load_config()).servers

    assert server.lora_modules == {"histopilot-describer": str(result.adapter.resolve())}
    assert f"histopilot-describer={result.adapter.resolve()}" in server.command


def test_training_resumes_from_its_last_checkpoint(base_model, crc_dataset, tmp_path):
    first = train_vlm(recipe(base_model, crc_dataset, tmp_path, train={"steps": 6}))
    assert first.steps == 6 and (tmp_path / "checkpoints" / "checkpoint-6").is_dir()

    again = train_vlm(recipe(base_model, crc_dataset, tmp_path, train={"steps": 9}))
    assert again.steps == 9
    assert len(again.losses) == 9  # steps 1-6 come from the checkpoint's history

    with pytest.raises(FinetuneError, match="another model, adapter shape, dataset"):
        train_vlm(recipe(base_model, crc_dataset, tmp_path, lora={"r": 4}, train={"steps": 12}))
    (tmp_path / "checkpoints" / "fingerprint.txt").unlink()  # checkpoints of unknown origin
    with pytest.raises(FinetuneError, match="another model, adapter shape, dataset"):
        train_vlm(recipe(base_model, crc_dataset, tmp_path, train={"steps": 12}))


def test_a_folder_that_is_not_an_adapter_is_never_replaced(base_model, crc_dataset, tmp_path):
    mine = tmp_path / "adapters"
    (mine / "orchestrator").mkdir(parents=True)
    with pytest.raises(OutputError, match="would delete its contents"):
        train_vlm(recipe(base_model, crc_dataset, tmp_path / "run", adapter_dir=mine))
    assert (mine / "orchestrator").is_dir()


def test_every_question_about_one_image_stays_on_one_side_of_the_split():
    def asked(image: str, number: int) -> Conversation:
        return Conversation(
            id=f"{image}-{number}",
            images=[image],
            messages=[
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A."}]},
            ],
        )

    conversations = [asked(f"{image}.png", n) for image in "abcdefgh" for n in range(4)]
    train, held_out = split(conversations, 0.25, seed=0)
    assert len(held_out) == 8 and len(train) == 24
    assert not {c.images[0] for c in train} & {c.images[0] for c in held_out}


def test_a_pattern_that_reaches_the_vision_tower_is_refused(base_model, crc_dataset, tmp_path):
    spec = recipe(base_model, crc_dataset, tmp_path, lora={"target_modules": r".*\.(qkv|proj)"})
    with pytest.raises(FinetuneError, match="reaches the vision tower"):
        train_vlm(spec)


def test_qlora_without_a_gpu_says_what_to_do(base_model, crc_dataset, tmp_path):
    spec = recipe(base_model, crc_dataset, tmp_path, quantization="4bit")
    with pytest.raises(FinetuneError, match="needs a CUDA GPU"):
        train_vlm(spec)
