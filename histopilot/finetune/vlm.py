"""LoRA supervised fine-tuning of a vision-language model (``histopilot finetune vlm``).

The describer decides how good an analysis is, so this recipe adapts it to a lab's images and
wording. TRL's ``SFTTrainer`` trains PEFT LoRA weights on the language model's projections
only: the vision tower and projector stay frozen and nothing is saved whole
(``modules_to_save``), because that is the adapter vLLM can serve beside other roles' adapters
on one copy of the base weights. QLoRA (4-bit NF4 base, bitsandbytes) is the option for small
GPUs; gradient checkpointing is on by default. Each answer of a conversation is one training
example with everything before it as the prompt, so the loss is on answers alone.

Outputs in the recipe's ``out`` folder: ``adapter/`` (checked against vLLM's LoRA rules),
``merged/`` when asked, ``checkpoints/`` (resumed on rerun), ``skipped.json`` and ``run.json``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import Field, field_validator
from transformers import PrinterCallback, TrainerCallback

from histopilot.config import ROLE_NAMES, VLLMConfig
from histopilot.errors import FinetuneError, TrainingDataError
from histopilot.finetune.conversations import Conversation, read_conversations
from histopilot.finetune.memory import (
    MemoryEstimate,
    block_activation_bytes,
    estimate,
    logits_bytes,
    lora_parameters,
    quantizable_linears,
    weight_bytes,
)
from histopilot.finetune.recipe import (
    Announce,
    Progress,
    Recipe,
    RunResult,
    Strict,
    held_out,
    loss_summary,
    write_run_card,
)
from histopilot.retrieval.encoders.neural import resolve_device
from histopilot.runcard import file_digest
from histopilot.serve.lora import CONFIG_FILE as ADAPTER_CONFIG
from histopilot.serve.lora import VISION_MODULES, lora_layout_problems
from histopilot.storage import atomic_directory

#: The seven projections of every decoder layer of the language model, and nothing else.
LANGUAGE_MODEL_PROJECTIONS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
#: Modules QLoRA leaves in 16 bits (patterns matched from the start of a module's name): the
#: vision tower and projector, whose quantisation costs more quality than it saves memory, and
#: the output layer.
KEEP_UNQUANTIZED = [f".*{name.rstrip('.')}" for name in VISION_MODULES] + ["lm_head"]
FINGERPRINT_FILE = "fingerprint.txt"
#: Ranks ``vllm serve --max-lora-rank`` accepts, and what serve-llm passes unless told.
VLLM_LORA_RANKS = get_args(VLLMConfig.model_fields["max_lora_rank"].annotation)
DEFAULT_LORA_RANK_LIMIT = VLLMConfig.model_fields["max_lora_rank"].default
#: Text tokens assumed per example when estimating memory (question, answer, template).
TEXT_TOKENS = 512


class LoraSpec(Strict):
    r: int = Field(16, ge=1, le=512, description="Rank; vLLM serves ranks up to max_lora_rank")
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str = Field(
        LANGUAGE_MODEL_PROJECTIONS, description="Regex of module names (language model only)"
    )
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a regular expression: {error}") from error
        return value


class VLMData(Strict):
    train: Path = Field(description="Conversation dataset (folder or conversations.jsonl)")
    eval: Path | None = Field(None, description="Held-out dataset; default: split from train")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of train held out")


class VLMTrain(Strict):
    steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(8, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    warmup: float = Field(0.03, ge=0, lt=1, description="Share of steps warming up")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    gradient_checkpointing: bool = True
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    save_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")


class VLMRecipe(Recipe):
    """A LoRA SFT run: base model, data, adapter shape and schedule."""

    local_or_hub = ("model",)
    model: str = Field("Qwen/Qwen2.5-VL-7B-Instruct", description="Hub id or local folder")
    data: VLMData
    lora: LoraSpec = LoraSpec()
    quantization: Literal["none", "4bit"] = Field("none", description="4bit: QLoRA (CUDA)")
    max_image_pixels: int | None = Field(
        401_408, gt=0, description="Qwen-VL image size cap (pixels; 28×28 per token)"
    )
    max_length: int | None = Field(None, gt=0, description="Token cap (None: never cut images)")
    merge: bool = Field(False, description="Also write the base model with the adapter merged")
    adapter_dir: Path | None = Field(
        None, description="Where the adapter goes (default: out/adapter); the gpu profile "
        "reads adapters/<role>",
    )  # fmt: skip
    role: str = Field("describer", description="Agent role the adapter is for")
    adapter_name: str = Field("histopilot-describer", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    train: VLMTrain = VLMTrain()

    @property
    def adapter_folder(self) -> Path:
        return self.adapter_dir or self.out / "adapter"

    def output_folders(self) -> dict[Path, tuple[str, str]]:
        folders = {self.adapter_folder: ("adapter", ADAPTER_CONFIG)}
        if self.merge:
            folders[self.out / "merged"] = ("merged model", "config.json")
        return folders

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        if value not in ROLE_NAMES:
            raise ValueError(f"role must be one of {', '.join(ROLE_NAMES)}")
        return value


class VLMResult(RunResult):
    adapter: Path
    merged: Path | None
    steps: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    serve_config: str = Field(description="The histopilot.toml lines that serve the adapter")


def train_vlm(
    recipe: VLMRecipe,
    *,
    resume: bool = True,
    on_progress: Progress | None = None,
    announce: Announce | None = None,
) -> VLMResult:
    """Train the recipe's adapter (continuing from its last checkpoint when ``resume``)."""
    from trl import SFTConfig, SFTTrainer  # imported late: TRL takes seconds to import

    started = time.perf_counter()
    recipe.check_outputs()
    device = _device(recipe.train.device)
    if announce:
        memory = expected_memory(recipe)
        announce(memory.line() if memory else "expected memory: unknown (no model config here)")
    if recipe.quantization == "4bit" and device.type != "cuda":
        raise FinetuneError(
            "QLoRA (quantization: 4bit) needs a CUDA GPU and bitsandbytes; use "
            "quantization: none on this machine"
        )
    train_set, eval_set, report, data_sha = load_datasets(recipe)
    report.write(recipe.out)
    checkpoints = recipe.out / "checkpoints"
    latest = _guard_checkpoints(checkpoints, _fingerprint(recipe, data_sha), resume)

    processor = load_processor(recipe)
    model = _load_model(recipe, device)
    config = SFTConfig(**_trainer_arguments(recipe, device, checkpoints, eval_set is not None))
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=processor,
        peft_config=lora_config(recipe.lora),
        callbacks=[_ProgressCallback(on_progress)] if on_progress else None,
    )
    if on_progress:  # the caller shows progress; the trainer would print every log line too
        trainer.remove_callback(PrinterCallback)
    _require_language_model_only(trainer.model)
    eval_before = _evaluate(trainer) if eval_set is not None else {}
    trainer.train(resume_from_checkpoint=str(latest) if latest else None)
    eval_after = _evaluate(trainer) if eval_set is not None else {}

    adapter = recipe.adapter_folder
    with atomic_directory(adapter) as building:
        trainer.save_model(str(building))
        _name_base_model(building, recipe.model)
    problems = lora_layout_problems(adapter, max_rank=None)
    if problems:
        raise FinetuneError(f"the trained adapter would not load in vLLM: {'; '.join(problems)}")
    merged = merge_adapter(recipe, adapter, processor, device) if recipe.merge else None
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    serve_config = serve_snippet(recipe, adapter)
    card = write_run_card(
        recipe,
        data={
            "sha256": data_sha,
            "conversations": report.kept,
            "skipped": len(report.skipped),
            "train_examples": len(train_set),
            "eval_examples": len(eval_set) if eval_set is not None else 0,
        },
        metrics={"steps": trainer.state.global_step, **loss_summary(losses)}
        | {"eval_before": eval_before, "eval_after": eval_after},
        started=started,
        extra={
            "outputs": {"adapter": str(adapter), "merged": str(merged) if merged else None},
            "trainable_parameters": sum(
                p.numel() for p in trainer.model.parameters() if p.requires_grad
            ),
            "device": str(device),
        },
    )
    return VLMResult(
        adapter=adapter,
        merged=merged,
        run_card=card,
        steps=trainer.state.global_step,
        losses=losses,
        eval_before=eval_before,
        eval_after=eval_after,
        skipped=len(report.skipped),
        serve_config=serve_config,
    )


# -- data ---------------------------------------------------------------------------------------
def load_datasets(recipe: VLMRecipe):
    """(train, eval or None, report of skipped records, data hash) as ``datasets.Dataset``."""
    conversations, report, root = read_conversations(recipe.data.train)
    if not conversations:
        raise TrainingDataError(f"nothing to train on in {recipe.data.train}: {report.summary()}")
    files = [Path(report.source)] + [root / p for c in conversations for p in c.images]
    if recipe.data.eval is not None:
        held, eval_report, eval_root = read_conversations(recipe.data.eval)
        report.skipped += eval_report.skipped
        evaluation = (held, eval_root)
        files += [Path(eval_report.source)] + [eval_root / p for c in held for p in c.images]
    else:
        conversations, held = split(conversations, recipe.data.eval_fraction, recipe.train.seed)
        evaluation = (held, root)
    data_sha = file_digest(files)
    train_set = to_dataset(conversations, root)
    eval_set = to_dataset(*evaluation) if evaluation[0] else None
    return train_set, eval_set, report, data_sha


def split(
    conversations: list[Conversation], fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out whole images: every conversation about an image lands on the same side (a VQA
    table asks several questions of one image; none of them may be studied for the test)."""
    groups: dict[tuple[str, ...], list[Conversation]] = {}
    for conversation in conversations:
        key = tuple(conversation.images) or (conversation.id,)
        groups.setdefault(key, []).append(conversation)
    if fraction == 0 or len(groups) < 2:
        return conversations, []
    held = set(held_out(list(groups), fraction, random.Random(seed)))
    return (
        [c for key in groups if key not in held for c in groups[key]],
        [c for key in groups if key in held for c in groups[key]],
    )


def to_dataset(conversations: list[Conversation], root: Path):
    """Prompt-completion rows with image paths, decoded to RGB lazily as TRL reads them."""
    from datasets import Dataset, Image, List

    rows: dict[str, list[Any]] = {"images": [], "prompt": [], "completion": []}
    for conversation in conversations:
        paths = [str((root / image).resolve()) for image in conversation.images]
        for prompt, completion, shown in conversation.examples():
            rows["images"].append(paths[:shown])
            rows["prompt"].append([_message(m) for m in prompt])
            rows["completion"].append([_message(completion)])
    return Dataset.from_dict(rows).cast_column("images", List(Image(mode="RGB")))


def _message(message) -> dict:
    return message.model_dump(exclude_none=True)


# -- model --------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("train.device asks for CUDA but no GPU is visible; use auto or cpu")
    return device


def _dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def load_processor(recipe: VLMRecipe):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(recipe.model)
    except (OSError, ValueError) as error:
        raise FinetuneError(_unavailable(recipe.model, error)) from error
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    if recipe.max_image_pixels and size is not None and getattr(size, "longest_edge", None):
        # Qwen-VL processors count pixels in ``longest_edge``; other families have fixed sizes.
        size["longest_edge"] = max(recipe.max_image_pixels, size.shortest_edge or 0)
    return processor


def _load_model(recipe: VLMRecipe, device: torch.device):
    from transformers import AutoModelForImageTextToText

    options: dict[str, Any] = {"dtype": _dtype(device)}
    if recipe.quantization == "4bit":
        # TRL prepares a quantised model itself (input gradients, bf16 adapters); PEFT's
        # prepare_model_for_kbit_training would also upcast every unquantised weight to fp32.
        options["quantization_config"] = _nf4_config(_dtype(device))
        options["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForImageTextToText.from_pretrained(recipe.model, **options)
    except (OSError, ValueError) as error:
        raise FinetuneError(_unavailable(recipe.model, error)) from error
    return model if recipe.quantization == "4bit" else model.to(device)


def _nf4_config(compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise FinetuneError("QLoRA needs bitsandbytes: pip install 'histopilot[gpu]'") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=KEEP_UNQUANTIZED,
    )


def _unavailable(model: str, error: Exception) -> str:
    return (
        f"cannot load {model}: {error}. Name a local model folder, or download the model once "
        "on a connected machine (`hf download MODEL`)"
    )


def lora_config(spec: LoraSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        use_rslora=spec.use_rslora,
        task_type="CAUSAL_LM",
    )


def _require_language_model_only(model) -> None:
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise FinetuneError(
            "lora.target_modules matched no layer of this model; the default matches the "
            "language model's q/k/v/o and gate/up/down projections"
        )
    vision = [name for name in trainable if any(part in name for part in VISION_MODULES)]
    if vision:
        raise FinetuneError(
            f"lora.target_modules reaches the vision tower ({vision[0]}); vLLM serves LoRA on "
            "the language model only: narrow the pattern"
        )


def _trainer_arguments(
    recipe: VLMRecipe, device: torch.device, output: Path, evaluate: bool
) -> dict[str, Any]:
    train = recipe.train
    dtype = _dtype(device)
    return {
        "output_dir": str(output),
        "max_length": recipe.max_length,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": train.scheduler,
        "warmup_steps": train.warmup,
        "weight_decay": train.weight_decay,
        "max_steps": train.steps or -1,
        "num_train_epochs": train.epochs,
        **_checkpointing(train.gradient_checkpointing),
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "use_cpu": device.type == "cpu",
        "logging_steps": min(train.log_every, train.steps or train.log_every),
        "logging_first_step": True,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": train.eval_every,
        "save_strategy": "steps",
        "save_steps": train.save_every,
        "save_total_limit": train.keep_checkpoints,
        "seed": train.seed,
        "data_seed": train.seed,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def _checkpointing(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing under the name this transformers version uses (renamed in 5.x)."""
    from transformers import TrainingArguments

    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def _evaluate(trainer) -> dict[str, float]:
    metrics = trainer.evaluate()
    return {
        key.removeprefix("eval_"): round(float(value), 5)
        for key, value in metrics.items()
        if key in ("eval_loss", "eval_mean_token_accuracy")
    }


class _ProgressCallback(TrainerCallback):
    """Hands the trainer's log lines to the caller (the CLI's progress bar)."""

    def __init__(self, on_progress: Progress) -> None:
        self.on_progress = on_progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # training steps; evaluations log eval_loss instead
            self.on_progress(state.global_step, state.max_steps, float(logs["loss"]))


# -- checkpoints, outputs -----------------------------------------------------------------------
def _fingerprint(recipe: VLMRecipe, data_sha: str) -> str:
    """What a checkpoint must match to be continued: the data and its split, the model, the
    adapter's shape, the image size and the batch geometry the trainer's step count assumes."""
    fields = {
        "model": True,
        "lora": True,
        "quantization": True,
        "max_image_pixels": True,
        "max_length": True,
        "data": True,
        "train": {"seed", "batch_size", "gradient_accumulation", "scheduler"},
    }
    return f"{data_sha}:{recipe.model_dump_json(include=fields)}"


def _guard_checkpoints(folder: Path, fingerprint: str, resume: bool) -> Path | None:
    """The checkpoint to continue from, after checking it belongs to this run's data and
    model; checkpoints with no record of what made them are not continued either."""
    marker = folder / FINGERPRINT_FILE
    if not resume and folder.exists():
        shutil.rmtree(folder)
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()),
        key=lambda p: int(p.name.removeprefix("checkpoint-")),
    )
    recorded = marker.read_text(encoding="utf-8") if marker.is_file() else None
    if found and recorded != fingerprint:
        raise FinetuneError(
            f"the checkpoints in {folder} come from another model, adapter shape, dataset or "
            "batch size; rerun with --restart to start over, or give another out folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint, encoding="utf-8")
    return found[-1] if found else None


def _name_base_model(adapter: Path, model: str) -> None:
    """Record the base model as the recipe named it (a hub id stays a hub id)."""
    path = adapter / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = model
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def merge_adapter(recipe: VLMRecipe, adapter: Path, processor, device: torch.device) -> Path:
    """The base model (reloaded unquantised) with the adapter folded in, for `vllm serve`."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(recipe.model, dtype=_dtype(device))
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    target = recipe.out / "merged"
    with atomic_directory(target) as building:
        merged.save_pretrained(building)
        processor.save_pretrained(building)
    return target


def serve_snippet(recipe: VLMRecipe, adapter: Path) -> str:
    """The configuration that makes `histopilot serve-llm` load the adapter for the role
    (with the rank vLLM must allow when it is above the default 64)."""
    lines = [
        f"[roles.{recipe.role}]",
        f"adapter = {json.dumps(recipe.adapter_name)}",
        f"adapter_path = {json.dumps(str(adapter.resolve()))}",
    ]
    if recipe.lora.r > DEFAULT_LORA_RANK_LIMIT:
        rank = next(r for r in VLLM_LORA_RANKS if r >= recipe.lora.r)
        lines += ["", "[vllm]", f"max_lora_rank = {rank}"]
    return "\n".join(lines) + "\n"


# -- memory -------------------------------------------------------------------------------------
def expected_memory(recipe: VLMRecipe) -> MemoryEstimate | None:
    """The estimate for the recipe's model, from its configuration alone (no weights read);
    ``None`` when the configuration is not available on this machine."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(recipe.model)
    except (OSError, ValueError):
        return None
    target = _device(recipe.train.device)
    return estimate_for_config(
        config,
        lora=recipe.lora,
        quantized=recipe.quantization == "4bit",
        batch_size=recipe.train.batch_size,
        image_pixels=recipe.max_image_pixels or VLLMConfig.model_fields["max_image_pixels"].default,
        checkpointing=recipe.train.gradient_checkpointing,
        device=str(target),
    )


def estimate_for_config(
    config,
    *,
    lora: LoraSpec,
    quantized: bool,
    batch_size: int,
    image_pixels: int,
    checkpointing: bool,
    device: str,
) -> MemoryEstimate:
    """Memory for LoRA (or QLoRA) training of the model ``config`` describes."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text = config.get_text_config()
    gpu = torch.device(device).type == "cuda"
    dtype_bytes = 2 if gpu else 4
    weights = weight_bytes(
        model,
        dtype_bytes=dtype_bytes,
        quantized=quantizable_linears(model, KEEP_UNQUANTIZED) if quantized else None,
    )
    tokens = batch_size * (image_pixels // (28 * 28) + TEXT_TOKENS)
    activations = block_activation_bytes(
        tokens=tokens,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        checkpointing=checkpointing,
        dtype_bytes=dtype_bytes,
    ) + logits_bytes(tokens=tokens, vocab=text.vocab_size, dtype_bytes=dtype_bytes)
    return estimate(
        weights=weights,
        trainable_parameters=lora_parameters(model, lora.target_modules, lora.r),
        activations=activations,
        device=device,
        # TRL keeps QLoRA adapters in bf16 (weights, gradients and AdamW state in 2 bytes each).
        trainable_bytes=8 if quantized else 16,
    )
