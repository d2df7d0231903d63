"""Replicas sharing one Postgres database: a thread started on one server goes on on another.

The database comes from ``HISTOPILOT_TEST_POSTGRES`` (a ``postgresql://`` URL; ``.ci/run``
starts Debian's PostgreSQL and sets it). Without it these tests skip, except under CI, where a
missing database is a failure.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import httpx
import pytest

from histopilot.agents.checkpoints import open_checkpointer
from histopilot.serve.api.registry import Registry
from tests.serve_helpers import ServerProcess

CMU = "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def postgres_url() -> str:
    url = os.environ.get("HISTOPILOT_TEST_POSTGRES")
    if url:
        return url
    if os.environ.get("CI") == "true":
        pytest.fail("HISTOPILOT_TEST_POSTGRES is not set; .ci/run starts PostgreSQL and sets it")
    pytest.skip("no test database: set HISTOPILOT_TEST_POSTGRES=postgresql://…")


def turn(url: str, text: str, **metadata: str) -> dict:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "metadata": metadata},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_thread_moves_between_two_servers_sharing_one_database(
    postgres_url: str, cmu_slide_root: Path, feature_cache: Path, tmp_path: Path
) -> None:
    shared = {"HISTOPILOT_AGENTS__CHECKPOINTS": postgres_url}
    # Each server has its own data folder: nothing about the thread is on a local disk.
    first = ServerProcess(cmu_slide_root, tmp_path / "a", feature_cache, shared)
    try:
        second = ServerProcess(cmu_slide_root, tmp_path / "b", feature_cache, shared)
        try:
            opened = turn(first.url, "What do you see?", slide=CMU)
            thread = opened["histopilot"]["thread_id"]
            region = opened["histopilot"]["citations"][0]["region_id"]
            followed = turn(second.url, f"Describe {region}", thread_id=thread)
            assert followed["choices"][0]["message"]["content"].startswith("Region ")

            histories = [
                httpx.get(f"{server.url}/v1/threads/{thread}", timeout=30).json()
                for server in (first, second)
            ]
            assert histories[0] == histories[1]
            said = [(m["role"], m["content"]) for m in histories[0]["messages"]]
            asked = said.index(("user", "What do you see?"))
            assert said[asked + 1] == ("assistant", opened["choices"][0]["message"]["content"])
            assert said[asked + 2 :] == [
                ("user", f"Describe {region}"),
                ("assistant", followed["choices"][0]["message"]["content"]),
            ]
            listed = httpx.get(f"{second.url}/v1/threads", timeout=30).json()["data"]
            assert thread in [entry["id"] for entry in listed]
            # Both turns' audit records are in the shared database, whichever replica ran them.
            trails = [
                httpx.get(f"{server.url}/v1/threads/{thread}/audit", timeout=30).json()
                for server in (first, second)
            ]
            assert trails[0] == trails[1]
            kinds = [(r["kind"], r["id"]) for r in trails[0]["records"]]
            assert ("chat_turn", f"{thread}#turn-1") in kinds
            assert ("chat_turn", f"{thread}#turn-2") in kinds
            assert any(kind == "analysis" for kind, _ in kinds)
        finally:
            second.stop()
    finally:
        first.stop()


def test_a_turn_holds_its_thread_on_every_replica(postgres_url: str) -> None:
    one, other = Registry(postgres_url, replica="one"), Registry(postgres_url, replica="other")
    try:
        thread = f"chat-{uuid.uuid4().hex[:16]}"
        one.add_thread("alice", thread, "slide", "slide.svs", "title")
        assert one.claim_thread(thread, "one:1")
        assert not other.claim_thread(thread, "other:1")
        assert other.release_turns_of_this_replica() == 0  # another replica's lease stays
        one.release_thread(thread, "one:1")
        assert other.claim_thread(thread, "other:1")
        other.release_thread(thread, "other:1")

        mine = f"analysis-{uuid.uuid4().hex[:12]}"
        theirs = f"analysis-{uuid.uuid4().hex[:12]}"
        one.add_analysis("alice", mine, "slide", "slide.svs", None)
        other.add_analysis("alice", theirs, "slide", "slide.svs", None)
        other.add_progress(theirs, "triage: 12 tiles")
        one.interrupt_unfinished()  # "one" restarted: only its own analysis was cut short
        assert one.analysis("alice", mine).status == "interrupted"
        assert other.analysis("alice", theirs).status == "queued"
        assert other.analysis("alice", theirs).progress == ["triage: 12 tiles"]
        assert one.analysis("bob", theirs) is None  # another user sees nothing
    finally:
        one.close()
        other.close()


def test_the_checkpointer_never_prepares_statements(postgres_url: str) -> None:
    """Transaction-mode poolers (PgBouncer) cannot keep prepared statements between
    transactions, so the saver's connections must never prepare one (psycopg would after a
    query's fifth run)."""
    with open_checkpointer(postgres_url) as saver:
        for _ in range(8):
            assert list(saver.list({"configurable": {"thread_id": "never-used"}})) == []
        with saver.conn.connection() as connection:
            assert connection.prepare_threshold is None and connection.autocommit
            for _ in range(8):
                connection.execute("SELECT count(*) FROM checkpoints WHERE thread_id = %s", ("x",))
            prepared = connection.execute("SELECT count(*) AS n FROM pg_prepared_statements")
            assert prepared.fetchone()["n"] == 0
