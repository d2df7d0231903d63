"""Measures whether the knowledge base finds a concept by a name it was not indexed under.

An ontology's exact synonyms are independent names for its terms ("hemangiosarcoma" for
angiosarcoma), written by curators rather than by us, so they make an honest test set for
free: index the ontology without its synonyms, ask for each synonym, and count how often the
term it belongs to comes back. The number tracks what users feel, since pathologists and
report text name the same entity in many ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from histopilot.errors import KnowledgeSourceError
from histopilot.retrieval.kb.embedder import DEFAULT_EMBEDDER
from histopilot.retrieval.kb.sources import live_terms, ontology_passages, read_ontology
from histopilot.retrieval.kb.store import KnowledgeBase, SearchMode


class SynonymRecall(BaseModel):
    """Recall@k of synonym queries, per search mode."""

    ontology: str = Field(description="File name of the ontology measured.")
    embedder: str
    terms: int = Field(description="Passages indexed (live terms).")
    queries: int = Field(description="Exact synonyms asked, each naming one term.")
    recall: dict[SearchMode, dict[int, float]] = Field(
        description="mode → k → share of queries whose term is among the first k hits."
    )

    def table(self) -> str:
        """The recalls as a Markdown table, one row per mode."""
        ks = sorted({k for by_k in self.recall.values() for k in by_k})
        lines = [
            f"synonym recall on {self.ontology} ({self.queries} queries, {self.terms} terms, "
            f"{self.embedder})",
            "| mode | " + " | ".join(f"recall@{k}" for k in ks) + " |",
            "| --- |" + " --- |" * len(ks),
        ]
        lines += [
            f"| {mode} | " + " | ".join(f"{by_k[k]:.3f}" for k in ks) + " |"
            for mode, by_k in self.recall.items()
        ]
        return "\n".join(lines)


def synonym_recall(
    obo_path: str | Path,
    *,
    embedder: str = DEFAULT_EMBEDDER,
    ks: Sequence[int] = (1, 5),
    modes: Sequence[SearchMode] = ("dense", "bm25", "hybrid"),
    workdir: str | Path,
) -> SynonymRecall:
    """Build a synonym-free knowledge base of ``obo_path`` in ``workdir`` and ask its synonyms.

    Only EXACT synonyms count (broader or related ones name other concepts), and a synonym
    that merely repeats the name in another case is skipped, since it tests nothing.
    """
    obo_path = Path(obo_path)
    ontology = read_ontology(obo_path)
    passages = ontology_passages(ontology, obo_path.name, include_synonyms=False)
    queries = sorted(
        {
            (synonym.description.strip(), term.id)
            for term in live_terms(ontology)
            for synonym in term.synonyms
            if synonym.scope == "EXACT"
            and synonym.description.strip().casefold() != term.name.strip().casefold()
        }
    )
    if not queries:
        raise KnowledgeSourceError(
            f"the ontology {obo_path} has no exact synonyms to ask; measure another ontology."
        )
    kb = KnowledgeBase.build(passages, Path(workdir) / "synonym-free-kb", embedder=embedder)
    texts = [text for text, _ in queries]
    recall: dict[SearchMode, dict[int, float]] = {}
    for mode in modes:
        hits = kb.query_many(texts, max(ks), mode=mode)
        found = [[hit.passage.id for hit in query_hits] for query_hits in hits]
        recall[mode] = {
            k: sum(term in ids[:k] for (_, term), ids in zip(queries, found, strict=True))
            / len(queries)
            for k in ks
        }
    return SynonymRecall(
        ontology=obo_path.name,
        embedder=embedder,
        terms=len(passages),
        queries=len(queries),
        recall=recall,
    )
