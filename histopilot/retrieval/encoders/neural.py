"""Neural patch encoders: open_clip models, Hugging Face CLIP models and timm backbones.

One ``TorchEncoder`` runs any of them: a preprocessing transform (the model's own), a batched
image forward pass on the chosen device under ``torch.inference_mode``, and for
vision-language models a text forward pass into the same space. The ``load_*`` functions
below build one from a model id; weights come from a local folder or the Hugging Face cache,
and gated models (UNI, Virchow2, CONCH) load only for users who have accepted their terms.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from histopilot.errors import EncoderError
from histopilot.retrieval.encoders.base import DEFAULT_MPP, PatchEncoder
from histopilot.retrieval.vectors import normalized

PREPROCESS_THREADS = min(16, os.cpu_count() or 1)
ImageForward = Callable[[torch.Tensor], torch.Tensor]
TextForward = Callable[[Sequence[str], torch.device], torch.Tensor]


class TorchEncoder(PatchEncoder):
    """A PyTorch image model (and optional text tower) behind the ``PatchEncoder`` contract."""

    def __init__(
        self,
        *,
        name: str,
        dim: int,
        transform: Callable[[Image.Image], torch.Tensor],
        image_forward: ImageForward,
        text_forward: TextForward | None = None,
        device: torch.device,
        weights_digest: str,
        tile_size: int = 224,
        mpp: float = DEFAULT_MPP,
    ) -> None:
        self.name, self.dim, self.tile_size, self.mpp = name, dim, tile_size, mpp
        self.device = device
        self._weights = weights_digest
        self._transform = transform
        self._image_forward = image_forward
        self._text_forward = text_forward

    @property
    def has_text(self) -> bool:
        return self._text_forward is not None

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self._weights}"

    def _embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        # Preprocessing (PIL resize, crop, normalise) costs more than a GPU forward pass, so
        # it runs on a thread per core; PIL and torch release the GIL while they work.
        with ThreadPoolExecutor(max_workers=PREPROCESS_THREADS) as pool:
            pixels = torch.stack(list(pool.map(self._preprocess, images)))
        with torch.inference_mode():
            features = self._image_forward(pixels.to(self.device))
        return features.float().cpu().numpy()

    def _preprocess(self, image: np.ndarray) -> torch.Tensor:
        return self._transform(Image.fromarray(image))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if self._text_forward is None:
            return super().encode_text(texts)
        with torch.inference_mode():
            return normalized(self._text_forward(list(texts), self.device).float().cpu().numpy())


def weights_digest(model: torch.nn.Module) -> str:
    """A short digest of a model's weights: its parameter count and the sum of each
    parameter tensor, enough to tell two checkpoints of one architecture apart."""
    with torch.inference_mode():  # summed on the CPU, so the digest is the same on any device
        sums = [float(p.detach().to("cpu", torch.float64).sum()) for p in model.parameters()]
    count = sum(p.numel() for p in model.parameters())
    return hashlib.sha256(repr((count, sums)).encode()).hexdigest()[:16]


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" picks the GPU when there is one; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise EncoderError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.") from error


@contextmanager
def _loading(name: str) -> Any:
    """Turn the many ways a model load fails into one actionable ``EncoderError``."""
    try:
        yield
    except EncoderError:
        raise
    except ImportError as error:
        raise EncoderError(
            f"loading the encoder {name!r} needs the package {error.name!r}; install it with "
            f"`pip install {error.name}`."
        ) from error
    except Exception as error:
        raise EncoderError(_load_failure(name, error)) from error


def _load_failure(name: str, error: Exception) -> str:
    kind = type(error).__name__
    text = str(error).strip().splitlines()[0] if str(error).strip() else kind
    if kind == "GatedRepoError" or "gated" in text.lower() or "401" in text:
        return (
            f"the encoder {name!r} is gated: accept its terms on its Hugging Face page, then "
            "log in with `hf auth login` (or set HF_TOKEN) and try again."
        )
    offline = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError"}
    if kind in offline or "offline" in text.lower() or "connection" in text.lower():
        return (
            f"the weights of {name!r} are not in the local Hugging Face cache and cannot be "
            "downloaded (no network, or HF_HUB_OFFLINE=1); download them once on a connected "
            "machine, or point the encoder at a local folder."
        )
    return f"cannot load the encoder {name!r}: {kind}: {text}"


def open_clip_parts(model: str, pretrained: str | None, *, name: str, device: torch.device):
    """(network, image transform, tokenizer) of an open_clip model, with every way loading
    fails turned into one actionable ``EncoderError``; shared with the fine-tuning recipe."""
    with _loading(name):
        import open_clip

        network, _, transform = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device
        )
        return network, transform, open_clip.get_tokenizer(model)


def load_open_clip(model: str, pretrained: str | None, *, name: str, device: str | None):
    """An open_clip model: ``hf-hub:org/repo``, ``local-dir:/path`` or an architecture name
    with a ``pretrained`` tag or checkpoint file (``ViT-B-32`` + ``laion2b_s34b_b79k``)."""
    target = resolve_device(device)
    network, transform, tokenizer = open_clip_parts(model, pretrained, name=name, device=target)
    network.eval()

    def text_forward(texts: Sequence[str], device: torch.device) -> torch.Tensor:
        return network.encode_text(tokenizer(texts).to(device))

    return TorchEncoder(
        name=name,
        dim=_output_dim(network.encode_image, transform, target),
        transform=transform,
        image_forward=network.encode_image,
        text_forward=text_forward,
        device=target,
        weights_digest=weights_digest(network),
        tile_size=_input_size(transform),
    )


def load_hf_clip(model: str, *, name: str, device: str | None):
    """A Hugging Face ``CLIPModel`` (for example PLIP, ``vinid/plip``) with its processor."""
    target = resolve_device(device)
    with _loading(name):
        from transformers import CLIPModel, CLIPProcessor

        network = CLIPModel.from_pretrained(model).to(target).eval()
        processor = CLIPProcessor.from_pretrained(model)

    def transform(image: Image.Image) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    def image_forward(pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(network.get_image_features(pixel_values=pixels))

    def text_forward(texts: Sequence[str], device: torch.device) -> torch.Tensor:
        tokens = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        return _pooled(network.get_text_features(**tokens.to(device)))

    return TorchEncoder(
        name=name,
        dim=network.config.projection_dim,
        transform=transform,
        image_forward=image_forward,
        text_forward=text_forward,
        device=target,
        weights_digest=weights_digest(network),
        tile_size=network.config.vision_config.image_size,
    )


def _pooled(output: Any) -> torch.Tensor:
    """``get_*_features`` return a tensor in older transformers and an output object in newer."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_timm(
    model: str,
    *,
    name: str,
    device: str | None,
    pooling: str = "default",
    **model_kwargs: Any,
):
    """A timm backbone (``hf-hub:MahmoodLab/uni``, ``local-dir:/path`` or a timm model name).

    ``pooling="cls+mean"`` concatenates the class token with the mean of the patch tokens
    after ``model_kwargs['reg_tokens']`` register tokens, as Virchow's authors do.
    """
    target = resolve_device(device)
    with _loading(name):
        import timm
        from timm.data import create_transform, resolve_data_config

        pretrained = model.startswith(("hf-hub:", "local-dir:"))
        network = timm.create_model(model, pretrained=pretrained, **model_kwargs)
        network = network.to(target).eval()
        transform = create_transform(**resolve_data_config({}, model=network))
    skip = 1 + int(model_kwargs.get("reg_tokens", 0))

    def image_forward(pixels: torch.Tensor) -> torch.Tensor:
        output = network(pixels)
        if pooling == "cls+mean":
            return torch.cat([output[:, 0], output[:, skip:].mean(1)], dim=1)
        return output

    return TorchEncoder(
        name=name,
        dim=_output_dim(image_forward, transform, target),
        transform=transform,
        image_forward=image_forward,
        device=target,
        weights_digest=weights_digest(network),
        tile_size=_input_size(transform),
    )


def _output_dim(forward: ImageForward, transform: Callable, device: torch.device) -> int:
    """Embedding size, found by running one blank tile (cheaper than parsing every config)."""
    blank = transform(Image.new("RGB", (224, 224), "white"))[None].to(device)
    with torch.inference_mode():
        output = forward(blank)
    if output.ndim != 2:
        raise EncoderError(
            f"the model returns a tensor of shape {tuple(output.shape)}, not one vector per "
            "image; configure a pooling for it."
        )
    return int(output.shape[1])


def _input_size(transform: Any) -> int:
    """The crop size the preprocessing ends with (224 when it cannot be told)."""
    for step in reversed(getattr(transform, "transforms", [])):
        size = getattr(step, "size", None)
        if size:
            return int(size if isinstance(size, int) else size[0])
    return 224
