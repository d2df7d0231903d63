"""The FastAPI app behind ``histopilot serve``: slides, chat, analyses, extraction, web page.

Everything a request needs is built once in :func:`create_app` and shared through
``app.state.histopilot``. Errors a user can act on come back as JSON in OpenAI's error shape
(``{"error": {"message", "type", "code"}}``) with a 4xx status; anything unexpected is logged
and answered with a 500 that names no internals.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from histopilot import __version__
from histopilot.agents.checkpoints import open_checkpointer
from histopilot.agents.context import AgentContext
from histopilot.config import ROLE_NAMES, HistopilotConfig
from histopilot.errors import (
    HistopilotError,
    ModelRequestError,
    ModelUnavailableError,
)
from histopilot.serve.api.analyses import AnalysisJobs, TooManyAnalysesError
from histopilot.serve.api.background import background_pool
from histopilot.serve.api.catalog import (
    SlideCatalog,
    UnknownSlideError,
    UnsupportedUploadError,
    UploadTooLargeError,
)
from histopilot.serve.api.chat import ChatTurns, ThreadBusyError
from histopilot.serve.api.registry import Registry, is_postgres
from histopilot.serve.api.routes import analyses, chat, extract, slides, threads
from histopilot.serve.api.security import (
    Authenticator,
    AuthError,
    BodyLimit,
    RateLimitedError,
    RateLimiter,
)
from histopilot.serve.api.state import ConflictError, NotFoundError, ServerState
from histopilot.serve.api.tiles import TileRequestError, TileService, UnreadableSlideError

log = logging.getLogger(__name__)
#: Chat turns and triage maps that run at once; more wait their turn.
AGENT_WORKERS = 4
WEB = resources.files("histopilot.serve") / "web"
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (UnknownSlideError, 404),
    (NotFoundError, 404),
    (TileRequestError, 404),
    (UnreadableSlideError, 422),
    (UploadTooLargeError, 413),
    (UnsupportedUploadError, 415),
    (ThreadBusyError, 409),
    (ConflictError, 409),
    (TooManyAnalysesError, 429),
    (ModelUnavailableError, 503),
    (ModelRequestError, 502),
)
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: FastAPI's /docs and /redoc pages load their scripts from a CDN and start them inline.
_DOCS_PATHS = ("/docs", "/redoc")
_DOCS_POLICY = (
    "default-src 'self'; img-src 'self' data: https://fastapi.tiangolo.com; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "worker-src blob:; connect-src 'self'; frame-ancestors 'none'"
)


def create_app(
    config: HistopilotConfig,
    *,
    slide_roots: list[Path],
    data_dir: Path,
    context: AgentContext | None = None,
) -> FastAPI:
    """The app; ``context`` replaces the one built from ``config`` (tests pass their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with ExitStack() as stack:
            app.state.histopilot = _build_state(config, slide_roots, data_dir, context, stack)
            yield

    app = FastAPI(
        title="histopilot",
        version=__version__,
        summary="Chat with whole-slide images, draft reports, extract structured fields.",
        description="Every answer, report and extraction is a draft for pathologist review, "
        "not a diagnosis. Authenticate with 'Authorization: Bearer <token>' when the server "
        "has tokens configured.",
        lifespan=lifespan,
    )
    server = config.server
    app.add_middleware(
        BodyLimit,
        limit=server.max_request_kb * 1024,
        upload_limit=int(server.max_upload_mb * 1e6) + 64 * 1024,  # + multipart framing
        upload_path="/v1/slides",
    )
    for router in (slides.router, chat.router, analyses.router, threads.router, extract.router):
        app.include_router(router)
    _add_error_handlers(app)

    app.add_middleware(SafetyHeaders)

    @app.get("/health", tags=["server"])
    def health(request: Request) -> dict[str, Any]:
        state: ServerState = request.app.state.histopilot
        return {
            "status": "ok",
            "version": __version__,
            "authentication": state.auth.enabled,
            "backends": {role: state.config.roles[role].backend for role in ROLE_NAMES},
        }

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(WEB / "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/web", StaticFiles(directory=str(WEB)), name="web")
    return app


class SafetyHeaders:
    """ASGI middleware: no MIME sniffing, no referrer, and a strict content policy by default
    (a response that sets its own policy keeps it)."""

    _HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        docs = scope["path"].startswith(_DOCS_PATHS)
        policy = (_DOCS_POLICY if docs else _PAGE_POLICY).encode()

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                wanted = (*self._HEADERS, (b"content-security-policy", policy))
                message["headers"] = [
                    *message.get("headers", []),
                    *((name, value) for name, value in wanted if name not in present),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)


def _build_state(
    config: HistopilotConfig,
    slide_roots: list[Path],
    data_dir: Path,
    context: AgentContext | None,
    stack: ExitStack,
) -> ServerState:
    server = config.server
    data_dir.mkdir(parents=True, exist_ok=True)
    context = context or AgentContext.from_config(config)
    stack.callback(context.close)
    checkpointer = stack.enter_context(
        open_checkpointer(context.settings.checkpoints, data_dir / "threads.sqlite")
    )
    # Replicas sharing a Postgres checkpoint database share the registry there too.
    shared = context.settings.checkpoints
    registry = Registry(
        shared if is_postgres(shared) else data_dir / "server.sqlite",
        replica=server.replica or f"{socket.gethostname()}:{data_dir.resolve()}",
    )
    stack.callback(registry.close)
    interrupted = registry.interrupt_unfinished()
    if interrupted:
        log.warning("%d analyses were cut short by the last shutdown", interrupted)
    if registry.release_turns_of_this_replica():
        log.warning("chat turns were cut short by the last shutdown; their threads are free")
    tiles = TileService(
        cache_bytes=server.tile_cache_mb * 1_000_000,
        tile_format=server.tile_format,
        quality=server.tile_quality,
    )
    stack.callback(tiles.close)
    catalog = SlideCatalog(slide_roots, data_dir / "uploads", exclude=data_dir)
    jobs = AnalysisJobs(
        registry,
        context,
        checkpointer,
        data_dir / "analyses",
        workers=server.analysis_workers,
        scrub=catalog.public,
    )
    stack.callback(jobs.close)
    agents = background_pool(AGENT_WORKERS, "agents")
    stack.callback(agents.shutdown, wait=False, cancel_futures=True)
    return ServerState(
        config=config,
        catalog=catalog,
        tiles=tiles,
        registry=registry,
        context=context,
        checkpointer=checkpointer,
        jobs=jobs,
        chats=ChatTurns(context, checkpointer, agents, registry, scrub=catalog.public),
        auth=Authenticator(dict(server.tokens)),
        limiter=RateLimiter(server.rate_limit_per_minute),
        extractor=_extractor(config),
        agents=agents,
    )


def _extractor(config: HistopilotConfig):
    from histopilot.tools.extract import extract_fields

    if config.roles["extractor"].backend == "offline":
        return lambda text, schema: extract_fields(text, schema)
    from histopilot.serve.factory import chat_model

    model = chat_model("extractor", config)
    return lambda text, schema: extract_fields(text, schema, model=model)


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}},
        status_code=status,
        headers=headers,
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HistopilotError)
    async def user_error(request: Request, error: HistopilotError) -> JSONResponse:
        status = next((code for kind, code in _STATUS if isinstance(error, kind)), 400)
        message = request.app.state.histopilot.catalog.public(str(error))
        return _error(status, message, type(error).__name__)

    @app.exception_handler(AuthError)
    async def unauthorised(_request: Request, error: AuthError) -> JSONResponse:
        return _error(401, str(error), "authentication_error", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RateLimitedError)
    async def rate_limited(_request: Request, error: RateLimitedError) -> JSONResponse:
        retry = str(max(1, round(error.retry_after)))
        return _error(429, str(error), "rate_limit_exceeded", {"Retry-After": retry})

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
            for item in error.errors()
        )
        return _error(422, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), "http_error", error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(500, "internal server error; the server log has the details.", "server")
