"""The knowledge base: definitions and criteria that agents can retrieve and cite.

It owns reading the sources (OBO ontologies, the OncoTree tumour tree, Markdown, text and PDF
documents) into citable passages, the text embedder, the on-disk hybrid index (dense vectors
plus BM25) with its search, and the synonym-recall measure of search quality.
"""

from histopilot.retrieval.kb.embedder import (
    DEFAULT_EMBEDDER,
    load_cross_encoder,
    load_text_embedder,
)
from histopilot.retrieval.kb.quality import SynonymRecall, synonym_recall
from histopilot.retrieval.kb.sources import (
    Passage,
    SourceRef,
    load_document,
    load_obo,
    load_oncotree,
    load_sources,
)
from histopilot.retrieval.kb.store import (
    KnowledgeBase,
    KnowledgeHit,
    KnowledgeManifest,
    SearchMode,
    tokenize,
)

__all__ = [
    "DEFAULT_EMBEDDER",
    "KnowledgeBase",
    "KnowledgeHit",
    "KnowledgeManifest",
    "Passage",
    "SearchMode",
    "SourceRef",
    "SynonymRecall",
    "load_cross_encoder",
    "load_document",
    "load_obo",
    "load_oncotree",
    "load_sources",
    "load_text_embedder",
    "synonym_recall",
    "tokenize",
]
