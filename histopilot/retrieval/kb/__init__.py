"""The knowledge base: ontologies, the OncoTree and documents as citable, searchable passages.

``sources`` turns files into ``Passage`` objects with their source; ``store`` indexes them for
hybrid (dense + BM25) search; ``embedder`` loads the sentence-transformers text model.
"""

from histopilot.retrieval.kb.embedder import load_text_embedder
from histopilot.retrieval.kb.sources import (
    Passage,
    SourceRef,
    load_document,
    load_obo,
    load_oncotree,
    load_sources,
)
from histopilot.retrieval.kb.store import KnowledgeBase, KnowledgeHit

__all__ = [
    "KnowledgeBase",
    "KnowledgeHit",
    "Passage",
    "SourceRef",
    "load_document",
    "load_obo",
    "load_oncotree",
    "load_sources",
    "load_text_embedder",
]
