"""The triage head: gated attention multiple-instance learning over a slide's tile embeddings.

Attention MIL (Ilse, Tomczak & Welling, ICML 2018) scores a slide from a bag of tile vectors
and says which tiles drove the score; its attention is the importance map triage hands the
navigator. The fine-tuning recipe trains it; triage loads it from a folder holding
``mil_head.json`` (architecture, class names, the encoder it was trained on) and
``mil_head.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from histopilot.errors import ConfigError

CONFIG_FILE, WEIGHTS_FILE = "mil_head.json", "mil_head.safetensors"


class MILHeadConfig(BaseModel):
    encoder: str = Field(description="The patch encoder whose vectors the head reads")
    in_dim: int = Field(gt=0)
    hidden_dim: int = Field(128, gt=0)
    attention_dim: int = Field(64, gt=0)
    classes: list[str] = Field(min_length=2)
    risk_classes: list[str] = Field(
        default_factory=list, description="Classes whose probability is the slide's risk"
    )

    def risk_columns(self) -> list[int]:
        chosen = self.risk_classes or self.classes[1:]
        return [self.classes.index(name) for name in chosen]


class AttentionMIL(nn.Module):
    """Gated attention pooling (tanh ⊙ sigmoid) followed by a linear classifier."""

    def __init__(self, config: MILHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.project = nn.Sequential(nn.Linear(config.in_dim, config.hidden_dim), nn.ReLU())
        self.attention_tanh = nn.Linear(config.hidden_dim, config.attention_dim)
        self.attention_gate = nn.Linear(config.hidden_dim, config.attention_dim)
        self.attention_out = nn.Linear(config.attention_dim, 1)
        self.classifier = nn.Linear(config.hidden_dim, len(config.classes))

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (C,) and attention weights (N,) summing to 1 for one bag (N, in_dim)."""
        hidden = self.project(tiles)
        gate = torch.tanh(self.attention_tanh(hidden)) * torch.sigmoid(self.attention_gate(hidden))
        attention = torch.softmax(self.attention_out(gate).squeeze(-1), dim=0)
        return self.classifier(attention @ hidden), attention

    @torch.inference_mode()
    def score(self, features: np.ndarray) -> tuple[float, np.ndarray]:
        """Slide risk in [0, 1] and per-tile attention scaled to [0, 1]."""
        self.eval()
        logits, attention = self(torch.from_numpy(np.asarray(features, np.float32)))
        risk = torch.softmax(logits, 0)[self.config.risk_columns()].sum().item()
        weights = attention.numpy()
        return float(risk), weights / max(float(weights.max()), 1e-12)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2), encoding="utf-8")
        save_file(self.state_dict(), str(folder / WEIGHTS_FILE))
        return folder


def load_mil_head(folder: str | Path) -> AttentionMIL:
    """The head saved in ``folder``; a missing or mismatched file is a configuration error."""
    folder = Path(folder)
    try:
        config = MILHeadConfig.model_validate(
            json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        )
        head = AttentionMIL(config)
        head.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except FileNotFoundError as error:
        raise ConfigError(
            f"no triage head in {folder} (expected {CONFIG_FILE} and {WEIGHTS_FILE}); train one "
            "with `histopilot finetune mil`, or remove agents.mil_head from the config."
        ) from error
    except (ValueError, ValidationError, RuntimeError) as error:
        raise ConfigError(f"the triage head in {folder} cannot be loaded: {error}") from error
    return head.eval()
