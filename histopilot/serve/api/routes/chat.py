"""``POST /v1/chat/completions`` and ``GET /v1/models``: the OpenAI-compatible face."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from histopilot.errors import HistopilotError
from histopilot.serve.api.catalog import CatalogSlide
from histopilot.serve.api.chat import MODEL_ID, ChatCompletion, ChatRequest
from histopilot.serve.api.state import NotFoundError, ServerState, State, User

router = APIRouter(prefix="/v1", tags=["chat"])


@router.get("/models")
def list_models(_user: User) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "histopilot"}],
    }


@router.post(
    "/chat/completions",
    responses={200: {"content": {"text/event-stream": {}}, "description": "With stream=true."}},
)
async def chat_completions(body: ChatRequest, state: State, user: User) -> ChatCompletion:
    """One chat turn about a slide: ``metadata.slide`` names it, ``metadata.thread_id``
    continues a thread (omit it to start one; the answer says which)."""
    if body.model != MODEL_ID:
        raise NotFoundError(f"model {body.model!r} is not served here; use {MODEL_ID!r}.")
    text = body.new_turn()

    def open_turn() -> tuple[CatalogSlide, str, str]:  # the registry may be across a network
        slide, thread_id = _slide_and_thread(state, user, body.metadata or {}, text)
        return slide, thread_id, state.chats.claim(thread_id)

    slide, thread_id, lease = await run_in_threadpool(open_turn)
    if body.stream:
        return StreamingResponse(  # type: ignore[return-value]
            state.chats.stream(slide, thread_id, text, lease),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await state.chats.complete(slide, thread_id, text, lease)


def _slide_and_thread(
    state: ServerState, user: str, metadata: dict[str, str], text: str
) -> tuple[CatalogSlide, str]:
    """The thread the request continues (the user's own, never anyone else's) or a new one."""
    asked_slide = metadata.get("slide")
    thread_id = metadata.get("thread_id")
    if thread_id:
        record = state.registry.thread(user, thread_id)
        if record is None:
            raise NotFoundError(
                f"no thread {thread_id!r}; omit metadata.thread_id to start a new thread."
            )
        slide = state.catalog.find(asked_slide or record.slide_id)
        if slide.id != record.slide_id:
            raise HistopilotError(
                f"thread {thread_id} is about slide {record.slide_name}, not {slide.name}; "
                "omit metadata.thread_id to start a thread about this slide."
            )
        return slide, thread_id
    if not asked_slide:
        raise HistopilotError(
            'name the slide in the request\'s metadata: {"slide": "<id or name>"} '
            "(GET /v1/slides lists them)."
        )
    slide = state.catalog.find(asked_slide)
    thread_id = f"chat-{uuid.uuid4().hex[:16]}"
    state.registry.add_thread(user, thread_id, slide.id, slide.name, title=text.strip()[:80])
    return slide, thread_id
