"""The ``openai`` backend against a real OpenAI-compatible server: ``transformers serve``.

The tiny taught Qwen2.5-VL is served over HTTP on 127.0.0.1 by the server Hugging Face ships, so
images, tool calls and streams cross a real wire, are produced by a real model and are parsed
back by the same code that talks to vLLM in production.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from histopilot.config import RoleConfig
from histopilot.serve.openai_backend import openai_chat_model
from tests.tiny_models import describe_question, tool_question, zoom_to_region

STARTUP_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def served(taught_vlm, tmp_path_factory):
    """``transformers serve`` holding the taught model; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [
        str(Path(sys.executable).parent / "transformers"),
        "serve",
        str(taught_vlm),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--device", "cpu",
        "--dtype", "float32",
    ]  # fmt: skip
    with log.open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited early:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not ready:\n{log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=30)


def served_role(base_url: str, model: Path) -> RoleConfig:
    return RoleConfig(backend="openai", model=str(model), base_url=base_url, max_tokens=120)


def test_image_question_gets_an_answer_over_http(served, taught_vlm):
    chat = openai_chat_model(
        "describer", served_role(served, taught_vlm).model_copy(update={"max_tokens": 8})
    )
    answer = chat.invoke(describe_question())
    assert isinstance(answer.content, str) and answer.content
    usage = answer.response_metadata["token_usage"]
    assert usage["prompt_tokens"] > 16  # text plus the image's placeholder tokens
    assert usage["completion_tokens"] <= 8


def test_model_written_tool_call_is_parsed(served, taught_vlm):
    chat = openai_chat_model("orchestrator", served_role(served, taught_vlm))
    answer = chat.bind_tools([zoom_to_region]).invoke(tool_question())
    assert [(call["name"], call["args"]) for call in answer.tool_calls] == [
        ("zoom_to_region", {"x": 1200, "y": 800})
    ]
    assert answer.response_metadata["finish_reason"] == "tool_calls"


def test_streamed_tool_call_is_assembled(served, taught_vlm):
    chat = openai_chat_model("orchestrator", served_role(served, taught_vlm))
    pieces = list(chat.bind_tools([zoom_to_region]).stream(tool_question()))
    message = pieces[0]
    for piece in pieces[1:]:
        message += piece
    assert message.tool_calls[0]["args"] == {"x": 1200, "y": 800}


def test_streamed_text_arrives_in_pieces(served, taught_vlm):
    chat = openai_chat_model(
        "describer", served_role(served, taught_vlm).model_copy(update={"max_tokens": 6})
    )
    pieces = [piece.content for piece in chat.stream(describe_question()) if piece.content]
    assert len(pieces) > 1
