"""`histopilot serve-llm`: start the vLLM servers that a configuration's ``openai`` roles use.

Roles that name the same model at the same address share one ``vllm serve`` process, each
through its own LoRA adapter (``--lora-modules``), so five roles cost one copy of the weights.
An adapter whose folder does not exist yet is served as the base model under the adapter's name
(``--served-model-name`` takes several names), so a role works before anyone has trained it.
Roles whose ``base_url`` points at another machine are left to that machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, Field

from histopilot.config import ROLE_NAMES, HistopilotConfig, RoleConfig
from histopilot.errors import ConfigError, HistopilotError
from histopilot.serve.families import family_of
from histopilot.serve.lora import CONFIG_FILE as ADAPTER_CONFIG
from histopilot.serve.lora import lora_layout_problems

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
LOCAL_HOSTS = LOOPBACK_HOSTS | {"0.0.0.0", "::"}


class VLLMServer(BaseModel):
    """One ``vllm serve`` process: what it serves, for which roles, and its command line."""

    model: str
    host: str
    port: int
    roles: list[str]
    served_names: list[str] = Field(description="The base model's name and any aliases.")
    lora_modules: dict[str, str] = Field(description="Adapter name → adapter folder.")
    command: list[str]
    notes: list[str] = Field(default_factory=list)

    @property
    def health_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/health"

    def shell_command(self) -> str:
        return shlex.join(self.command)


class LaunchPlan(BaseModel):
    servers: list[VLLMServer]
    remote: dict[str, str] = Field(
        default_factory=dict, description="Role → base_url served by another machine."
    )


def plan_servers(config: HistopilotConfig, *, this_host: str | None = None) -> LaunchPlan:
    """Group the ``openai`` roles into the vLLM servers this machine should run."""
    local_names = LOCAL_HOSTS | _own_host_names(this_host)
    groups: dict[tuple[str, int], list[tuple[str, RoleConfig]]] = {}
    remote: dict[str, str] = {}
    for role in ROLE_NAMES:
        settings = config.roles[role]
        if settings.backend != "openai":
            continue
        address = urlsplit(settings.base_url or "")
        try:
            port = address.port
        except ValueError:
            port = None
        if not address.hostname or not port:
            raise ConfigError(
                f"roles.{role}.base_url must name a host and port to serve it here, e.g. "
                f"http://127.0.0.1:8000/v1 (got {settings.base_url!r})"
            )
        if address.hostname not in local_names:
            remote[role] = settings.base_url or ""
            continue
        # localhost and 127.0.0.1 are one address: roles on either share one server.
        host = "127.0.0.1" if address.hostname in LOOPBACK_HOSTS else address.hostname
        groups.setdefault((host, port), []).append((role, settings))
    # Rounded down, so the shares of servers on one GPU never add up to more than asked.
    share = math.floor(100 * config.vllm.gpu_memory_utilization / max(len(groups), 1)) / 100
    servers = [
        _server_for(host, port, members, config, share)
        for (host, port), members in sorted(groups.items())
    ]
    return LaunchPlan(servers=servers, remote=remote)


def _own_host_names(this_host: str | None) -> set[str]:
    if this_host is not None:
        return {this_host}
    return {socket.gethostname()}


def _server_for(
    host: str,
    port: int,
    members: list[tuple[str, RoleConfig]],
    config: HistopilotConfig,
    memory_share: float,
) -> VLLMServer:
    models = {settings.model for _, settings in members}
    if len(models) > 1:
        listed = ", ".join(f"{role}={settings.model}" for role, settings in members)
        raise ConfigError(
            f"roles at {host}:{port} name different models ({listed}); one vLLM server serves "
            "one base model: give each model its own port in base_url"
        )
    model = models.pop() or ""
    family = family_of(model)
    vllm = config.vllm
    notes: list[str] = []
    served_names = [model]
    lora_modules: dict[str, str] = {}
    for role, settings in members:
        if not settings.adapter:
            continue
        path = Path(settings.adapter_path or "").expanduser()
        if settings.adapter_path and (path / ADAPTER_CONFIG).is_file():
            problems = lora_layout_problems(path, config.vllm.max_lora_rank)
            if problems:
                raise ConfigError(
                    f"roles.{role}.adapter_path {path}: vLLM cannot serve this adapter: "
                    + "; ".join(problems)
                )
            lora_modules[settings.adapter] = str(path.resolve())
        elif settings.adapter not in served_names:
            served_names.append(settings.adapter)
            notes.append(
                f"role {role}: no adapter at {settings.adapter_path or '(unset)'}; the base "
                f"model answers as '{settings.adapter}' until one is trained"
            )

    command = ["vllm", "serve", model, "--host", host, "--port", str(port)]
    command += ["--served-model-name", *served_names]
    command += ["--dtype", vllm.dtype, "--max-model-len", str(vllm.max_model_len)]
    command += ["--gpu-memory-utilization", f"{memory_share:.2f}"]
    if family.vision:
        limits = {"image": vllm.max_images_per_prompt, "video": 0}
        command += ["--limit-mm-per-prompt", json.dumps(limits)]
    if family.qwen_vl_processor:
        command += ["--mm-processor-kwargs", json.dumps({"max_pixels": vllm.max_image_pixels})]
    if family.tool_call_parser:
        command += ["--enable-auto-tool-choice", "--tool-call-parser", family.tool_call_parser]
    else:
        notes.append(
            f"no tool-call parser known for {model}; agents that call tools need one "
            "(add --tool-call-parser to vllm.extra_args)"
        )
    template = family.tools_template_path()
    if template is not None:
        # The template walks content parts through a macro; say so rather than let vLLM guess.
        command += ["--chat-template", str(template), "--chat-template-content-format", "openai"]
    if lora_modules:
        command += ["--enable-lora", "--max-lora-rank", str(vllm.max_lora_rank)]
        command += ["--max-loras", str(len(lora_modules))]
        command += ["--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
    if vllm.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(vllm.tensor_parallel_size)]
    if vllm.pipeline_parallel_size > 1:
        command += ["--pipeline-parallel-size", str(vllm.pipeline_parallel_size)]
    backend = vllm.distributed_executor_backend or (
        "ray" if vllm.pipeline_parallel_size > 1 else None
    )
    if backend:
        command += ["--distributed-executor-backend", backend]
    command += vllm.extra_args
    return VLLMServer(
        model=model,
        host=host,
        port=port,
        roles=[role for role, _ in members],
        served_names=served_names,
        lora_modules=lora_modules,
        command=command,
        notes=notes,
    )


def vllm_executable() -> str:
    """The ``vllm`` command, or a clear error saying how to install it."""
    found = shutil.which("vllm")
    if found is None:
        raise HistopilotError(
            "vLLM is not installed (no `vllm` command on PATH): install it on the GPU machine "
            "with `pip install 'histopilot[gpu]'`, or use --dry-run to print the commands"
        )
    return found


def run_servers(
    servers: Sequence[VLLMServer],
    *,
    startup_timeout_s: float,
    api_key: str | None = None,
    on_ready: Callable[[VLLMServer], None] = lambda server: None,
    poll_s: float = 1.0,
) -> int:
    """Start every server, wait for each ``/health``, then run until one exits or Ctrl-C.

    The API key goes through ``VLLM_API_KEY`` in the environment, never the command line where
    other users could read it. Returns the exit code of the first server to stop.
    """
    if not servers:
        raise ConfigError(
            "no role uses the 'openai' backend on this machine, so there is nothing to serve; "
            "try --profile gpu or set a role's backend = 'openai'"
        )
    executable = vllm_executable()
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    processes: list[subprocess.Popen] = []
    try:
        # One at a time: servers sharing a GPU must not measure free memory while another loads.
        for server in servers:
            process = subprocess.Popen([executable, *server.command[1:]], env=env)
            processes.append(process)
            _wait_healthy(server, process, startup_timeout_s, poll_s)
            on_ready(server)
        while True:
            for process in processes:
                code = process.poll()
                if code is not None:
                    return code
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(processes)


def _wait_healthy(
    server: VLLMServer, process: subprocess.Popen, timeout_s: float, poll_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise HistopilotError(
                f"vLLM for {server.model} exited with code {code} before it was ready; its "
                "log above says why (out of GPU memory: lower vllm.gpu_memory_utilization or "
                "vllm.max_model_len)"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.health_url, timeout=poll_s).status_code == 200:
                return
        time.sleep(poll_s)
    raise HistopilotError(
        f"vLLM for {server.model} did not answer {server.health_url} within {timeout_s:.0f} s "
        "(raise vllm.startup_timeout_s for large models or slow downloads)"
    )


def _stop(processes: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
