"""Retrieval as LangChain tools: the agents' way to find similar tissue and cite knowledge.

``retrieval_tools`` binds the run's patch index, encoder and knowledge base (run-scoped
dependencies, never graph state) to three tools with Pydantic inputs. Each tool answers with
compact JSON for the model and keeps the full Pydantic result as the message's artifact, so the
graph can cite regions and sources without parsing text.
"""

from __future__ import annotations

from pathlib import Path

from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, Field

from histopilot.errors import HistopilotError
from histopilot.retrieval.encoders.base import PatchEncoder
from histopilot.retrieval.features import embed_slide
from histopilot.retrieval.kb.store import KnowledgeBase, KnowledgeHit
from histopilot.retrieval.patch_index import PatchHit, PatchIndex
from histopilot.retrieval.search import (
    PatchQuery,
    SlideHit,
    query_vectors,
    search_patches,
    search_slides,
)
from histopilot.slide import open_slide


class SimilarPatchesInput(PatchQuery):
    """Find indexed patches that look like an image, a slide region or a description."""

    k: int = Field(5, ge=1, le=50, description="How many patches to return.")


class SimilarPatchesResult(BaseModel):
    hits: list[PatchHit]


class SimilarSlidesInput(BaseModel):
    """Find indexed slides that resemble a whole slide."""

    slide_path: str = Field(description="The slide to find similar cases for.")
    k: int = Field(5, ge=1, le=50, description="How many slides to return.")


class SimilarSlidesResult(BaseModel):
    slides: list[SlideHit]


class KnowledgeInput(BaseModel):
    """Look up definitions, synonyms and classification of a disease or tumour type."""

    query: str = Field(min_length=1, description="What to look up, in words.")
    k: int = Field(5, ge=1, le=20, description="How many passages to return.")


class KnowledgeResult(BaseModel):
    passages: list[KnowledgeHit]


def retrieval_tools(
    *,
    patch_index: PatchIndex | None = None,
    encoder: PatchEncoder | None = None,
    knowledge: KnowledgeBase | None = None,
) -> list[BaseTool]:
    """The tools the given resources support: patch and slide search need an index and the
    encoder it was built with; knowledge search needs a knowledge base."""
    tools: list[BaseTool] = []
    if patch_index is not None and encoder is not None:
        if encoder.name != patch_index.encoder:
            raise HistopilotError(
                f"the patch index uses the encoder {patch_index.encoder!r}, not {encoder.name!r}."
            )
        tools += [_patch_tool(patch_index, encoder), _slide_tool(patch_index, encoder)]
    if knowledge is not None:
        tools.append(_knowledge_tool(knowledge))
    return tools


def structured_tool(function, name: str, schema: type[BaseModel]) -> StructuredTool:
    """A tool that returns (compact JSON for the model, the Pydantic result as artifact);
    a user-facing error becomes the tool's answer so the agent can recover."""

    def run(**arguments) -> tuple[str, BaseModel | None]:
        try:
            result = function(schema(**arguments))
        except HistopilotError as error:
            return f"error: {error}", None
        return result.model_dump_json(exclude_none=True), result

    return StructuredTool.from_function(
        func=run,
        name=name,
        description=schema.__doc__.strip(),
        args_schema=schema,
        response_format="content_and_artifact",
        handle_validation_error=_explain_invalid_arguments,
    )


def _explain_invalid_arguments(error: Exception) -> str:
    """Invalid arguments go back to the model as text it can act on."""
    return f"error: invalid arguments: {error}"


def _patch_tool(index: PatchIndex, encoder: PatchEncoder) -> StructuredTool:
    def find(request: SimilarPatchesInput) -> SimilarPatchesResult:
        index.require_entries()
        queries = query_vectors(request, encoder)
        return SimilarPatchesResult(hits=search_patches(index, queries, request.k))

    return structured_tool(find, "search_similar_patches", SimilarPatchesInput)


def _slide_tool(index: PatchIndex, encoder: PatchEncoder) -> StructuredTool:
    def find(request: SimilarSlidesInput) -> SimilarSlidesResult:
        index.require_entries()
        with open_slide(Path(request.slide_path)) as slide:
            features = embed_slide(slide, encoder)
        return SimilarSlidesResult(slides=search_slides(index, features, k=request.k))

    return structured_tool(find, "search_similar_slides", SimilarSlidesInput)


def _knowledge_tool(knowledge: KnowledgeBase) -> StructuredTool:
    def find(request: KnowledgeInput) -> KnowledgeResult:
        return KnowledgeResult(passages=knowledge.query(request.query, request.k))

    return structured_tool(find, "search_knowledge", KnowledgeInput)
