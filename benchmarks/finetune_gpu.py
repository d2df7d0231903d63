"""GPU check of the VLM LoRA recipe: step time and peak memory at a real model's width.

For a machine with one CUDA GPU; about four minutes. No download: the model is a Qwen2.5-VL
built from a config at Qwen2.5-VL-7B's width (hidden 3584, MLP 18944, 28 heads, 4 KV heads,
vocabulary 152,064; vision tower 1280 wide) with 4 of its 28 decoder layers and 4 of its 32
vision blocks, random weights, saved and loaded by path as a user's checkpoint is. The data is
the 32 real CRC-VAL-HE-7K patches at 448 px (256 image tokens each) captioned from their labels.

1. **histopilot recipe** (``train_vlm``: TRL ``SFTTrainer`` + PEFT LoRA r=16 on the language
   model, bf16, gradient checkpointing, batch 2): median step time after 5 warm-up steps, and
   peak GPU memory against the recipe's own estimate for this configuration.
2. **Peer: a bare PEFT loop**: the same model, LoRA, batches, optimizer and checkpointing in a
   hand-written PyTorch loop (no trainer, no collator, no evaluation). The ratios recipe/peer
   say what the trainer machinery costs.
3. **QLoRA** (when bitsandbytes is installed): the recipe with a 4-bit NF4 base.

``--estimates`` prints instead the memory table in ``docs/finetuning.md``: the estimate for
the default models, built on the meta device from their published configuration sizes (no
weights, no GPU). ``--device cpu`` runs the steps on a tiny model on the CPU, only to check
the script (its numbers are not GPU numbers). One JSON line per result (``{"bench":
"finetune_gpu", ...}``) follows the table.

    python benchmarks/finetune_gpu.py [--steps 200] [--device cuda] [--estimates]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from histopilot.finetune.conversations import read_conversations
from histopilot.finetune.converters import convert
from histopilot.finetune.memory import GIB
from histopilot.finetune.vlm import (
    LoraSpec,
    VLMRecipe,
    estimate_for_config,
    load_processor,
    lora_config,
    to_dataset,
    train_vlm,
)
from tests.tiny_models import save, tiny_vlm

DATA = (
    Path(os.environ.get("HISTOPILOT_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))
    / "patches"
    / "crc_val_he_7k"
)
IMAGE_PIXELS = 448 * 448  # 16 × 16 merged patches: 256 image tokens
#: Qwen2.5-VL-7B's widths with 4 decoder layers and 4 vision blocks.
WIDE_TEXT = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 4,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rope_scaling": {"type": "default", "mrope_section": [16, 24, 24], "rope_type": "default"},
}  # fmt: skip
WIDE_VISION = {
    "depth": 4, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "out_hidden_size": 3584, "fullatt_block_indexes": [3],
}  # fmt: skip
#: Published configuration sizes of the default and alternative describer models.
DEFAULT_MODELS = {
    "Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", {
        "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4,
                        "vocab_size": 152064},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "out_hidden_size": 3584}}),
    "Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", {
        "text_config": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                        "num_attention_heads": 16, "num_key_value_heads": 2,
                        "vocab_size": 151936, "tie_word_embeddings": True},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "out_hidden_size": 2048},
        "tie_word_embeddings": True}),
    "Qwen2-VL-2B-Instruct": ("qwen2_vl", {
        "text_config": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                        "num_attention_heads": 12, "num_key_value_heads": 2,
                        "vocab_size": 151936, "tie_word_embeddings": True},
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16},
        "tie_word_embeddings": True}),
    "llava-1.5-7b-hf": ("llava", {
        "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32064},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024,
                          "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                          "projection_dim": 768}}),
}  # fmt: skip


def estimates() -> list[dict]:
    """The memory table: LoRA r=16 (bf16, batch 1 and 2) and QLoRA (batch 1) per model."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    rows = []
    for name, (model_type, sizes) in DEFAULT_MODELS.items():
        config = AutoConfig.for_model(model_type, **sizes)
        with torch.device("meta"):
            parameters = sum(
                p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters()
            )

        def gib(batch: int, quantized: bool, config=config) -> float:
            return estimate_for_config(
                config, lora=LoraSpec(), quantized=quantized, batch_size=batch,
                image_pixels=401_408, checkpointing=True, device="cuda",
            ).total_gib  # fmt: skip

        rows.append(
            {
                "model": name,
                "parameters_b": round(parameters / 1e9, 2),
                "lora_bf16_batch1_gib": round(gib(1, False), 1),
                "lora_bf16_batch2_gib": round(gib(2, False), 1),
                "qlora_batch1_gib": round(gib(1, True), 1),
            }
        )
    return rows


def conversations(folder: Path) -> Path:
    """The CRC patches upscaled to 448 px, captioned from their labels, as a dataset."""
    images = folder / "images"
    images.mkdir(parents=True)
    with (DATA / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (folder / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for row in rows:
            Image.open(DATA / row["file"]).convert("RGB").resize((448, 448)).save(
                images / row["file"]
            )
            writer.writerow([row["file"], f"H&E, colorectal: {row['label_name']} tissue."])
    convert(folder / "captions.csv", folder / "dataset", "captions", image_root=images)
    return folder / "dataset"


def recipe_run(recipe: VLMRecipe, device: torch.device) -> dict:
    """Median step time and peak memory of the histopilot recipe."""
    stamps: list[float] = []
    reset(device)
    train_vlm(recipe, resume=False, on_progress=lambda *_: stamps.append(time.perf_counter()))
    return {"step_s": statistics.median(diff(stamps)[5:]), "peak_gib": peak(device)}


def bare_loop(recipe: VLMRecipe, device: torch.device, steps: int) -> dict:
    """The peer: the same LoRA training in a hand-written PEFT loop."""
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    reset(device)
    processor = load_processor(recipe)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(recipe.model, dtype=dtype).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(recipe.lora))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=recipe.train.learning_rate
    )
    found, _, root = read_conversations(recipe.data.train)
    rows = to_dataset(found, root)
    batch_size = recipe.train.batch_size
    stamps = []
    for step in range(steps):
        picked = [rows[(step * batch_size + i) % len(rows)] for i in range(batch_size)]
        loss = model(**batch_of(processor, picked, device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        synchronize(device)
        stamps.append(time.perf_counter())
    return {"step_s": statistics.median(diff(stamps)[5:]), "peak_gib": peak(device)}


def batch_of(processor, rows: list[dict], device: torch.device) -> dict:
    """Prompt + answer tokens with the prompt masked out of the labels."""
    prompts = [processor.apply_chat_template(r["prompt"], add_generation_prompt=True) for r in rows]
    answers = [r["completion"][0]["content"][0]["text"] + "<|im_end|>" for r in rows]
    images = [r["images"] for r in rows]
    whole = processor(
        text=[p + a for p, a in zip(prompts, answers, strict=True)],
        images=images, return_tensors="pt", padding=True,
    )  # fmt: skip
    prompt_lengths = [len(t) for t in processor(text=prompts, images=images)["input_ids"]]
    labels = whole["input_ids"].clone()
    for row, length in enumerate(prompt_lengths):
        labels[row, :length] = -100
    labels[whole["attention_mask"] == 0] = -100
    return {**whole.to(device), "labels": labels.to(device)}


def diff(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="Recipe steps (peer: a quarter)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--estimates", action="store_true", help="Print the memory table only")
    args = parser.parse_args()
    if args.estimates:
        rows = estimates()
        print(
            "| model | parameters (B) | LoRA bf16, batch 1 | LoRA bf16, batch 2 | QLoRA, batch 1 |"
        )
        print("|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['model']} | {row['parameters_b']} | {row['lora_bf16_batch1_gib']} GiB | "
                f"{row['lora_bf16_batch2_gib']} GiB | {row['qlora_batch1_gib']} GiB |"
            )
        for row in rows:
            print(json.dumps({"bench": "finetune_gpu", "part": "estimate", **row}))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible; use --estimates, or --device cpu to check the script")
    wide = device.type == "cuda"
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model, processor = tiny_vlm(
            text=WIDE_TEXT if wide else None, vision=WIDE_VISION if wide else None
        )
        config = model.config
        save(model, processor, work / "model")
        del model
        recipe = VLMRecipe(
            model=str(work / "model"),
            data={"train": conversations(work / "data"), "eval_fraction": 0},
            max_image_pixels=IMAGE_PIXELS,
            train={
                "steps": args.steps,
                "batch_size": 2,
                "gradient_accumulation": 1,
                "log_every": 1,
                "save_every": 10**6,
                "device": args.device,
            },
            out=work / "run",
        )
        estimate = estimate_for_config(
            config, lora=recipe.lora, quantized=False, batch_size=2,
            image_pixels=IMAGE_PIXELS, checkpointing=True, device=args.device,
        )  # fmt: skip
        results = {"recipe": recipe_run(recipe, device)}
        results["peer"] = bare_loop(recipe, device, max(10, args.steps // 4))
        if wide and importlib.util.find_spec("bitsandbytes") is not None:
            quantized = recipe.model_copy(update={"quantization": "4bit", "out": work / "q"})
            results["qlora"] = recipe_run(quantized, device)
    report(results, estimate.total_gib, device)


def report(results: dict, estimated_gib: float, device: torch.device) -> None:
    recipe, peer = results["recipe"], results["peer"]
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"{'run':<10}{'step (s)':>10}{'peak (GiB)':>12}")
    for name, result in results.items():
        memory = f"{result['peak_gib']:.2f}" if result["peak_gib"] is not None else "-"
        print(f"{name:<10}{result['step_s']:>10.3f}{memory:>12}")
    print(f"step time recipe/peer: {recipe['step_s'] / peer['step_s']:.2f}")
    if recipe["peak_gib"]:
        print(f"peak memory recipe/peer: {recipe['peak_gib'] / peer['peak_gib']:.2f}")
        print(f"estimate {estimated_gib:.2f} GiB; measured/estimate "
              f"{recipe['peak_gib'] / estimated_gib:.2f}")  # fmt: skip
    for name, result in results.items():
        print(json.dumps({"bench": "finetune_gpu", "part": name, **result,
                          "estimate_gib": round(estimated_gib, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
