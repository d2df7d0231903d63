"""Run histopilot's HTTP server for tests: in-process (TestClient or uvicorn on loopback) or
as a separate ``histopilot serve`` process that a test can kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from histopilot.config import HistopilotConfig, ServerConfig
from histopilot.serve.api.app import create_app
from tests.agent_helpers import make_context

#: Small analyses, so a chat turn that runs one takes seconds.
QUICK_AGENTS = {"budget": 3, "trajectories": 1, "min_regions": 1, "regions_per_step": 1}


def make_app(slide_root: Path, data_dir: Path, feature_cache: Path, **server: Any) -> FastAPI:
    config = HistopilotConfig(server=ServerConfig(**server))
    context = make_context(feature_cache, **QUICK_AGENTS)
    return create_app(config, slide_roots=[slide_root], data_dir=data_dir, context=context)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """``app`` behind a real uvicorn server on loopback; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class ServerProcess:
    """``histopilot serve`` in its own process, offline, with quick analyses."""

    def __init__(
        self,
        slide_root: Path,
        data_dir: Path,
        feature_cache: Path,
        settings: dict[str, str] | None = None,
    ) -> None:
        """``settings``: more ``HISTOPILOT_…`` variables, e.g. a shared checkpoint database."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HISTOPILOT_AGENTS__FEATURE_CACHE": str(feature_cache),
            **{
                f"HISTOPILOT_AGENTS__{key.upper()}": str(value)
                for key, value in QUICK_AGENTS.items()
            },
            **(settings or {}),
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "histopilot",
                "serve",
                "--port",
                str(self.port),
                "--slides",
                str(slide_root),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            cwd=data_dir.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._wait_until_healthy()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"histopilot serve exited:\n{self.process.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError("histopilot serve did not answer /health within 90 s")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flushing — what a crash or an OOM kill does."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
