"""What a LoRA adapter folder must hold for vLLM to serve it (``--lora-modules NAME=PATH``).

vLLM's loader reads ``adapter_config.json`` and the adapter weights, and serves only adapters
that change the language model's projection layers: an adapter that also saves whole modules
(``modules_to_save``: embeddings, ``lm_head``, a vision projector) or adapts the vision tower
is refused at startup, and a rank above ``--max-lora-rank`` likewise. Checking the folder here
turns that into a message before a GPU server is started, and lets the training recipe prove
its output loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
#: Module-name fragments of vision towers and projectors across Qwen-VL and LLaVA families.
VISION_MODULES = ("visual.", "vision_tower.", "vision_model.", "multi_modal_projector.")


def lora_layout_problems(folder: str | Path, max_rank: int | None = None) -> list[str]:
    """Why vLLM would refuse the adapter in ``folder``; empty when it would load."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"no {CONFIG_FILE}"]
    except (OSError, ValueError) as error:
        return [f"{CONFIG_FILE} is not readable JSON: {error}"]
    if not isinstance(config, dict):
        return [f"{CONFIG_FILE} does not hold an object"]
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    if not config.get("target_modules"):
        problems.append("target_modules is empty")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save is set ({config['modules_to_save']}); vLLM cannot load whole "
            "modules: merge the adapter into the model instead"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"rank r is {rank!r}")
    elif max_rank is not None and rank > max_rank:
        problems.append(f"rank {rank} is above the server's max_lora_rank {max_rank}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        # vLLM also reads PyTorch pickles; their tensor names cannot be listed without
        # unpickling, so only their presence is checked.
        if not any((folder / name).is_file() for name in PICKLED_WEIGHTS):
            problems.append(f"no {WEIGHTS_FILE} (or {' / '.join(PICKLED_WEIGHTS)})")
        return problems
    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # noqa: BLE001 - safetensors raises its own and OS errors
        return [*problems, f"{WEIGHTS_FILE} is not readable: {error}"]
    if not keys:
        problems.append(f"{WEIGHTS_FILE} holds no tensors")
    vision = sorted({key for key in keys if any(part in key for part in VISION_MODULES)})
    if vision:
        problems.append(
            f"{len(vision)} tensors adapt the vision tower or projector (e.g. {vision[0]}); "
            "vLLM serves LoRA on the language model only"
        )
    whole = [key for key in keys if "lora_" not in key]
    if whole:
        problems.append(f"{len(whole)} tensors are not LoRA weights (e.g. {whole[0]})")
    return problems
