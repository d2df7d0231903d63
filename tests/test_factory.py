"""`chat_model(role, config)`: one factory, three backends, and the offline marker."""

import pytest

from histopilot.config import HistopilotConfig, load_config
from histopilot.errors import ModelRequiredError
from histopilot.serve import OfflineModel, chat_model, require_chat_model
from histopilot.serve.openai_backend import OpenAIChatModel
from histopilot.serve.transformers_backend import TransformersChatModel


def config_with(**roles) -> HistopilotConfig:
    env = {}
    for role, settings in roles.items():
        for key, value in settings.items():
            env[f"HISTOPILOT_ROLES__{role.upper()}__{key.upper()}"] = value
    return load_config(environ=env)


def test_each_backend_gives_its_kind_of_model():
    config = config_with(
        describer={"backend": "openai", "model": "Qwen/Qwen2.5-VL-7B-Instruct",
                   "base_url": "http://127.0.0.1:8000/v1", "adapter": "histopilot-describer"},
        extractor={"backend": "transformers", "model": "/models/extractor"},
    )  # fmt: skip
    describer = chat_model("describer", config)
    assert isinstance(describer, OpenAIChatModel)
    assert describer.model_name == "histopilot-describer"
    assert describer.openai_api_base == "http://127.0.0.1:8000/v1"
    assert isinstance(chat_model("extractor", config), TransformersChatModel)
    assert chat_model("diagnoser", config) == OfflineModel(role="diagnoser")


def test_offline_roles_explain_how_to_configure_a_model():
    with pytest.raises(ModelRequiredError) as raised:
        require_chat_model("orchestrator", "Open chat about a slide", load_config(environ={}))
    message = str(raised.value)
    assert message.startswith("Open chat about a slide needs a language model")
    assert "[roles.orchestrator]" in message and "--profile gpu" in message


def test_building_a_model_contacts_nothing():
    config = config_with(
        describer={"backend": "openai", "model": "m", "base_url": "http://10.255.255.1:1/v1"},
        extractor={"backend": "transformers", "model": "/no/such/folder"},
    )
    assert chat_model("describer", config) is not None  # no connection is attempted
    assert chat_model("extractor", config) is not None  # no weights are read
