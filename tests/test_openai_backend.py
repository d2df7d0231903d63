"""The ``openai`` backend on the wire: what it sends, what it parses, how it fails.

Requests go to a scripted OpenAI-compatible server on 127.0.0.1 that records each body, so the
assertions are about real HTTP traffic, not about mocked client objects.
"""

import socket

import numpy as np
import pytest
from langchain_core.messages import HumanMessage
from pydantic import BaseModel, Field

from histopilot.config import RoleConfig
from histopilot.errors import ModelRequestError, ModelUnavailableError
from histopilot.serve import image_part
from histopilot.serve.openai_backend import openai_chat_model
from tests.openai_stub import OpenAIStub, Reply, chunk, completion, error


class Finding(BaseModel):
    """What the describer reports for one region."""

    pattern: str = Field(description="Growth pattern.")
    mitoses_per_mm2: float


def zoom_to_region(x: int, y: int, magnification: float) -> str:
    """Move the view to level-0 (x, y) at a magnification."""
    return "ok"


@pytest.fixture
def stub():
    with OpenAIStub() as server:
        yield server


def role(stub: OpenAIStub, **overrides) -> RoleConfig:
    settings = {"backend": "openai", "model": "Qwen/Qwen2.5-VL-7B-Instruct"}
    settings |= {"base_url": stub.base_url, "adapter": "histopilot-describer", "max_retries": 0}
    return RoleConfig(**(settings | overrides))


def region_question() -> HumanMessage:
    pixels = np.full((32, 32, 3), (200, 120, 180), dtype=np.uint8)
    return HumanMessage(content=[{"type": "text", "text": "Describe."}, image_part(pixels)])


def test_request_carries_image_adapter_and_generation_settings(stub):
    stub.reply(Reply(body=completion("Sheets of atypical cells.")))
    model = openai_chat_model("describer", role(stub, temperature=0.2, max_tokens=300, seed=7))

    answer = model.invoke([region_question()])

    assert answer.content == "Sheets of atypical cells."
    sent = stub.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "histopilot-describer"  # the adapter, not the base model
    assert (sent.body["temperature"], sent.body["max_completion_tokens"]) == (0.2, 300)
    assert sent.body["seed"] == 7
    text, image = sent.body["messages"][0]["content"]
    assert text == {"type": "text", "text": "Describe."}
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert sent.headers["authorization"] == "Bearer EMPTY"


def test_api_key_comes_from_the_named_environment_variable(stub, monkeypatch):
    monkeypatch.setenv("LAB_VLLM_KEY", "s3cret")
    model = openai_chat_model("describer", role(stub, api_key_env="LAB_VLLM_KEY"))
    model.invoke("hello")
    assert stub.requests[-1].headers["authorization"] == "Bearer s3cret"


def test_structured_output_sends_the_json_schema_and_parses_the_answer(stub):
    stub.reply(Reply(body=completion('{"pattern": "cribriform", "mitoses_per_mm2": 4.5}')))
    model = openai_chat_model("describer", role(stub))

    finding = model.with_structured_output(Finding).invoke([region_question()])

    assert finding == Finding(pattern="cribriform", mitoses_per_mm2=4.5)
    response_format = stub.requests[-1].body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "Finding"
    assert response_format["json_schema"]["strict"] is True
    schema = response_format["json_schema"]["schema"]
    assert set(schema["properties"]) == {"pattern", "mitoses_per_mm2"}


def test_tools_are_offered_and_tool_calls_parsed(stub):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {
            "name": "zoom_to_region",
            "arguments": '{"x": 5, "y": 9, "magnification": 20}',
        },
    }
    stub.reply(Reply(body=completion(None, tool_calls=[call])))
    model = openai_chat_model("orchestrator", role(stub)).bind_tools([zoom_to_region])

    answer = model.invoke("Zoom to the tumour edge.")

    assert answer.tool_calls == [
        {
            "name": "zoom_to_region",
            "args": {"x": 5, "y": 9, "magnification": 20},
            "id": "call_1",
            "type": "tool_call",
        }
    ]
    (tool,) = stub.requests[-1].body["tools"]
    assert tool["function"]["name"] == "zoom_to_region"
    assert set(tool["function"]["parameters"]["properties"]) == {"x", "y", "magnification"}


def test_streaming_requests_a_stream_and_assembles_text_and_tool_calls(stub):
    stub.reply(
        Reply(
            events=[
                chunk({"role": "assistant", "content": "Sheets "}),
                chunk({"content": "of cells."}),
            ]
        ),
        Reply(
            events=[
                chunk(
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_9",
                                "type": "function",
                                "function": {"name": "zoom_to_region", "arguments": '{"x": 1, '},
                            }
                        ],
                    }
                ),
                chunk(
                    {
                        "tool_calls": [
                            {"index": 0, "function": {"arguments": '"y": 2, "magnification": 40}'}}
                        ]
                    },
                    finish_reason="tool_calls",
                ),
            ]
        ),
    )
    model = openai_chat_model("describer", role(stub))

    pieces = list(model.stream("Describe."))
    assert [piece.content for piece in pieces if piece.content] == ["Sheets ", "of cells."]
    assert stub.requests[-1].body["stream"] is True

    streamed = list(model.bind_tools([zoom_to_region]).stream("Zoom."))
    message = streamed[0]
    for piece in streamed[1:]:
        message += piece
    assert message.tool_calls[0]["args"] == {"x": 1, "y": 2, "magnification": 40}


def test_qwen3_thinking_is_turned_off_unless_the_role_says_otherwise(stub):
    openai_chat_model("diagnoser", role(stub, model="Qwen/Qwen3-8B")).invoke("hi")
    assert stub.requests[-1].body["chat_template_kwargs"] == {"enable_thinking": False}

    own = {"chat_template_kwargs": {"enable_thinking": True}, "top_k": 20}
    openai_chat_model("diagnoser", role(stub, model="Qwen/Qwen3-8B", extra_body=own)).invoke("hi")
    sent = stub.requests[-1].body
    assert sent["chat_template_kwargs"] == {"enable_thinking": True}
    assert sent["top_k"] == 20

    openai_chat_model("describer", role(stub)).invoke("hi")
    assert "chat_template_kwargs" not in stub.requests[-1].body


def test_server_errors_are_retried_with_backoff(stub):
    stub.reply(error(503, "loading"), error(502, "bad gateway"), Reply(body=completion("ready")))
    answer = openai_chat_model("describer", role(stub, max_retries=2)).invoke("hi")
    assert answer.content == "ready"
    assert len(stub.requests) == 3


def test_persistent_server_failure_names_the_server(stub):
    stub.reply(error(500, "CUDA out of memory"), error(500, "CUDA out of memory"))
    with pytest.raises(
        ModelUnavailableError, match=r"failed \(HTTP 500\) after 1 retries: CUDA out of memory"
    ):
        openai_chat_model("describer", role(stub, max_retries=1)).invoke("hi")


def test_unreachable_server_says_how_to_start_one():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = RoleConfig(
        backend="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
    )
    with pytest.raises(ModelUnavailableError) as raised:
        openai_chat_model("describer", settings).invoke("hi")
    message = str(raised.value)
    assert (
        f"cannot reach the model server for role 'describer' at http://127.0.0.1:{port}/v1"
        in message
    )
    assert "histopilot serve-llm" in message
    assert "roles.describer.base_url" in message


def test_unknown_model_name_is_reported_with_the_name(stub):
    stub.reply(error(404, "The model `histopilot-describer` does not exist."))
    with pytest.raises(ModelUnavailableError, match="does not serve model 'histopilot-describer'"):
        openai_chat_model("describer", role(stub)).invoke("hi")


def test_refused_request_carries_the_servers_reason(stub):
    stub.reply(error(400, "max_tokens is too large: 99999 > 32768"))
    with pytest.raises(ModelRequestError, match=r"HTTP 400\): max_tokens is too large"):
        openai_chat_model("describer", role(stub)).invoke("hi")


def test_rejected_key_points_at_the_environment_variable(stub):
    stub.reply(error(401, "invalid key"))
    with pytest.raises(ModelUnavailableError, match="rejected the API key.*api_key_env"):
        openai_chat_model("describer", role(stub)).invoke("hi")


def test_stream_errors_are_explained_too(stub):
    stub.reply(error(404, "no such model"))
    with pytest.raises(ModelUnavailableError, match="does not serve model"):
        list(openai_chat_model("describer", role(stub)).stream("hi"))
