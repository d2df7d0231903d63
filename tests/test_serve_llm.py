"""`histopilot serve-llm`: the vllm commands it plans, and how it starts and watches them.

vLLM needs a GPU, so launching is exercised with a stand-in ``vllm`` executable on PATH that
answers ``/health`` the way vLLM does; the command lines are checked against vLLM's flags.
"""

import json
import os
import shlex
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from histopilot.config import load_config
from histopilot.errors import ConfigError, HistopilotError
from histopilot.serve.vllm_launch import plan_servers, run_servers

# `vllm serve` flags histopilot may emit, from vLLM's engine and frontend arguments.
VLLM_FLAGS_WITH_VALUE = {
    "--host", "--port", "--dtype", "--max-model-len", "--gpu-memory-utilization",
    "--limit-mm-per-prompt", "--mm-processor-kwargs", "--tool-call-parser", "--chat-template",
    "--max-lora-rank", "--max-loras", "--tensor-parallel-size", "--pipeline-parallel-size",
    "--distributed-executor-backend", "--chat-template-content-format",
}  # fmt: skip
VLLM_FLAGS_WITH_VALUES = {"--served-model-name", "--lora-modules"}
VLLM_SWITCHES = {"--enable-auto-tool-choice", "--enable-lora"}


def parse_vllm_command(command: str) -> tuple[str, dict[str, list[str]]]:
    """Split ``vllm serve MODEL --flag value …`` into the model and its flags; reject unknowns."""
    words = shlex.split(command)
    assert words[:2] == ["vllm", "serve"]
    model, flags, current = words[2], {}, None
    for word in words[3:]:
        if word.startswith("--"):
            known = VLLM_FLAGS_WITH_VALUE | VLLM_FLAGS_WITH_VALUES | VLLM_SWITCHES
            assert word in known, f"not a vllm serve flag: {word}"
            current = word
            flags[word] = []
        else:
            assert current is not None, f"stray argument {word}"
            flags[current].append(word)
            if current in VLLM_FLAGS_WITH_VALUE:
                assert len(flags[current]) == 1, f"{current} takes one value"
    for switch in VLLM_SWITCHES & flags.keys():
        assert flags[switch] == []
    return model, flags


pytestmark = pytest.mark.usefixtures("isolated_config")


def make_adapter(folder: Path, **config) -> None:
    """A minimal adapter folder in the layout PEFT writes (one LoRA pair on one projection)."""
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 16, "target_modules": ["q_proj"]} | config
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    pair = {f"{prefix}.lora_A.weight": torch.zeros(16, 8)}
    pair[f"{prefix}.lora_B.weight"] = torch.zeros(8, 16)
    save_file(pair, str(folder / "adapter_model.safetensors"))


def test_gpu_profile_is_one_server_with_every_role_adapter(tmp_path):
    make_adapter(tmp_path / "adapters/describer")
    plan = plan_servers(load_config(profile="gpu"))

    (server,) = plan.servers
    model, flags = parse_vllm_command(server.shell_command())
    assert model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert flags["--host"] == ["127.0.0.1"] and flags["--port"] == ["8000"]
    assert flags["--tool-call-parser"] == ["hermes"]
    assert "--enable-auto-tool-choice" in flags
    assert Path(flags["--chat-template"][0]).is_file()
    assert json.loads(flags["--limit-mm-per-prompt"][0]) == {"image": 8, "video": 0}
    assert json.loads(flags["--mm-processor-kwargs"][0]) == {"max_pixels": 1003520}
    # The trained adapter is loaded; the others answer as the base model under their names.
    assert flags["--lora-modules"] == [
        f"histopilot-describer={(tmp_path / 'adapters/describer').resolve()}"
    ]
    assert "--enable-lora" in flags and flags["--max-loras"] == ["1"]
    assert flags["--served-model-name"] == [
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "histopilot-orchestrator",
        "histopilot-diagnoser",
        "histopilot-reporter",
        "histopilot-extractor",
    ]
    assert len(server.notes) == 4
    assert server.roles == ["orchestrator", "describer", "diagnoser", "reporter", "extractor"]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save is set"),
        ({"r": 128}, "rank 128 is above the server's max_lora_rank 64"),
    ],
)
def test_an_adapter_vllm_would_refuse_is_refused_before_a_server_starts(tmp_path, config, problem):
    make_adapter(tmp_path / "adapters/describer", **config)
    with pytest.raises(ConfigError, match=problem):
        plan_servers(load_config(profile="gpu"))


def test_an_adapter_saved_as_a_pytorch_pickle_is_served_too(tmp_path):
    make_adapter(tmp_path / "adapters/describer")
    weights = tmp_path / "adapters/describer/adapter_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    (server,) = plan_servers(load_config(profile="gpu")).servers
    assert "histopilot-describer" in server.lora_modules


def test_models_on_different_ports_get_their_own_server_and_share_the_gpu(tmp_path):
    Path("histopilot.toml").write_text(
        textwrap.dedent("""
        profile = "gpu"
        [roles.extractor]
        model = "Qwen/Qwen3-8B"
        adapter = ""
        adapter_path = ""
        base_url = "http://127.0.0.1:8001/v1"
        [vllm]
        pipeline_parallel_size = 2
        tensor_parallel_size = 4
        """)
    )
    plan = plan_servers(load_config())
    assert [server.port for server in plan.servers] == [8000, 8001]
    vlm, text = (parse_vllm_command(server.shell_command())[1] for server in plan.servers)
    assert vlm["--gpu-memory-utilization"] == text["--gpu-memory-utilization"] == ["0.45"]
    assert "--limit-mm-per-prompt" not in text and "--chat-template" not in text
    assert text["--served-model-name"] == ["Qwen/Qwen3-8B"]
    assert vlm["--tensor-parallel-size"] == ["4"] and vlm["--pipeline-parallel-size"] == ["2"]
    assert vlm["--distributed-executor-backend"] == ["ray"]


def test_remote_roles_are_left_to_their_machine():
    env = {"HISTOPILOT_ROLES__DIAGNOSER__BASE_URL": "http://gpu-node-7:8000/v1"}
    plan = plan_servers(load_config(profile="gpu", environ=env), this_host="workstation")
    assert plan.remote == {"diagnoser": "http://gpu-node-7:8000/v1"}
    assert "diagnoser" not in plan.servers[0].roles
    # On gpu-node-7 itself, the same configuration serves the diagnoser.
    there = plan_servers(load_config(profile="gpu", environ=env), this_host="gpu-node-7")
    assert any(server.roles == ["diagnoser"] for server in there.servers)


def test_localhost_and_loopback_address_are_one_server():
    env = {"HISTOPILOT_ROLES__DIAGNOSER__BASE_URL": "http://localhost:8000/v1"}
    (server,) = plan_servers(load_config(profile="gpu", environ=env)).servers
    assert "diagnoser" in server.roles and server.health_url == "http://127.0.0.1:8000/health"


def test_base_url_without_a_usable_port_is_explained():
    env = {"HISTOPILOT_ROLES__DIAGNOSER__BASE_URL": "http://127.0.0.1:99999/v1"}
    with pytest.raises(ConfigError, match=r"roles\.diagnoser\.base_url must name a host and port"):
        plan_servers(load_config(profile="gpu", environ=env))


def test_two_models_on_one_port_is_a_configuration_error():
    env = {"HISTOPILOT_ROLES__EXTRACTOR__MODEL": "Qwen/Qwen3-8B"}
    with pytest.raises(ConfigError, match="name different models .*own port"):
        plan_servers(load_config(profile="gpu", environ=env))


def fake_vllm(folder: Path, behaviour: str) -> None:
    """A ``vllm`` on PATH: 'healthy' serves /health on --port, 'crash' exits at once."""
    script = folder / "vllm"
    script.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(f"""
        import http.server, os, sys
        if {behaviour!r} == "crash":
            sys.exit(3)
        port = int(sys.argv[sys.argv.index("--port") + 1])
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                ok = self.path == "/health" and os.environ.get("VLLM_API_KEY") == "k3y"
                self.send_response(200 if ok else 500)
                self.end_headers()
            def log_message(self, *args):
                pass
        server = http.server.HTTPServer(("127.0.0.1", port), Health)
        server.timeout = 0.2
        for _ in range(15):
            server.handle_request()
        """)
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def free_port_profile() -> dict[str, str]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"HISTOPILOT_ROLES__DESCRIBER__BACKEND": "openai",
            "HISTOPILOT_ROLES__DESCRIBER__MODEL": "Qwen/Qwen2.5-VL-7B-Instruct",
            "HISTOPILOT_ROLES__DESCRIBER__BASE_URL": f"http://127.0.0.1:{port}/v1"}  # fmt: skip


def test_launch_waits_for_health_then_watches_the_server(tmp_path, monkeypatch):
    fake_vllm(tmp_path, "healthy")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    plan = plan_servers(load_config(environ=free_port_profile()))
    ready = []
    code = run_servers(
        plan.servers, startup_timeout_s=20, api_key="k3y", on_ready=ready.append, poll_s=0.1
    )
    assert [server.roles for server in ready] == [["describer"]]
    assert code == 0  # the stand-in exits cleanly after a few requests


def test_server_that_dies_during_startup_is_reported(tmp_path, monkeypatch):
    fake_vllm(tmp_path, "crash")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    plan = plan_servers(load_config(environ=free_port_profile()))
    with pytest.raises(HistopilotError, match="exited with code 3 before it was ready"):
        run_servers(plan.servers, startup_timeout_s=20, poll_s=0.1)


def test_missing_vllm_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    plan = plan_servers(load_config(environ=free_port_profile()))
    with pytest.raises(HistopilotError, match=r"pip install 'histopilot\[gpu\]'"):
        run_servers(plan.servers, startup_timeout_s=1)


def test_nothing_to_serve_is_explained():
    with pytest.raises(ConfigError, match="nothing to serve"):
        run_servers(plan_servers(load_config()).servers, startup_timeout_s=1)
