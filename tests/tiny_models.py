"""Tiny real models built from configs, offline, for exercising every loading path in seconds.

The vision-language model is a Qwen2.5-VL with two layers and a byte-level tokenizer: it loads
through ``AutoProcessor`` / ``AutoModelForImageTextToText`` exactly as a user's checkpoint does.
With random weights it writes noise, so :func:`teach` fits it, for a few hundred steps, to give
fixed answers to fixed prompts; a test can then check that a real tool call or JSON answer
travels through a backend intact.
"""

from __future__ import annotations

from pathlib import Path

import torch
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from PIL import Image
from pydantic import BaseModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from histopilot.config import RoleConfig
from histopilot.serve import image_part
from histopilot.serve.families import family_of
from histopilot.serve.structured import with_schema_instruction
from histopilot.serve.transformers_backend import TransformersChatModel

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def tiny_vlm(
    seed: int = 0, *, text: dict | None = None, vision: dict | None = None
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A 2-layer Qwen2.5-VL and its processor, with histopilot's tool-capable chat template.

    ``text`` and ``vision`` override sizes of the two configs (a benchmark builds one at a real
    model's width).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    template = family_of("Qwen/Qwen2.5-VL-7B-Instruct").tools_template_text()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_scaling": {"type": "default", "mrope_section": [4, 2, 2], "rope_type": "default"},
            "eos_token_id": ids["<|im_end|>"],
            "bos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
        }
        | (text or {}),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        }
        | (vision or {}),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, processor


def teach(
    model: Qwen2_5_VLForConditionalGeneration,
    processor: Qwen2_5_VLProcessor,
    lessons: list[tuple[dict, str]],
    steps: int = 300,
) -> float:
    """Fit ``model`` to answer each rendered prompt with its completion; returns the last loss.

    Each lesson is ``(inputs, completion)`` where ``inputs`` is what the processor returned for
    the prompt (``apply_chat_template(..., tokenize=True, return_dict=True)``); only the
    completion tokens (and the end-of-turn token) are in the loss.
    """
    eos = processor.tokenizer.eos_token
    batches = []
    for inputs, completion in lessons:
        target = processor.tokenizer(completion + eos, return_tensors="pt")["input_ids"]
        batch = dict(inputs)
        batch["input_ids"] = torch.cat([inputs["input_ids"], target], dim=1)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if "mm_token_type_ids" in inputs:
            batch["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(target)], dim=1
            )
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -target.shape[1] :] = target
        batch["labels"] = labels
        batches.append(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def save(model, processor, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tissue_image(size: int = 64) -> Image.Image:
    """A small pink-and-purple image, enough for the vision tower to have pixels to read."""
    pixels = torch.zeros(size, size, 3, dtype=torch.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 230, 170, 200
    pixels[size // 4 : size // 2, size // 4 : size // 2] = torch.tensor([90, 60, 150])
    return Image.fromarray(pixels.numpy())


def zoom_to_region(x: int, y: int) -> str:
    """Centre the view on level-0 pixel (x, y)."""
    return f"centred on {x}, {y}"


class RegionGrade(BaseModel):
    """A grade for one region."""

    grade: int
    confidence: float


def tool_question() -> list[BaseMessage]:
    text = {"type": "text", "text": "Where is the tumour edge?"}
    return [HumanMessage(content=[text, image_part(tissue_image())])]


def describe_question() -> list[BaseMessage]:
    text = {"type": "text", "text": "Describe."}
    return [HumanMessage(content=[text, image_part(tissue_image())])]


def plain_describe(model, processor, max_new_tokens: int) -> tuple[str, int, int]:
    """``describe_question`` answered by plain transformers, as a user would run it by hand.

    Returns the decoded answer, the prompt's token count and the number of generated tokens.
    """
    image = {"type": "image", "image": tissue_image()}
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Describe."}, image]}]
    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    prompt_tokens = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(output[0, prompt_tokens:], skip_special_tokens=True)
    return answer, prompt_tokens, output.shape[1] - prompt_tokens


def grade_question() -> list[BaseMessage]:
    return [HumanMessage("Grade this region.")]


TOOL_ANSWER = (
    '<tool_call>\n{"name": "zoom_to_region", "arguments": {"x": 1200, "y": 800}}\n</tool_call>'
)
GRADE_ANSWER = '{"grade": 2, "confidence": 0.8}'


def build_taught_vlm(workdir: Path) -> Path:
    """Save a tiny VLM, load it through the backend, teach it the two answers, save it again.

    Teaching on the prompts the backend itself encodes keeps the lessons in step with the chat
    template. Returns the folder of the taught model, which nothing has loaded yet.
    """
    model, processor = tiny_vlm()
    untaught = save(model, processor, workdir / "untaught")
    backend = TransformersChatModel(
        role="describer", settings=RoleConfig(backend="transformers", model=str(untaught))
    )
    tools = [convert_to_openai_tool(zoom_to_region)]
    lessons = [
        (backend.encode_prompt(tool_question(), tools), TOOL_ANSWER),
        (
            backend.encode_prompt(with_schema_instruction(grade_question(), RegionGrade)),
            GRADE_ANSWER,
        ),
    ]
    local = backend.local_model()
    teach(local.model, local.processor, lessons, steps=240)
    return save(local.model, local.processor, workdir / "taught")
