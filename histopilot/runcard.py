"""What a run card records so that a result can be reproduced: the data's hash and the
versions of the libraries that produced it.

Training recipes (``finetune``) and evaluations (``eval``) both write ``run.json``; they share
these two pieces so that two cards can be compared field by field.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from histopilot import __version__

RUN_CARD = "run.json"
#: Libraries whose versions decide whether a run can be reproduced.
LIBRARIES = (
    "numpy",
    "scipy",
    "pillow",
    "opencv-python-headless",
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "open_clip_torch",
    "diffusers",
    "bitsandbytes",
    "langgraph",
    "faiss-cpu",
    "scikit-learn",
    "torchmetrics",
    "torch-fidelity",
    "pycocoevalcap",
    "openslide-python",
    "openslide-bin",
    "vllm",
)


def file_digest(paths: Iterable[Path], digest: Any | None = None) -> str:
    """SHA-256 over the bytes of ``paths``, each distinct file once in the order first given:
    the run card's data hash."""
    digest = digest or hashlib.sha256()
    for path in dict.fromkeys(paths):
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """histopilot, Python and the installed libraries of :data:`LIBRARIES`."""
    found = {"histopilot": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
