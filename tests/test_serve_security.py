"""Tokens, ownership, rate limits and body limits: what the server refuses, and how."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from histopilot.cli import app as cli
from histopilot.config import ServerConfig
from tests.serve_helpers import make_app

ALICE = {"Authorization": "Bearer alice-token-0123456789"}
BOB = {"Authorization": "Bearer bob-token-9876543210ab"}
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210ab"}


def test_without_a_known_token_nothing_but_health_answers(
    cmu_slide_root: Path, feature_cache: Path, tmp_path: Path
) -> None:
    app = make_app(cmu_slide_root, tmp_path, feature_cache, tokens=TOKENS)
    with TestClient(app) as client:
        assert client.get("/health").json()["authentication"] is True
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-000000000"},
            {"Authorization": "Basic YTpi"},
        ):
            response = client.get("/v1/slides", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "token" in response.json()["error"]["message"]
        assert client.get("/v1/slides", headers=ALICE).status_code == 200


def test_each_token_sees_only_its_own_threads(
    cmu_slide_root: Path, feature_cache: Path, tmp_path: Path
) -> None:
    app = make_app(cmu_slide_root, tmp_path, feature_cache, tokens=TOKENS)
    with TestClient(app) as client:
        answer = client.post(
            "/v1/chat/completions",
            headers=ALICE,
            json={
                "messages": [{"role": "user", "content": "/help"}],
                "metadata": {"slide": "CMU-1-Small-Region.svs"},
            },
        ).json()
        thread = answer["histopilot"]["thread_id"]
        assert [t["id"] for t in client.get("/v1/threads", headers=ALICE).json()["data"]] == [
            thread
        ]
        assert client.get("/v1/threads", headers=BOB).json()["data"] == []
        assert client.get(f"/v1/threads/{thread}", headers=BOB).status_code == 404
        assert client.delete(f"/v1/threads/{thread}", headers=BOB).status_code == 404
        stolen = client.post(
            "/v1/chat/completions",
            headers=BOB,
            json={
                "messages": [{"role": "user", "content": "/report"}],
                "metadata": {"thread_id": thread},
            },
        )
        assert stolen.status_code == 404
        assert client.get(f"/v1/threads/{thread}", headers=ALICE).status_code == 200


def test_tokens_must_be_long_and_unshared() -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        ServerConfig(tokens={"alice": "short"})
    with pytest.raises(ValueError, match="share a token"):
        ServerConfig(tokens={"a": "x" * 20, "b": "x" * 20})
    assert "x" * 20 not in ServerConfig(tokens={"a": "x" * 20}).model_dump_json()


def test_a_client_over_its_rate_is_told_when_to_come_back(
    cmu_slide_root: Path, feature_cache: Path, tmp_path: Path
) -> None:
    app = make_app(cmu_slide_root, tmp_path, feature_cache, rate_limit_per_minute=5)
    with TestClient(app) as client:
        statuses = [client.get("/v1/slides").status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        limited = client.get("/v1/slides")
        assert int(limited.headers["retry-after"]) >= 1


def test_request_bodies_over_the_limit_are_refused_before_they_are_read(
    cmu_slide_root: Path, feature_cache: Path, tmp_path: Path
) -> None:
    app = make_app(cmu_slide_root, tmp_path, feature_cache, max_request_kb=4)
    with TestClient(app) as client:
        response = client.post("/v1/extract", json={"text": "pT2 " * 5000})
        assert response.status_code == 413
        assert "larger than" in response.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b'{"text": "' + b"x" * 1000

        streamed = client.post(
            "/v1/extract", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert streamed.status_code == 413
        assert client.post("/v1/extract", json={"text": "pT2"}).status_code == 200


def test_the_servers_own_files_are_never_listed_as_slides(
    cmu_slide_root: Path, feature_cache: Path, tmp_path: Path, wsi_dir: Path
) -> None:
    root = tmp_path / "slides"
    shutil.copytree(cmu_slide_root, root)
    app = make_app(root, root / "server-data", feature_cache)  # data folder inside the root
    with TestClient(app) as client:
        content = (wsi_dir / "CMU-1-Small-Region.svs").read_bytes()
        uploaded = client.post("/v1/slides", files={"file": ("mine.svs", content)}).json()
        names = [s["name"] for s in client.get("/v1/slides").json()["data"]]
        assert names == ["CMU-1-Small-Region.svs", uploaded["name"]]


def test_serving_beyond_loopback_needs_tokens(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 2
    assert "without authentication" in result.stderr
