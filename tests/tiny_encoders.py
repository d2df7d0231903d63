"""Tiny open_clip and timm models saved to a folder, loaded through the same code users run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_open_clip(folder: Path) -> Path:
    """An open_clip folder (``open_clip_config.json`` + weights) for ``local-dir:``."""
    import open_clip

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    model = open_clip.CLIP(**TINY_CLIP)
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def save_tiny_timm(folder: Path) -> Path:
    """A timm ViT folder (``config.json`` + weights) for ``local-dir:``."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=1
    )
    save_for_hf(model, folder)
    return folder


def save_tiny_hf_clip(folder: Path) -> Path:
    """A Hugging Face ``CLIPModel`` folder with a character-level tokenizer and processor."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[])
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64}
    text |= {"num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77}
    text |= {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "image_size": 32, "patch_size": 16}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
