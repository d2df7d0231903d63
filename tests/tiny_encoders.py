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
