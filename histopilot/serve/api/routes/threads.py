"""Chat threads: list, read back (messages, regions, citations), delete."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel

from histopilot.agents.audit import AuditLog, AuditTrail
from histopilot.agents.chat import cited_regions
from histopilot.agents.report import cite
from histopilot.serve.api.chat import ThreadBusyError
from histopilot.serve.api.registry import ThreadRecord
from histopilot.serve.api.state import ConflictError, NotFoundError, ServerState, State, User
from histopilot.tools.report.document import Citation

router = APIRouter(prefix="/v1/threads", tags=["threads"])


class ThreadList(BaseModel):
    data: list[ThreadRecord]


class ThreadMessage(BaseModel):
    role: str
    content: str
    citations: list[Citation]


class RegionView(Citation):
    finding: str | None


class ThreadHistory(BaseModel):
    thread: ThreadRecord
    messages: list[ThreadMessage]
    regions: list[RegionView]
    assessment: str | None


@router.get("")
def list_threads(state: State, user: User) -> ThreadList:
    return ThreadList(data=state.registry.threads(user))


@router.get("/{thread_id}")
async def thread_history(thread_id: str, state: State, user: User) -> ThreadHistory:
    def read() -> ThreadHistory:
        record = _own_thread(state, user, thread_id)
        saved = state.checkpointer.get_tuple({"configurable": {"thread_id": thread_id}})
        values = saved.checkpoint["channel_values"] if saved else {}
        regions = values.get("regions", {})
        findings = values.get("findings", {})
        messages = [
            ThreadMessage(
                role="user" if isinstance(m, HumanMessage) else "assistant",
                content=m.text,
                citations=cited_regions(m.text, regions) if isinstance(m, AIMessage) else [],
            )
            for m in values.get("messages", [])
            if isinstance(m, HumanMessage) or (isinstance(m, AIMessage) and m.text)
        ]
        return ThreadHistory(
            thread=record,
            messages=messages,
            regions=[
                RegionView(
                    **cite(region).model_dump(),
                    finding=findings[region.id].text if region.id in findings else None,
                )
                for region in sorted(regions.values(), key=lambda r: r.id)
            ],
            assessment=values["report"].diagnosis if "report" in values else None,
        )

    return await run_in_threadpool(read)


@router.get("/{thread_id}/audit")
async def thread_audit(thread_id: str, state: State, user: User) -> AuditTrail:
    """What each turn of the thread ran (models, prompts, tools, regions, guardrails), and the
    analyses its turns started."""

    def read() -> AuditTrail:
        _own_thread(state, user, thread_id)
        return AuditTrail(records=AuditLog(state.checkpointer).records(thread_id))

    return await run_in_threadpool(read)


@router.delete("/{thread_id}", status_code=204, response_class=Response)
async def delete_thread(thread_id: str, state: State, user: User) -> Response:
    """Delete the thread, its checkpoints and those of the analyses it ran."""

    def delete() -> None:
        _own_thread(state, user, thread_id)
        lease = state.chats.claim(thread_id)  # no turn may start while it goes
        try:
            state.registry.delete_thread(user, thread_id)
            _delete_checkpoints(state, thread_id)
            AuditLog(state.checkpointer).delete(thread_id)
        finally:
            state.chats.release(thread_id, lease)

    try:
        await run_in_threadpool(delete)
    except ThreadBusyError as error:
        raise ConflictError(
            f"a turn is running in thread {thread_id}; delete it when it ends."
        ) from error
    return Response(status_code=204)


def _delete_checkpoints(state: ServerState, thread_id: str) -> None:
    analyses = {
        saved.config["configurable"]["thread_id"]
        for saved in state.checkpointer.list(None)
        if saved.config["configurable"]["thread_id"].startswith(f"{thread_id}:analysis:")
    }
    for checkpoint_thread in (thread_id, *analyses):
        state.checkpointer.delete_thread(checkpoint_thread)


def _own_thread(state: ServerState, user: str, thread_id: str) -> ThreadRecord:
    record = state.registry.thread(user, thread_id)
    if record is None:
        raise NotFoundError(f"no thread {thread_id!r}.")
    return record
