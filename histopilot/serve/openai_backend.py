"""The ``openai`` backend: any OpenAI-compatible server, vLLM first, through ``ChatOpenAI``.

``langchain_openai.ChatOpenAI`` already speaks the wire format (images as ``image_url`` parts,
``with_structured_output`` as a strict JSON schema, ``bind_tools``, streaming), and the OpenAI
client under it retries connection errors, 408/409/429 and 5xx with exponential backoff. What it
lacks is an error a pathologist can act on: after the retries, a refused connection surfaces as
``openai.APIConnectionError`` deep in a graph run. :class:`OpenAIChatModel` turns those into
:class:`~histopilot.errors.HistopilotError` messages that name the role, the server and the fix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_openai import ChatOpenAI

from histopilot.config import RoleConfig
from histopilot.errors import (
    ModelRequestError,
    ModelUnavailableError,
    StructuredOutputError,
)
from histopilot.serve.families import family_of

NO_API_KEY = "EMPTY"
"""What vLLM and most local servers accept when they were started without ``--api-key``."""


class OpenAIChatModel(ChatOpenAI):
    """``ChatOpenAI`` whose server failures are reported as actionable histopilot errors."""

    histopilot_role: str = ""

    @contextlib.contextmanager
    def _explained_errors(self) -> Iterator[None]:
        try:
            yield
        except openai.APITimeoutError as error:
            raise ModelUnavailableError(
                f"the model server at {self.openai_api_base} did not answer role "
                f"'{self.histopilot_role}' within {self.request_timeout} s (after "
                f"{self.max_retries} retries); raise roles.{self.histopilot_role}.timeout_s or "
                "lower max_tokens"
            ) from error
        except openai.LengthFinishReasonError as error:
            raise StructuredOutputError(
                f"role '{self.histopilot_role}' ran out of tokens before finishing its structured "
                f"answer; raise roles.{self.histopilot_role}.max_tokens"
            ) from error
        except openai.APIConnectionError as error:
            raise ModelUnavailableError(
                f"cannot reach the model server for role '{self.histopilot_role}' at "
                f"{self.openai_api_base} ({_reason(error)}, after {self.max_retries} retries). "
                "Start it with `histopilot serve-llm`, or set "
                f"roles.{self.histopilot_role}.base_url to a running server."
            ) from error
        except openai.NotFoundError as error:
            raise ModelUnavailableError(
                f"the server at {self.openai_api_base} does not serve model '{self.model_name}' "
                f"(role '{self.histopilot_role}'): {_server_message(error)}. Check the names it "
                "lists at /v1/models, or the role's model/adapter settings."
            ) from error
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise ModelUnavailableError(
                f"the server at {self.openai_api_base} rejected the API key for role "
                f"'{self.histopilot_role}' (HTTP {error.status_code}). Put the key in the "
                "environment variable named by the role's api_key_env."
            ) from error
        except openai.InternalServerError as error:
            raise ModelUnavailableError(
                f"the model server at {self.openai_api_base} failed (HTTP {error.status_code}) "
                f"after {self.max_retries} retries: {_server_message(error)}"
            ) from error
        except openai.APIStatusError as error:
            raise ModelRequestError(
                f"the model server at {self.openai_api_base} refused the request for role "
                f"'{self.histopilot_role}' (HTTP {error.status_code}): {_server_message(error)}"
            ) from error

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        with self._explained_errors():
            return super()._generate(*args, **kwargs)

    async def _agenerate(self, *args: Any, **kwargs: Any) -> ChatResult:
        with self._explained_errors():
            return await super()._agenerate(*args, **kwargs)

    def _stream(self, *args: Any, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        with self._explained_errors():
            yield from super()._stream(*args, **kwargs)

    async def _astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        with self._explained_errors():
            async for chunk in super()._astream(*args, **kwargs):
                yield chunk


def openai_chat_model(role: str, settings: RoleConfig) -> OpenAIChatModel:
    """The chat model for a role served by an OpenAI-compatible endpoint."""
    family = family_of(settings.model or "")
    extra_body: dict[str, Any] = {}
    if family.chat_template_kwargs:
        extra_body["chat_template_kwargs"] = dict(family.chat_template_kwargs)
    extra_body.update(settings.extra_body)
    return OpenAIChatModel(
        histopilot_role=role,
        model=settings.request_model,
        base_url=settings.base_url,
        api_key=os.environ.get(settings.api_key_env) or NO_API_KEY,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        seed=settings.seed,
        timeout=settings.timeout_s,
        max_retries=settings.max_retries,
        extra_body=extra_body or None,
    )


def _reason(error: openai.APIConnectionError) -> str:
    cause = error.__cause__
    return str(cause) if cause else "connection failed"


def _server_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        detail = body.get("message") or body.get("detail") or body.get("error")
        if isinstance(detail, dict):
            detail = detail.get("message")
        if detail:
            return str(detail)
    return error.message
