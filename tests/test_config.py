"""Configuration: defaults, profiles, files, environment overrides and their error messages."""

from pathlib import Path

import pytest

from histopilot.config import ROLE_NAMES, available_profiles, load_config
from histopilot.errors import ConfigError

NO_ENV: dict[str, str] = {}


pytestmark = pytest.mark.usefixtures("isolated_config")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_offline_everywhere():
    config = load_config(environ=NO_ENV)
    assert config.profile == "default"
    assert all(config.roles[role].backend == "offline" for role in ROLE_NAMES)
    assert config.encoders.patch == "offline"
    assert config.sources == ["built-in defaults"]


def test_gpu_profile_serves_every_role_through_its_own_adapter():
    config = load_config(profile="gpu", environ=NO_ENV)
    adapters = set()
    for role in ROLE_NAMES:
        settings = config.roles[role]
        assert settings.backend == "openai"
        assert settings.model == "Qwen/Qwen2.5-VL-7B-Instruct"
        assert settings.base_url == "http://127.0.0.1:8000/v1"
        assert settings.request_model == settings.adapter == f"histopilot-{role}"
        adapters.add(settings.adapter)
    assert len(adapters) == len(ROLE_NAMES)
    assert config.encoders.patch == "hf-hub:wisdomik/QuiltNet-B-32"
    assert "gpu" in available_profiles()


def test_file_in_working_directory_overrides_its_profile_key_by_key():
    write(
        Path("histopilot.toml"),
        'profile = "gpu"\n[roles.describer]\ntemperature = 0.7\nbase_url = "http://gpu-node:9000/v1"\n',
    )
    config = load_config(environ=NO_ENV)
    assert config.profile == "gpu"
    describer = config.roles.describer
    assert describer.temperature == 0.7
    assert describer.base_url == "http://gpu-node:9000/v1"
    assert describer.model == "Qwen/Qwen2.5-VL-7B-Instruct"  # kept from the profile
    assert config.sources[-1].endswith("histopilot.toml")


def test_user_config_folder_is_the_fallback(tmp_path):
    write(tmp_path / "user-config/histopilot/histopilot.toml", '[encoders]\npatch = "plip"\n')
    assert load_config(environ=NO_ENV).encoders.patch == "plip"


def test_explicit_path_and_environment_variable_select_the_file(tmp_path):
    chosen = write(tmp_path / "elsewhere.toml", "[vllm]\nmax_model_len = 8192\n")
    assert load_config(chosen, environ=NO_ENV).vllm.max_model_len == 8192
    assert load_config(environ={"HISTOPILOT_CONFIG": str(chosen)}).vllm.max_model_len == 8192
    with pytest.raises(ConfigError, match="config file not found: .*missing.toml"):
        load_config(tmp_path / "missing.toml", environ=NO_ENV)


def test_command_line_profile_beats_the_file_and_the_environment():
    write(Path("histopilot.toml"), 'profile = "gpu"\n')
    assert load_config(profile="default", environ=NO_ENV).roles.describer.backend == "offline"
    env = {"HISTOPILOT_PROFILE": "default"}
    assert load_config(environ=env).roles.describer.backend == "offline"
    assert load_config(profile="gpu", environ=env).roles.describer.backend == "openai"


def test_environment_overrides_single_keys_with_typed_values():
    env = {
        "HISTOPILOT_ROLES__EXTRACTOR__BACKEND": "transformers",
        "HISTOPILOT_ROLES__EXTRACTOR__MODEL": "/models/extractor",
        "HISTOPILOT_ROLES__EXTRACTOR__TEMPERATURE": "0.3",
        "HISTOPILOT_VLLM__EXTRA_ARGS": '["--enforce-eager"]',
        "HISTOPILOT_TEST_DATA": "/data",  # not a configuration key: no "__"
    }
    config = load_config(environ=env)
    extractor = config.roles.extractor
    assert (extractor.backend, extractor.model, extractor.temperature) == (
        "transformers",
        "/models/extractor",
        0.3,
    )
    assert config.vllm.extra_args == ["--enforce-eager"]
    assert config.roles.describer.backend == "offline"
    assert "HISTOPILOT_ROLES__EXTRACTOR__MODEL" in config.sources[-1]


def test_misspelled_environment_key_is_an_error_not_silence():
    env = {"HISTOPILOT_ROLES__DESCRIBR__MODEL": "x"}
    with pytest.raises(ConfigError, match=r"roles\.describr: unknown setting"):
        load_config(environ=env)


def test_conflicting_environment_variables_are_reported():
    env = {"HISTOPILOT_ROLES__DIAGNOSER": "x", "HISTOPILOT_ROLES__DIAGNOSER__MODEL": "y"}
    with pytest.raises(ConfigError, match="HISTOPILOT_ROLES__DIAGNOSER__MODEL conflicts"):
        load_config(environ=env)


def test_invalid_toml_names_the_file_and_line():
    write(Path("histopilot.toml"), "[roles.describer\nbackend = 'openai'\n")
    with pytest.raises(ConfigError, match=r"histopilot\.toml is not valid TOML: .*line 1"):
        load_config(environ=NO_ENV)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[roles.describer]\ntemperature = 5\n", r"roles\.describer\.temperature: .*less than"),
        ("[roles.describer]\nbackend = 'vllm'\n", r"roles\.describer\.backend: .*'openai'"),
        (
            "[roles.describer]\nbackend = 'openai'\nmodel = 'm'\n",
            r"roles\.describer: backend 'openai' needs 'base_url'.*histopilot serve-llm",
        ),
        ("[roles.describer]\nbackend = 'transformers'\n", r"needs 'model'"),
        ("[roles.pathologist]\nbackend = 'openai'\n", r"roles\.pathologist: unknown setting"),
    ],
)
def test_invalid_values_are_reported_with_their_key(toml, message):
    write(Path("histopilot.toml"), toml)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(environ=NO_ENV)
    assert "histopilot.toml" in str(raised.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown profile 'tpu'; built-in profiles: default, gpu"):
        load_config(profile="tpu", environ=NO_ENV)


def test_unknown_role_lookup_is_explained():
    with pytest.raises(ConfigError, match="unknown role 'pathologist'"):
        load_config(environ=NO_ENV).roles["pathologist"]
