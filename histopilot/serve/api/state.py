"""What every route shares (:class:`ServerState`), and the dependencies that hand it out."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from langgraph.checkpoint.base import BaseCheckpointSaver

from histopilot.agents.context import AgentContext
from histopilot.config import HistopilotConfig
from histopilot.errors import HistopilotError
from histopilot.serve.api.analyses import AnalysisJobs
from histopilot.serve.api.background import run_on
from histopilot.serve.api.catalog import SlideCatalog
from histopilot.serve.api.chat import ChatTurns
from histopilot.serve.api.registry import Registry
from histopilot.serve.api.security import Authenticator, AuthError, RateLimiter
from histopilot.serve.api.tiles import TileService

T = TypeVar("T")


class NotFoundError(HistopilotError):
    """No such resource for this user (another user's resources are not found either)."""


class ConflictError(HistopilotError):
    """The resource is not in a state that allows the request (yet)."""


@dataclass
class ServerState:
    config: HistopilotConfig
    catalog: SlideCatalog
    tiles: TileService
    registry: Registry
    context: AgentContext
    checkpointer: BaseCheckpointSaver
    jobs: AnalysisJobs
    chats: ChatTurns
    auth: Authenticator
    limiter: RateLimiter
    extractor: Callable[[str, str], tuple[str, dict[str, Any], list[str]]]
    agents: ThreadPoolExecutor  # agent work: chat turns, triage maps (lowered priority)

    async def agent_work(self, work: Callable[[], T]) -> T:
        """Run agent work on the agents' pool; the event loop waits without a thread."""
        return await run_on(self.agents, work)


def server_state(request: Request) -> ServerState:
    return request.app.state.histopilot


_bearer = HTTPBearer(auto_error=False, description="A token from [server.tokens].")


def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The user behind the request's bearer token, after the rate limit has let it through."""
    state = server_state(request)
    header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    client = request.client.host if request.client else "unknown"
    try:
        user = state.auth.user(header)
    except AuthError:
        state.limiter.check(client)  # guessing tokens costs the guesser's rate
        raise
    state.limiter.check(user if state.auth.enabled else client)
    return user


State = Annotated[ServerState, Depends(server_state)]
User = Annotated[str, Depends(current_user)]
