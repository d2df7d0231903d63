"""What every training recipe shares: a YAML file validated by Pydantic, command-line
overrides, the effective configuration printed before training, and a run card after it.

A recipe is a file path or the name of one shipped in ``histopilot/finetune/recipes``
(``histopilot finetune vlm --config qwen2.5-vl-7b``). Relative paths in a file are relative to
that file; in a shipped recipe, to the working folder. ``--set train.steps=50`` changes one
field without editing the file, with the value read as YAML; a path given that way is relative
to the working folder, as anything typed in a shell is.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from histopilot.errors import ConfigError
from histopilot.runcard import RUN_CARD, versions
from histopilot.storage import atomic_file, check_new_output_folder

_RECIPES = resources.files("histopilot.finetune") / "recipes"
T = TypeVar("T")
#: What a recipe reports as it trains: (step or epoch, of how many, the latest loss).
Progress = Callable[[int, int, float], None]
#: Where a recipe says things before it starts (its memory estimate).
Announce = Callable[[str], None]


class Strict(BaseModel):
    """A recipe section: unknown keys are typos, and a typo must not silently do nothing."""

    model_config = ConfigDict(extra="forbid")


class Recipe(Strict):
    """Base of every recipe: where its outputs go, and how it is loaded."""

    out: Path
    #: String fields naming a model by hub id *or* local folder; made absolute when local.
    local_or_hub: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def load(
        cls, source: str | Path, overrides: Iterable[str] = (), *, out: Path | None = None
    ) -> Self:
        """The recipe in ``source`` with ``--set`` style ``overrides`` and ``out`` applied."""
        path, base = _locate(source)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of recipe fields")
        typed = {_apply(raw, override) for override in overrides}
        if out is not None:
            raw["out"] = str(out)
            typed.add("out")
        try:
            recipe = cls.model_validate(raw)
        except ValidationError as error:
            raise ConfigError(f"{path}: {error}") from error
        # Paths typed on the command line are relative to where the command runs.
        return recipe.relative_to(base, typed=typed)

    def relative_to(self, base: Path, *, typed: set[str] | None = None) -> Self:
        """Paths resolved against ``base`` (those named in ``typed``, dotted, against the
        working folder); model names only where such a folder exists."""
        resolved = _resolve_paths(self, base, typed or set(), "")
        local = {}
        for name in self.local_or_hub:
            value = getattr(resolved, name)
            folder = Path.cwd() if name in (typed or ()) else base
            candidate = (folder / Path(value).expanduser()).resolve() if value else None
            if candidate is not None and candidate.exists():
                local[name] = str(candidate)
        return resolved.model_copy(update=local)

    def output_folders(self) -> dict[Path, tuple[str, str]]:
        """Folders the run replaces whole: path → (what it holds, the file that marks one)."""
        return {}

    def check_outputs(self) -> None:
        """Refuse, before any work, to replace a folder that holds something else."""
        for path, (what, marker) in self.output_folders().items():
            check_new_output_folder(path, what=what, replaceable_marker=marker)

    def effective(self) -> str:
        """The recipe as YAML after defaults and overrides: what the run will actually do."""
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False).rstrip()


class RunResult(BaseModel):
    """What every recipe run returns: where its run card is, and its loss history."""

    run_card: Path
    losses: list[float]
    skipped: int = Field(0, description="Input records left out (listed in skipped.json)")


def shipped_recipes() -> dict[str, str]:
    """Name → first line of description of every recipe shipped with histopilot."""
    found = {}
    for entry in _RECIPES.iterdir():
        if entry.name.endswith(".yaml"):
            first = entry.read_text(encoding="utf-8").splitlines()[0]
            found[entry.name.removesuffix(".yaml")] = first.lstrip("# ").strip()
    return dict(sorted(found.items()))


def _locate(source: str | Path) -> tuple[Path, Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return path, path.resolve().parent
    shipped = shipped_recipes()
    if str(source) in shipped:
        packaged = _RECIPES / f"{source}.yaml"
        return Path(str(packaged)), Path.cwd()
    raise ConfigError(
        f"no recipe file at {path}, and no shipped recipe of that name "
        f"(shipped: {', '.join(shipped) or 'none'})"
    )


def _apply(raw: dict, override: str) -> str:
    """Set ``KEY=VALUE`` in ``raw``; returns the dotted key."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set takes KEY=VALUE (e.g. train.steps=50), not {override!r}")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: {value!r} is not a YAML value: {error}") from error
    return key.strip()


def _resolve_paths(model: BaseModel, base: Path, typed: set[str], prefix: str) -> Any:
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value, key = getattr(model, name), prefix + name
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = ((Path.cwd() if key in typed else base) / value.expanduser()).resolve()
        elif isinstance(value, BaseModel):
            update[name] = _resolve_paths(value, base, typed, key + ".")
    return model.model_copy(update=update)


def held_out(keys: list[T], fraction: float, rng: random.Random) -> list[T]:
    """The keys a validation split holds out: ``round(fraction × n)`` of them drawn at random,
    at least one and never all (so both sides exist when there are two or more)."""
    keys = list(keys)
    rng.shuffle(keys)
    return keys[: min(len(keys) - 1, max(1, round(fraction * len(keys))))]


def write_run_card(
    recipe: Recipe,
    *,
    data: dict[str, Any],
    metrics: dict[str, Any],
    started: float,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``run.json`` beside the outputs: recipe, data hash, metrics, versions and wall time."""
    card = {
        "recipe": json.loads(recipe.model_dump_json()),
        "data": data,
        "metrics": metrics,
        **(extra or {}),
        "seconds": round(time.perf_counter() - started, 1),
        "versions": versions(),
    }
    path = recipe.out / RUN_CARD
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def loss_summary(losses: list[float]) -> dict[str, float | None]:
    """Mean loss over the first and last tenth of the logged losses: did it fall."""
    tenth = max(1, len(losses) // 10)
    return {
        "loss_first_tenth": sum(losses[:tenth]) / tenth if losses else None,
        "loss_last_tenth": sum(losses[-tenth:]) / tenth if losses else None,
    }
