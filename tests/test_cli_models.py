"""`histopilot models` and `histopilot serve-llm` as a user runs them."""

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histopilot.cli import app
from histopilot.config import ROLE_NAMES

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("isolated_config")


def test_models_json_shows_every_resolved_role():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)
    assert set(config["roles"]) == set(ROLE_NAMES)
    assert {role["backend"] for role in config["roles"].values()} == {"offline"}
    assert config["sources"] == ["built-in defaults"]


def test_models_table_for_the_gpu_profile_with_an_override(monkeypatch):
    monkeypatch.setenv("HISTOPILOT_ROLES__DESCRIBER__TEMPERATURE", "0.4")
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["models", "--profile", "gpu"])
    assert result.exit_code == 0, result.output
    assert "histopilot-describer" in result.stdout
    assert "QuiltNet-B-32" in result.stdout
    assert "HISTOPILOT_ROLES__DESCRIBER__TEMPERATURE" in result.stdout


def test_config_option_reads_the_named_file(tmp_path):
    chosen = tmp_path / "lab.toml"
    chosen.write_text('[roles.extractor]\nbackend = "transformers"\nmodel = "/models/x"\n')
    result = runner.invoke(app, ["models", "--config", str(chosen), "--json"])
    assert json.loads(result.stdout)["roles"]["extractor"]["model"] == "/models/x"


def test_serve_llm_dry_run_prints_runnable_commands():
    result = runner.invoke(app, ["serve-llm", "--profile", "gpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    commands = [line for line in result.stdout.splitlines() if line.startswith("vllm serve")]
    (command,) = commands
    words = shlex.split(command)
    assert words[2] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert "--tool-call-parser" in words and "hermes" in words
    assert "# note: role describer: no adapter at adapters/describer" in result.stdout


def test_serve_llm_dry_run_json_is_the_plan():
    result = runner.invoke(app, ["serve-llm", "--profile", "gpu", "--dry-run", "--json"])
    (server,) = json.loads(result.stdout)["servers"]
    assert server["port"] == 8000 and server["command"][:2] == ["vllm", "serve"]


def test_missing_vllm_message_keeps_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm here
    result = runner.invoke(app, ["serve-llm", "--profile", "gpu"])
    assert result.exit_code == 2
    assert "pip install 'histopilot[gpu]'" in " ".join(result.stderr.split())


def test_invalid_configuration_is_one_clear_line_and_exit_2():
    Path("histopilot.toml").write_text("[roles.describer]\nbackend = 'openai'\nmodel = 'm'\n")
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 2
    assert "needs 'base_url'" in result.stderr
    assert "Traceback" not in result.output
