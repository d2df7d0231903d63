"""``POST /v1/chat/completions``: the chat agent behind OpenAI's chat-completions wire format.

Any OpenAI client can talk to the assistant. The request names its slide and thread in the
``metadata`` object (``{"slide": "<id or name>", "thread_id": "…"}``); without a thread id a
new thread starts. The thread keeps the conversation, so only the last user message of the
request is the new turn (earlier messages are what the client remembers of the same thread).

What is not text travels in a ``histopilot`` object beside the standard fields: in a stream,
chunks whose ``histopilot.event`` is ``thread`` (first), ``progress`` (an agent step),
``citations`` (the regions the answer names, with their level-0 boxes) or ``error``; in a
plain response, ``histopilot`` holds the thread id, the citations and the progress lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from langgraph.checkpoint.base import BaseCheckpointSaver
from pydantic import BaseModel, ConfigDict, Field

from histopilot.agents.chat import ChatEvent, ChatReply, ChatSession, EventCallback
from histopilot.agents.context import AgentContext
from histopilot.errors import HistopilotError
from histopilot.serve.api.catalog import CatalogSlide
from histopilot.serve.api.registry import Registry
from histopilot.tools.report.document import Citation

log = logging.getLogger(__name__)
MODEL_ID = "histopilot"
MAX_MESSAGE_CHARS = 8000


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request fields histopilot reads; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = MODEL_ID
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=500)
    stream: bool = False
    metadata: dict[str, str] | None = Field(
        None, description="'slide' (id or name) and 'thread_id' (omit to start a new thread)."
    )

    def new_turn(self) -> str:
        users = [m for m in self.messages if m.role == "user"]
        if not users or not users[-1].text.strip():
            raise HistopilotError("the request has no user message with text to answer.")
        text = users[-1].text
        if len(text) > MAX_MESSAGE_CHARS:
            raise HistopilotError(f"a message may be at most {MAX_MESSAGE_CHARS} characters.")
        return text


class HistopilotExtras(BaseModel):
    thread_id: str
    slide: str
    citations: list[Citation]
    progress: list[str]
    notice: str = Field(description="Also the answer's last line: a draft, not a diagnosis")
    withheld: list[str] = Field(
        default_factory=list, description="Why the guardrails withheld parts of the answer"
    )
    audit_id: str | None = Field(None, description="The turn's record: GET …/threads/{id}/audit")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = MODEL_ID
    choices: list[Choice]
    usage: Usage = Usage()
    histopilot: HistopilotExtras


class ThreadBusyError(HistopilotError):
    """A turn is already running in this thread."""


class ChatTurns:
    """Runs chat turns on worker threads, one at a time per thread, across every replica
    that shares the registry."""

    def __init__(
        self,
        context: AgentContext,
        checkpointer: BaseCheckpointSaver,
        pool: ThreadPoolExecutor,
        registry: Registry,
        scrub: Callable[[str], str],
    ) -> None:
        self.context = context
        self.scrub = scrub  # takes the server's folders out of error messages
        self.checkpointer = checkpointer
        self.registry = registry
        self._pool = pool

    def session(self, slide: CatalogSlide, thread_id: str) -> ChatSession:
        return ChatSession(self.context, slide.path, self.checkpointer, thread_id=thread_id)

    async def complete(
        self, slide: CatalogSlide, thread_id: str, text: str, lease: str
    ) -> ChatCompletion:
        """A whole answer, computed on the pool while the event loop waits for it."""
        progress: list[str] = []

        def heard(event: ChatEvent) -> None:
            if event.kind == "progress":
                progress.append(event.text)

        reply = await asyncio.wrap_future(self._submit(slide, thread_id, text, heard, lease))
        return ChatCompletion(
            id=_completion_id(),
            created=int(time.time()),
            choices=[Choice(message=AssistantMessage(content=reply.text))],
            histopilot=HistopilotExtras(
                thread_id=thread_id,
                slide=slide.id,
                citations=reply.citations,
                progress=progress,
                notice=reply.notice,
                withheld=withheld_reasons(reply),
                audit_id=reply.audit_id,
            ),
        )

    def stream(
        self, slide: CatalogSlide, thread_id: str, text: str, lease: str
    ) -> AsyncIterator[str]:
        """Server-sent events of OpenAI ``chat.completion.chunk`` objects, ending in [DONE].

        Call it on the event loop. The turn runs on a worker thread and finishes (and is
        saved) even if the client goes away; the events only relay what it hears.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        turn = self._submit(slide, thread_id, text, lambda event: put("event", event), lease)

        def finished(future: Future) -> None:
            if future.cancelled():
                put("error", "the turn was cancelled: the server is shutting down.")
                return
            error = future.exception()
            if error is None:
                put("reply", future.result())
            elif isinstance(error, HistopilotError):
                put("error", self.scrub(str(error)))
            else:  # reported to the client, never a dead stream
                log.error("chat turn in %s failed", thread_id, exc_info=error)
                put("failure", f"internal error ({type(error).__name__}); see the server log")

        turn.add_done_callback(finished)
        return _chunks(events, thread_id, slide.id)

    def _submit(
        self, slide: CatalogSlide, thread_id: str, text: str, heard: EventCallback, lease: str
    ) -> Future[ChatReply]:
        """Run the turn on the pool; its lease on the thread ends with it, however it ends."""
        try:
            future = self._pool.submit(lambda: self.session(slide, thread_id).turn(text, heard))
        except RuntimeError:  # the pool is shutting down
            self.release(thread_id, lease)
            raise
        future.add_done_callback(lambda _: self.release(thread_id, lease))
        return future

    def claim(self, thread_id: str) -> str:
        """Take the thread for one turn (on every replica); returns the turn's lease. Blocking
        (the registry may be a database across the network): call it off the event loop."""
        lease = f"{self.registry.replica}:{uuid.uuid4().hex}"
        if not self.registry.claim_thread(thread_id, lease):
            raise ThreadBusyError(
                f"a turn is already running in thread {thread_id}; wait for its answer."
            )
        return lease

    def release(self, thread_id: str, lease: str) -> None:
        try:
            self.registry.release_thread(thread_id, lease)
        except Exception:  # the lease lapses on its own; the turn's answer still goes out
            log.exception("could not release thread %s", thread_id)


async def _chunks(
    events: asyncio.Queue[tuple[str, Any]], thread_id: str, slide_id: str
) -> AsyncIterator[str]:
    completion_id = _completion_id()
    created = int(time.time())

    def chunk(delta: dict, *, finish: str | None = None, extras: dict | None = None) -> str:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": MODEL_ID,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if extras is not None:
            body["histopilot"] = extras
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk(
        {"role": "assistant", "content": ""},
        extras={"event": "thread", "thread_id": thread_id, "slide": slide_id},
    )
    while True:
        try:
            kind, value = await asyncio.wait_for(events.get(), timeout=15.0)
        except TimeoutError:
            yield ": still working\n\n"  # an SSE comment keeps proxies from closing the stream
            continue
        if kind == "event" and value.kind == "progress":
            yield chunk({}, extras={"event": "progress", "text": value.text})
        elif kind == "event":
            yield chunk({"content": value.text})
        elif kind == "reply":
            citations = [c.model_dump() for c in value.citations]
            yield chunk({}, extras={"event": "citations", "citations": citations})
            guarded = {
                "event": "guardrails",
                "notice": value.notice,
                "withheld": withheld_reasons(value),
                "audit_id": value.audit_id,
            }
            yield chunk({}, extras=guarded)
            yield chunk({}, finish="stop")
            break
        else:
            code = 400 if kind == "error" else 500
            error = {"message": value, "type": "histopilot_error", "code": code}
            yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"
            break
    yield "data: [DONE]\n\n"


def withheld_reasons(reply: ChatReply) -> list[str]:
    """What the guardrails withheld from an answer, as reasons (the text stays in the audit)."""
    return list(dict.fromkeys(f"{action.where}: {action.reason}" for action in reply.withheld))


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
