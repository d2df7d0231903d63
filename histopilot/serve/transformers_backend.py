"""The ``transformers`` backend: a Hugging Face model in this process, on CPU or GPU.

For a single user without a server. :class:`TransformersChatModel` is a LangChain chat model that
takes the same messages as the OpenAI backend (text, ``image_url`` parts, tool calls and tool
results), renders them with the model's chat template, generates, and turns Hermes-style
``<tool_call>{…}</tool_call>`` blocks back into LangChain tool calls. Structured output is asked
for by prompting and checked by Pydantic (:mod:`histopilot.serve.structured`).

A model is loaded once per process and shared by every role that names it; a role's LoRA
adapter is loaded into that shared model under the adapter's name and switched on for the
role's calls only.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from peft import PeftModel
from pydantic import ConfigDict

from histopilot.config import RoleConfig
from histopilot.errors import HistopilotError, ModelUnavailableError, first_line
from histopilot.serve.families import ModelFamily, family_of
from histopilot.serve.messages import decode_image_part, is_image_part
from histopilot.serve.structured import with_schema_prompting

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "histopilot_probe_tool", "description": "", "parameters": {}},
}


@dataclass
class LocalModel:
    """A loaded model with its processor (or tokenizer) and what histopilot learned about it."""

    name: str
    model: Any
    processor: Any
    family: ModelFamily
    vision: bool
    tools_template: str | None
    """Chat template to render tools with, when the model's own template drops them."""
    tools_supported: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    peft: PeftModel | None = None
    """The model wrapped by PEFT once a role has asked for an adapter."""

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @contextlib.contextmanager
    def adapter(self, name: str | None, path: str | None) -> Iterator[None]:
        """Run the body with the role's LoRA adapter on (loaded on first use), or with none.

        Hold ``lock``: adapters are state on the shared model. PEFT injects the adapter layers
        into the model in place, so ``model.generate`` runs through whichever one is active.
        """
        folder = Path(path).expanduser() if path else None
        known = self.peft is not None and name in self.peft.peft_config
        trained = folder is not None and (folder / "adapter_config.json").is_file()
        if name is not None and not known and not trained:
            # Same rule as `histopilot serve-llm`: an adapter not trained yet is the base model.
            warnings.warn(
                f"LoRA adapter '{name}' not found at {path!r}; {self.name} answers without it",
                stacklevel=4,
            )
            name = None
        if name is None:
            with self.peft.disable_adapter() if self.peft else contextlib.nullcontext():
                yield
            return
        if not known:
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, folder, adapter_name=name)
                else:
                    self.peft.load_adapter(folder, adapter_name=name)
            except (OSError, ValueError, RuntimeError, KeyError) as error:
                raise ModelUnavailableError(
                    f"cannot load LoRA adapter '{name}' from {folder} into {self.name}: "
                    f"{first_line(error)} (is it an adapter for this base model?)"
                ) from None
        self.peft.set_adapter(name)
        yield


_LOADED: dict[tuple[str, str, str], LocalModel] = {}
_LOADING = threading.Lock()


def load_local_model(name: str, *, device: str = "auto", dtype: str = "auto") -> LocalModel:
    """Load ``name`` (a local folder or a cached hub id) once per process and share it."""
    device = _resolve_device(device)
    key = (str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name,
           device, dtype)  # fmt: skip
    if key in _LOADED:  # loaded models are never replaced, so this read needs no lock
        return _LOADED[key]
    with _LOADING:
        if key not in _LOADED:
            _LOADED[key] = _load(name, device, dtype)
        return _LOADED[key]


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailableError(f"device '{device}' requested but no CUDA GPU is visible")
    return device


def _load(name: str, device: str, dtype: str) -> LocalModel:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(
            f"cannot load model '{name}': it is not a model folder and not in the local Hugging "
            f"Face cache ({first_line(error)}). Download it once with `hf download {name}`, or "
            "set the role's model to a folder holding config.json and the weights."
        ) from None
    vision = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    torch_dtype: Any = "auto" if dtype == "auto" and device != "cpu" else None
    if torch_dtype is None:
        torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    try:
        if vision:
            processor = AutoProcessor.from_pretrained(source, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                source, dtype=torch_dtype, local_files_only=True
            )
        else:
            processor = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, local_files_only=True
            )
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"cannot load model '{name}': {first_line(error)}") from None
    model.to(device).eval()
    family = family_of(name, config.model_type)
    own_template_has_tools = _template_renders_tools(processor, vision)
    tools_template = None if own_template_has_tools else family.tools_template_text()
    return LocalModel(
        name,
        model,
        processor,
        family,
        vision,
        tools_template=tools_template,
        tools_supported=own_template_has_tools or tools_template is not None,
    )


def _template_renders_tools(processor: Any, vision: bool) -> bool:
    """Whether the model's own chat template shows tools to the model (many VLM ones do not)."""
    text = "hello"
    probe = [{"role": "user", "content": [{"type": "text", "text": text}] if vision else text}]
    try:
        rendered = processor.apply_chat_template(
            probe, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True
        )
    except ValueError:
        return False
    return "histopilot_probe_tool" in rendered


class TransformersChatModel(BaseChatModel):
    """A LangChain chat model running a Hugging Face (vision-)language model in-process."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    role: str
    settings: RoleConfig

    @property
    def _llm_type(self) -> str:
        return "histopilot-transformers"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.settings.model, "adapter": self.settings.adapter}

    def local_model(self) -> LocalModel:
        return load_local_model(
            self.settings.model or "", device=self.settings.device, dtype=self.settings.dtype
        )

    def bind_tools(
        self, tools: list[Any], *, tool_choice: str | dict | None = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model; ``tool_choice`` may narrow them to one or to none."""
        return self.bind(
            tools=[convert_to_openai_tool(t) for t in tools], tool_choice=tool_choice, **kwargs
        )

    def with_structured_output(
        self, schema: Any, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[LanguageModelInput, Any]:
        """Answer as an instance of the Pydantic class ``schema`` (prompted, validated, retried)."""
        return with_schema_prompting(
            self, schema, retries=self.settings.structured_retries, include_raw=include_raw
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        local = self.local_model()
        tools = _chosen_tools(kwargs.get("tools"), kwargs.get("tool_choice"))
        inputs = self.encode_prompt(messages, tools)
        with local.lock, local.adapter(self.settings.adapter, self.settings.adapter_path):
            if self.settings.seed is not None:
                torch.manual_seed(self.settings.seed)
            with torch.inference_mode():
                output = local.model.generate(**inputs, **self._generation_kwargs(local, stop))
        prompt_tokens = inputs["input_ids"].shape[1]
        new_tokens = output[0, prompt_tokens:]
        text = local.tokenizer.decode(new_tokens, skip_special_tokens=True)
        finish_reason = "length" if len(new_tokens) >= self.settings.max_tokens else "stop"
        for marker in stop or ():
            if marker in text:
                text = text[: text.index(marker)]
                finish_reason = "stop"
        message = parse_hermes_reply(text)
        message.usage_metadata = {
            "input_tokens": prompt_tokens,
            "output_tokens": len(new_tokens),
            "total_tokens": prompt_tokens + len(new_tokens),
        }
        message.response_metadata = {
            "model_name": self.settings.request_model,
            "finish_reason": "tool_calls" if message.tool_calls else finish_reason,
        }
        return ChatResult(generations=[ChatGeneration(message=message)])

    def encode_prompt(
        self, messages: list[BaseMessage], tools: list[dict] | None = None
    ) -> dict[str, torch.Tensor]:
        """The model inputs for ``messages``: chat template applied, images processed.

        Control tokens typed into message text (``<|im_start|>`` and the like) are encoded as
        plain text, so a report or a retrieved passage cannot open a turn of its own.
        """
        local = self.local_model()
        if tools and not local.tools_supported:
            raise HistopilotError(
                f"the chat template of {local.name} cannot show tools to the model; save the "
                "model with a chat template that renders `tools`"
            )
        return local.processor.apply_chat_template(
            to_hf_chat(messages, vision=local.vision, model_name=local.name),
            tools=tools,
            # Once a conversation has tool calls, every turn needs the tool-aware template, with
            # or without tools on offer; vLLM uses it for every request too.
            chat_template=local.tools_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            sanitize_control_tokens=True,
            **local.family.chat_template_kwargs,
        ).to(local.model.device)

    def _generation_kwargs(self, local: LocalModel, stop: list[str] | None) -> dict[str, Any]:
        sampling = self.settings.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.settings.max_tokens,
            "do_sample": sampling,
            "pad_token_id": local.tokenizer.eos_token_id
            if local.tokenizer.pad_token_id is None
            else local.tokenizer.pad_token_id,
        }
        if sampling:
            kwargs.update(temperature=self.settings.temperature, top_p=self.settings.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=local.tokenizer)
        return kwargs


def to_hf_chat(
    messages: list[BaseMessage], *, vision: bool, model_name: str
) -> list[dict[str, Any]]:
    """LangChain messages as the list of dicts Hugging Face chat templates render.

    Images become ``{"type": "image", "image": PIL.Image}`` items, which the processor turns
    into pixels and placeholder tokens; text-only models get plain string contents.
    """
    chat = []
    for message in messages:
        entry: dict[str, Any] = {
            "role": _hf_role(message),
            "content": _hf_content(message, vision, model_name),
        }
        if isinstance(message, AIMessage) and message.tool_calls:
            entry["tool_calls"] = [
                {"type": "function", "function": {"name": call["name"], "arguments": call["args"]}}
                for call in message.tool_calls
            ]
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
        chat.append(entry)
    return chat


def _hf_role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool"
    raise HistopilotError(f"cannot send a {type(message).__name__} to a local model")


def _hf_content(message: BaseMessage, vision: bool, model_name: str) -> Any:
    parts = message.content if isinstance(message.content, list) else [message.content]
    items: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, str):
            items.append({"type": "text", "text": part})
        elif is_image_part(part):
            if not vision:
                raise HistopilotError(
                    f"{model_name} is a text-only model and the message holds an image; "
                    "configure a vision-language model for this role"
                )
            items.append({"type": "image", "image": decode_image_part(part)})
        elif isinstance(part, dict) and part.get("type") == "text":
            items.append({"type": "text", "text": part.get("text", "")})
    items = [item for item in items if item["type"] != "text" or item["text"]]
    if vision:
        return items
    return "".join(item["text"] for item in items)


def _chosen_tools(tools: list[dict] | None, tool_choice: Any) -> list[dict] | None:
    """The tools to show: all, none (``"none"``), or the one a named choice asks for."""
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        tool_choice = tool_choice.get("function", {}).get("name")
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "any", "required"):
        chosen = [t for t in tools if t["function"]["name"] == tool_choice]
        if not chosen:
            raise HistopilotError(
                f"tool_choice names '{tool_choice}', which is not among the tools"
            )
        return chosen
    return tools


def parse_hermes_reply(text: str) -> AIMessage:
    """Split generated text into prose and ``<tool_call>{"name": …, "arguments": …}</tool_call>``.

    A block whose JSON does not parse, or lacks a name, becomes an ``invalid_tool_call`` with the
    raw text, so agents can retry instead of acting on a guess. An unterminated block at the end
    (generation hit its token limit) is treated the same way.
    """
    calls, invalid = [], []
    for match in _TOOL_CALL.finditer(text):
        raw = match.group(1)
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        try:
            payload = json.loads(raw)
            name = payload["name"]
            args = payload.get("arguments", {})
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(name, str) or not isinstance(args, dict):
                raise TypeError("name must be a string and arguments an object")
        except (ValueError, KeyError, TypeError) as error:
            invalid.append(invalid_tool_call(name=None, args=raw, id=call_id, error=str(error)))
            continue
        calls.append(tool_call(name=name, args=args, id=call_id))
    prose = _TOOL_CALL.sub("", text).strip()
    return AIMessage(content=prose, tool_calls=calls, invalid_tool_calls=invalid)
