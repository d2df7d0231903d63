"""Encoders by name: the offline default, presets for the field's models, and model-id schemes.

Names a user can give (``--encoder``, ``[encoders] patch`` in the config):

- ``offline``: hand-crafted features, no weights (the default);
- a preset: ``quiltnet-b-32``, ``quiltnet-b-16``, ``plip``, ``uni``, ``uni2-h``, ``virchow2``,
  ``h-optimus-0`` (loading calls as their authors publish them);
- ``open_clip:MODEL[@PRETRAINED]``: any open_clip model, e.g. ``open_clip:hf-hub:org/repo``,
  ``open_clip:local-dir:/models/quilt`` or ``open_clip:ViT-B-32@laion2b_s34b_b79k``
  (a bare ``hf-hub:org/repo`` means the same as ``open_clip:hf-hub:org/repo``);
- ``hf-clip:ID_OR_PATH``: a Hugging Face ``CLIPModel``;
- ``timm:MODEL``: a timm backbone, e.g. ``timm:hf-hub:org/repo`` or ``timm:local-dir:/path``.

The name is stored with every index and feature cache, so the same encoder embeds queries.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial

from histopilot.errors import EncoderError
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.encoders.offline import OfflineEncoder

Loader = Callable[..., PatchEncoder]


def _neural(loader: str) -> Loader:
    """A loader of :mod:`histopilot.retrieval.encoders.neural`, imported when first called:
    PyTorch and the model libraries load only for neural encoders, never for ``offline``."""

    def load(*args, **kwargs) -> PatchEncoder:
        from histopilot.retrieval.encoders import neural

        return getattr(neural, loader)(*args, **kwargs)

    return load


load_open_clip = _neural("load_open_clip")
load_hf_clip = _neural("load_hf_clip")
load_timm = _neural("load_timm")

_UNI2_H = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 24,
    "num_heads": 24,
    "init_values": 1e-5,
    "embed_dim": 1536,
    "mlp_ratio": 2.66667 * 2,
    "num_classes": 0,
    "no_embed_class": True,
    "reg_tokens": 8,
    "dynamic_img_size": True,
}


def _swiglu_kwargs() -> dict:
    import torch
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


#: Preset name -> (description, loader taking ``name`` and ``device``).
PRESETS: dict[str, tuple[str, Loader]] = {
    "quiltnet-b-32": (
        "QuiltNet-B-32 (open_clip, MIT, image + text, 512-d)",
        partial(load_open_clip, "hf-hub:wisdomik/QuiltNet-B-32", None),
    ),
    "quiltnet-b-16": (
        "QuiltNet-B-16 (open_clip, MIT, image + text, 512-d)",
        partial(load_open_clip, "hf-hub:wisdomik/QuiltNet-B-16", None),
    ),
    "plip": ("PLIP (Hugging Face CLIP, image + text, 512-d)", partial(load_hf_clip, "vinid/plip")),
    "uni": (
        "UNI ViT-L/16 (timm, gated, CC-BY-NC-ND, 1024-d)",
        partial(
            load_timm,
            "hf-hub:MahmoodLab/uni",
            init_values=1e-5,
            dynamic_img_size=True,
            num_classes=0,
        ),
    ),
    "uni2-h": (
        "UNI2-h ViT-H/14 (timm, gated, CC-BY-NC-ND, 1536-d)",
        lambda *, name, device: load_timm(
            "hf-hub:MahmoodLab/UNI2-h", name=name, device=device, **_UNI2_H, **_swiglu_kwargs()
        ),
    ),
    "virchow2": (
        "Virchow2 ViT-H/14 (timm, gated, CC-BY-NC-ND, 2560-d: class token + mean patch token)",
        lambda *, name, device: load_timm(
            "hf-hub:paige-ai/Virchow2",
            name=name,
            device=device,
            pooling="cls+mean",
            reg_tokens=4,
            **_swiglu_kwargs(),
        ),
    ),
    "h-optimus-0": (
        "H-optimus-0 ViT-g/14 (timm, Apache-2.0, 1536-d)",
        partial(
            load_timm,
            "hf-hub:bioptimus/H-optimus-0",
            init_values=1e-5,
            num_classes=0,
            dynamic_img_size=False,
        ),
    ),
}


def available_encoders() -> dict[str, str]:
    """Names accepted by ``load_encoder`` without a scheme, with what each one is."""
    return {"offline": "hand-crafted stain, texture and nuclear features (no weights)"} | {
        name: description for name, (description, _) in PRESETS.items()
    }


def load_encoder(name: str, *, device: str | None = None) -> PatchEncoder:
    """The encoder called ``name`` (see the module docstring), loaded once per process."""
    return _load(name.strip(), device)


@cache
def _load(name: str, device: str | None) -> PatchEncoder:
    if name == "offline":
        return OfflineEncoder()
    if name in PRESETS:
        return PRESETS[name][1](name=name, device=device)
    scheme, _, model = name.partition(":")
    if scheme == "hf-hub":
        scheme, model = "open_clip", name
    if not model:
        scheme = ""
    if scheme == "open_clip":
        architecture, _, pretrained = model.partition("@")
        return load_open_clip(architecture, pretrained or None, name=name, device=device)
    if scheme == "hf-clip":
        return load_hf_clip(model, name=name, device=device)
    if scheme == "timm":
        return load_timm(model, name=name, device=device, num_classes=0)
    known = ", ".join(available_encoders())
    raise EncoderError(
        f"unknown encoder {name!r}; use one of {known}, or a model id with a scheme: "
        "'open_clip:…', 'hf-clip:…', 'timm:…' (or a bare 'hf-hub:org/repo' for open_clip)."
    )
