"""The server on a real loopback socket: an OpenAI client chats with it, a schema fuzz finds
no server error, and a server killed mid-conversation restarts with every finished turn."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openai import NotFoundError, OpenAI

from tests.serve_helpers import ServerProcess, make_app, served

CMU = "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def live_url(cmu_slide_root: Path, feature_cache: Path, tmp_path_factory) -> Iterator[str]:
    app = make_app(cmu_slide_root, tmp_path_factory.mktemp("server"), feature_cache)
    with served(app) as url:
        yield url


def test_an_openai_client_chats_with_a_slide(live_url: str) -> None:
    client = OpenAI(base_url=f"{live_url}/v1", api_key="unused-on-loopback")
    assert [m.id for m in client.models.list()] == ["histopilot"]
    first = client.chat.completions.create(
        model="histopilot",
        messages=[{"role": "user", "content": "What is on this slide?"}],
        metadata={"slide": CMU},
    )
    extras = first.model_extra["histopilot"]
    assert extras["citations"] and "Offline mode" in first.choices[0].message.content

    stream = client.chat.completions.create(
        model="histopilot",
        messages=[{"role": "user", "content": f"Describe {extras['citations'][0]['region_id']}"}],
        metadata={"slide": CMU, "thread_id": extras["thread_id"]},
        stream=True,
    )
    pieces, events = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        events.append((chunk.model_extra or {}).get("histopilot", {}).get("event"))
    assert "".join(pieces).startswith("Region ")
    assert events[0] == "thread" and "citations" in events

    with pytest.raises(NotFoundError, match="not served here"):
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], metadata={"slide": CMU}
        )


def test_no_generated_request_makes_the_server_fail(live_url: str) -> None:
    """Requests generated from the OpenAPI schema, valid and not, for every operation: the
    answer may be any 4xx, never a 5xx."""
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=10,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case) -> None:
            response = case.call(timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.text[:300]}")

        call()
    assert not failures, "\n".join(failures)


def ask(url: str, text: str, **metadata: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "metadata": metadata},
        timeout=120,
    )


def test_a_killed_server_restarts_with_every_finished_turn(
    cmu_slide_root: Path, feature_cache: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = ServerProcess(cmu_slide_root, data, feature_cache)
    try:
        first = ask(server.url, "What do you see?", slide=CMU).json()
        thread = first["histopilot"]["thread_id"]
        answer = first["choices"][0]["message"]["content"]

        # A second turn is under way (its analysis runs in a thread of its own) when the
        # process is killed.
        body = {
            "messages": [{"role": "user", "content": "/analyze"}],
            "metadata": {"thread_id": thread},
            "stream": True,
        }
        progressed = threading.Event()

        def second_turn() -> None:
            try:
                with httpx.stream(
                    "POST", f"{server.url}/v1/chat/completions", json=body, timeout=120
                ) as response:
                    for line in response.iter_lines():
                        if '"progress"' in line:
                            progressed.set()
            except httpx.HTTPError:
                pass  # the server dies under it

        talker = threading.Thread(target=second_turn)
        talker.start()
        assert progressed.wait(60), "the second turn never started"
        server.kill()
        talker.join(timeout=30)
    finally:
        server.kill()

    restarted = ServerProcess(cmu_slide_root, data, feature_cache)
    try:
        history = httpx.get(f"{restarted.url}/v1/threads/{thread}", timeout=30).json()
        said = [(m["role"], m["content"]) for m in history["messages"]]
        asked = said.index(("user", "What do you see?"))
        assert said[asked + 1] == ("assistant", answer)
        assert history["assessment"]
        # ...and the thread goes on where it stopped.
        more = ask(restarted.url, "/regions", thread_id=thread)
        assert (
            more.status_code == 200
            and "| region |" in more.json()["choices"][0]["message"]["content"]
        )
    finally:
        restarted.stop()
