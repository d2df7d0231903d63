"""The knowledge base on disk: passages, a dense index and a BM25 index that always agree.

A knowledge-base folder holds

- ``passages.sqlite``: every passage and its source, row ``i`` being passage ``i``;
- ``dense.faiss``: normalised embeddings of the passage texts under the same row ids;
- ``bm25/``: a ``bm25s`` word index whose document ``i`` is again passage ``i``;
- ``manifest.json``: format version, embedder, dimension, count and a summary of sources.

Dense search finds paraphrases ("cancer of the blood vessel lining" → angiosarcoma); BM25
finds rare exact words that embeddings blur (codes, acronyms, gene names). Hybrid search
fuses the two rankings. The folder is written atomically and checked for agreement on open,
so a half-built or mismatched knowledge base is refused rather than silently wrong.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from histopilot.errors import KnowledgeSourceError, SearchIndexError
from histopilot.retrieval.kb.embedder import (
    DEFAULT_EMBEDDER,
    load_cross_encoder,
    load_text_embedder,
)
from histopilot.retrieval.kb.sources import Passage, SourceRef
from histopilot.retrieval.vectors import build_faiss_index, read_index, search, write_index
from histopilot.storage import atomic_directory, check_new_output_folder

if TYPE_CHECKING:
    import faiss
    from sentence_transformers import SentenceTransformer

SearchMode = Literal["hybrid", "dense", "bm25"]
#: Row id → (1-based rank, score) for the candidates of one ranking.
Ranking = dict[int, tuple[int, float]]
#: Bump when the folder layout, the table or the tokenisation changes: an index built one way
#: and queried another returns plausible nonsense, so old folders are refused instead.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PASSAGES_DB = "passages.sqlite"
DENSE_INDEX = "dense.faiss"
BM25_DIR = "bm25"
#: Reciprocal rank fusion constant from Cormack, Clarke & Büttcher (SIGIR 2009), "Reciprocal
#: rank fusion outperforms Condorcet and individual rank learning methods": 60 damps the
#: weight of the very first ranks so that agreement between lists counts for more.
RRF_K = 60
#: Each list contributes at least this many candidates to the fusion (or 5 per hit asked for):
#: a passage ranked 30th by one method and 2nd by the other should still be found.
MIN_CANDIDATES = 50
CANDIDATES_PER_HIT = 5

#: A passage's title (term name, tumour type, section heading) is indexed this many extra
#: times: the classic approximation of BM25F field weights (Robertson, Zaragoza & Taylor,
#: CIKM 2004), because a word in the name says more about a passage than one in its body.
TITLE_REPEATS = 3
#: Words longer than this also index their first ``PREFIX_LENGTH`` letters, a crude stemmer
#: that needs no dictionary: "ovary"/"ovarian", "prostate"/"prostatic" and "endometrium"/
#: "endometrial" then share a token, while the full word still scores higher for an exact match.
PREFIX_LENGTH = 4

_WORD = re.compile(r"[^\W_]+")
_HYPHENATED = re.compile(r"[^\W_]+(?:-[^\W_]+)+")
_STOPWORDS = frozenset(STOPWORDS_EN)
#: British spellings folded to American ones; the ontologies and reports mix both
#: ("tumour", "oesophageal", "haemangioma", "paediatric", "leukaemia").
_SPELLING = (
    (re.compile(r"ae"), "e"),
    (re.compile(r"^oe"), "e"),
    (re.compile(r"(?<=[lmvi])our$"), "or"),
)
_COLUMNS = (
    "row_id, id, title, text, kind, file, ontology_id, code, xrefs, page, char_start, char_end"
)


class KnowledgeHit(BaseModel):
    """One retrieved passage with its place in each ranking (1-based; None: not in that list)."""

    model_config = ConfigDict(frozen=True)

    passage: Passage
    score: float = Field(
        description="Hybrid: fused reciprocal-rank score; dense: cosine; bm25: BM25 score; "
        "with a reranker: the cross-encoder's score."
    )
    rank: int = Field(ge=1)
    dense_rank: int | None = Field(None, ge=1)
    bm25_rank: int | None = Field(None, ge=1)


class KnowledgeManifest(BaseModel):
    """What a knowledge-base folder holds and how it was built."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    embedder: str = Field(description="Text embedder of the passages; queries must use it too.")
    dim: int = Field(gt=0)
    count: int = Field(gt=0)
    created: datetime
    sources: dict[str, int] = Field(description="Passages per source file.")
    kinds: dict[str, int] = Field(description="Passages per source kind.")


def tokenize(text: str) -> list[str]:
    """BM25 tokens: lower-case letter/digit runs minus English stopwords, normalised.

    Tokens with a digit ("t1c", "her2", "9120", "c3088") are kept exactly as written. Words
    lose a plural "s", are folded to American spelling and add a prefix token (see
    ``PREFIX_LENGTH``). Hyphens split words and the joined form is kept too, so "non-small"
    matches "non small" and "nonsmall".
    """
    folded = text.casefold()
    words = _WORD.findall(folded) + [
        "".join(_WORD.findall(compound)) for compound in _HYPHENATED.findall(folded)
    ]
    tokens = []
    for word in words:
        if word in _STOPWORDS:
            continue
        if any(character.isdigit() for character in word):
            tokens.append(word)
            continue
        word = _american(_singular(word))
        tokens.append(word)
        if len(word) > PREFIX_LENGTH:
            tokens.append(f"{word[:PREFIX_LENGTH]}~")
    return tokens


def _american(word: str) -> str:
    for pattern, replacement in _SPELLING:
        word = pattern.sub(replacement, word)
    return word


def _singular(word: str) -> str:
    """Harman's "S" stemmer (JASIS 1991), also sparing "-is" ("metastasis", "fibrosis")."""
    if len(word) <= 3:
        return word
    if word.endswith("ies") and not word.endswith(("eies", "aies")):
        return f"{word[:-3]}y"
    if word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if word.endswith("s") and not word.endswith(("us", "ss", "is")):
        return word[:-1]
    return word


def _index_tokens(passage: Passage) -> list[str]:
    return tokenize(passage.text) + tokenize(passage.title) * TITLE_REPEATS


class KnowledgeBase:
    """A built knowledge-base folder, opened for search."""

    def __init__(
        self,
        path: Path,
        manifest: KnowledgeManifest,
        dense: faiss.Index,
        bm25: bm25s.BM25,
        *,
        reranker: str | None = None,
        device: str | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self._dense = dense
        self._bm25 = bm25
        self.reranker = reranker
        self.device = device

    def __len__(self) -> int:
        return self.manifest.count

    # --- Building -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        passages: Iterable[Passage],
        out: str | Path,
        *,
        embedder: str = DEFAULT_EMBEDDER,
        batch_size: int = 64,
        progress: Callable[[int, int], None] | None = None,
        device: str | None = None,
    ) -> KnowledgeBase:
        """Index ``passages`` into the folder ``out`` (replacing it only once complete).

        ``progress`` is called with (passages embedded, total) after each batch.
        """
        model = load_text_embedder(embedder, device)
        out = Path(out).expanduser()
        check_new_output_folder(out, what="knowledge base", replaceable_marker=MANIFEST)
        with atomic_directory(out) as folder:
            rows = list(passages)
            if not rows:
                raise KnowledgeSourceError(
                    f"no passages to index into {out}; give at least one ontology, OncoTree tree "
                    "or document with text."
                )
            _check_unique(rows)
            vectors = _embed(model, [row.text for row in rows], batch_size, progress)
            ids = np.arange(len(rows), dtype=np.int64)
            write_index(build_faiss_index(vectors, ids, kind="flat"), folder / DENSE_INDEX)
            _write_passages(folder / PASSAGES_DB, rows)
            _write_bm25(folder / BM25_DIR, rows)
            manifest = KnowledgeManifest(
                format_version=FORMAT_VERSION,
                embedder=embedder,
                dim=vectors.shape[1],
                count=len(rows),
                created=datetime.now(UTC),
                sources=_counts(row.source.file for row in rows),
                kinds=_counts(row.source.kind for row in rows),
            )
            (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        return cls.open(out, device=device)

    # --- Opening --------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | Path, *, reranker: str | None = None, device: str | None = None
    ) -> KnowledgeBase:
        """Open a folder written by ``build``, refusing one whose parts disagree.

        ``reranker`` names a sentence-transformers cross-encoder that re-scores the fused
        candidates of every query; it is loaded at the first query that uses it.
        """
        path = Path(path).expanduser()
        if not path.is_dir():
            raise SearchIndexError(
                f"no knowledge base at {path}; build one with `histopilot kb build`."
            )
        manifest = _read_manifest(path)
        missing = [
            name for name in (PASSAGES_DB, DENSE_INDEX, BM25_DIR) if not (path / name).exists()
        ]
        if missing:
            raise _corrupt(path, f"{', '.join(missing)} missing")
        rows = _count_rows(path)
        try:
            dense = read_index(path / DENSE_INDEX)
        except SearchIndexError as error:
            raise _corrupt(path, f"{DENSE_INDEX} does not load") from error
        bm25 = _read_bm25(path)
        counts = {
            "manifest": manifest.count,
            PASSAGES_DB: rows,
            DENSE_INDEX: dense.ntotal,
            BM25_DIR: bm25.scores["num_docs"],
        }
        if len(set(counts.values())) != 1:
            detail = ", ".join(f"{name}: {count}" for name, count in counts.items())
            raise _corrupt(path, f"its parts hold different numbers of passages ({detail})")
        if dense.d != manifest.dim:
            raise _corrupt(path, f"{DENSE_INDEX} holds {dense.d}-d vectors, not {manifest.dim}-d")
        return cls(path, manifest, dense, bm25, reranker=reranker, device=device)

    # --- Searching ------------------------------------------------------------------------

    def query(
        self,
        text: str,
        k: int = 5,
        *,
        mode: SearchMode = "hybrid",
        reranker: str | None = None,
    ) -> list[KnowledgeHit]:
        """The ``k`` passages that best answer ``text``, best first.

        Hybrid fuses the dense and BM25 rankings by reciprocal rank; ``reranker`` (or the one
        given to ``open``) then re-scores the fused candidates with a cross-encoder.
        """
        return self.query_many([text], k, mode=mode, reranker=reranker)[0]

    def query_many(
        self,
        texts: Sequence[str],
        k: int = 5,
        *,
        mode: SearchMode = "hybrid",
        reranker: str | None = None,
    ) -> list[list[KnowledgeHit]]:
        """``query`` for each of ``texts``, embedding them in batches (evaluations ask 1000s)."""
        if not texts:
            return []
        if any(not text or not text.strip() for text in texts):
            raise SearchIndexError("a knowledge-base query is empty; ask with some words.")
        if k < 1:
            raise SearchIndexError(f"asked for {k} hits; ask for at least 1.")
        if mode not in ("hybrid", "dense", "bm25"):
            raise SearchIndexError(f"unknown search mode {mode!r}; use hybrid, dense or bm25.")
        depth = min(len(self), max(MIN_CANDIDATES, CANDIDATES_PER_HIT * k))
        dense = self._dense_rankings(texts, depth) if mode != "bm25" else [{} for _ in texts]
        bm25 = [self._bm25_ranking(text, depth) if mode != "dense" else {} for text in texts]
        cross_encoder = reranker or self.reranker
        with closing(_connect(self.path / PASSAGES_DB)) as connection:
            return [
                self._hits(connection, text, k, mode, dense_ranks, bm25_ranks, cross_encoder)
                for text, dense_ranks, bm25_ranks in zip(texts, dense, bm25, strict=True)
            ]

    def _hits(
        self,
        connection: sqlite3.Connection,
        text: str,
        k: int,
        mode: SearchMode,
        dense: Ranking,
        bm25: Ranking,
        cross_encoder: str | None,
    ) -> list[KnowledgeHit]:
        if mode == "hybrid":
            scores = _reciprocal_rank_fusion(dense, bm25)
        else:
            scores = {row: score for row, (_, score) in (dense or bm25).items()}
        order = sorted(scores, key=lambda row: (-scores[row], row))
        passages = _passages(connection, order if cross_encoder else order[:k])
        if cross_encoder:
            scores = self._rerank(cross_encoder, text, passages)
            order = sorted(scores, key=lambda row: (-scores[row], row))
        return [
            KnowledgeHit(
                passage=passages[row],
                score=float(scores[row]),
                rank=rank,
                dense_rank=dense[row][0] if row in dense else None,
                bm25_rank=bm25[row][0] if row in bm25 else None,
            )
            for rank, row in enumerate(order[:k], 1)
        ]

    def _dense_rankings(self, texts: Sequence[str], depth: int) -> list[Ranking]:
        model = load_text_embedder(self.manifest.embedder, self.device)
        vectors = model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False)
        scores, ids = search(self._dense, vectors, depth)
        return [
            {
                int(row): (rank, float(score))
                for rank, (row, score) in enumerate(zip(row_ids, row_scores, strict=True), 1)
                if row >= 0
            }
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    def _bm25_ranking(self, text: str, depth: int) -> Ranking:
        token_ids = self._bm25.get_tokens_ids(tokenize(text))
        if not token_ids:
            return {}
        scores = self._bm25.get_scores_from_ids(token_ids)
        top = np.argsort(-scores, kind="stable")[:depth]
        # A passage that shares no word with the query has no BM25 rank at all.
        top = top[scores[top] > 0]
        return {int(row): (rank, float(scores[row])) for rank, row in enumerate(top, 1)}

    def _rerank(self, name: str, text: str, passages: dict[int, Passage]) -> dict[int, float]:
        model = load_cross_encoder(name, self.device)
        rows = list(passages)
        scores = model.predict(
            [(text, passages[row].text) for row in rows], show_progress_bar=False
        )
        return {row: float(score) for row, score in zip(rows, np.ravel(scores), strict=True)}


# --- Building blocks ----------------------------------------------------------------------


def _passages(connection: sqlite3.Connection, rows: list[int]) -> dict[int, Passage]:
    if not rows:
        return {}
    marks = ", ".join("?" * len(rows))
    records = connection.execute(
        f"SELECT {_COLUMNS} FROM passages WHERE row_id IN ({marks})", rows
    ).fetchall()
    return {record[0]: _passage_from_record(record) for record in records}


def _check_unique(rows: list[Passage]) -> None:
    duplicates = [key for key, count in Counter(row.id for row in rows).items() if count > 1]
    if duplicates:
        raise KnowledgeSourceError(
            f"{len(duplicates)} passage id(s) occur more than once ({', '.join(duplicates[:5])}); "
            "load the sources with load_sources, which keeps one passage per id."
        )


def _embed(
    model: SentenceTransformer,
    texts: list[str],
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> np.ndarray:
    """Embeddings in input order, computed over texts sorted by length.

    A batch is padded to its longest text, so batching similar lengths together roughly
    halves the work on a mix of short terms and long document chunks.
    """
    batch_size = max(1, batch_size)
    order = np.argsort([len(text) for text in texts], kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        batches.append(
            model.encode(
                [texts[index] for index in batch],
                batch_size=len(batch),
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        )
        if progress is not None:
            progress(start + len(batch), len(texts))
    stacked = np.concatenate(batches)
    vectors = np.empty_like(stacked, dtype=np.float32)
    vectors[order] = stacked
    return vectors


def _write_passages(path: Path, rows: list[Passage]) -> None:
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(
            "CREATE TABLE passages (row_id INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
            "title TEXT NOT NULL, text TEXT NOT NULL, kind TEXT NOT NULL, file TEXT NOT NULL, "
            "ontology_id TEXT, code TEXT, xrefs TEXT NOT NULL, page INTEGER, "
            "char_start INTEGER, char_end INTEGER)"
        )
        connection.executemany(
            f"INSERT INTO passages ({_COLUMNS}) VALUES ({', '.join('?' * 12)})",
            (
                (
                    row_id,
                    row.id,
                    row.title,
                    row.text,
                    row.source.kind,
                    row.source.file,
                    row.source.ontology_id,
                    row.source.code,
                    json.dumps(row.source.xrefs),
                    row.source.page,
                    row.source.char_start,
                    row.source.char_end,
                )
                for row_id, row in enumerate(rows)
            ),
        )


def _passage_from_record(record: tuple) -> Passage:
    _, passage_id, title, text, kind, file, ontology_id, code, xrefs, page, start, end = record
    return Passage(
        id=passage_id,
        title=title,
        text=text,
        source=SourceRef(
            kind=kind,
            file=file,
            ontology_id=ontology_id,
            code=code,
            xrefs=json.loads(xrefs),
            page=page,
            char_start=start,
            char_end=end,
        ),
    )


def _write_bm25(folder: Path, rows: list[Passage]) -> None:
    index = bm25s.BM25()
    index.index([_index_tokens(row) for row in rows], show_progress=False)
    index.save(str(folder), show_progress=False)


def _reciprocal_rank_fusion(*rankings: Ranking) -> dict[int, float]:
    fused: dict[int, float] = {}
    for ranking in rankings:
        for row, (rank, _) in ranking.items():
            fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank)
    return fused


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


# --- Reading and checking -----------------------------------------------------------------


def _corrupt(path: Path, detail: str) -> SearchIndexError:
    return SearchIndexError(
        f"the knowledge base at {path} is corrupt ({detail}); rebuild it with "
        "`histopilot kb build`."
    )


def _read_manifest(path: Path) -> KnowledgeManifest:
    try:
        manifest = KnowledgeManifest.model_validate_json((path / MANIFEST).read_bytes())
    except FileNotFoundError as error:
        raise _corrupt(path, f"{MANIFEST} missing") from error
    except (OSError, ValidationError) as error:
        raise _corrupt(path, f"{MANIFEST} unreadable") from error
    if manifest.format_version != FORMAT_VERSION:
        raise SearchIndexError(
            f"the knowledge base at {path} has format {manifest.format_version}, this version "
            f"of histopilot reads format {FORMAT_VERSION}; rebuild it with `histopilot kb build`."
        )
    return manifest


def _connect(path: Path) -> sqlite3.Connection:
    # Read-only: searching must never modify (or create) the table.
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _count_rows(path: Path) -> int:
    try:
        with closing(_connect(path / PASSAGES_DB)) as connection:
            return connection.execute("SELECT COUNT(*) FROM passages").fetchone()[0]
    except sqlite3.Error as error:
        raise _corrupt(path, f"{PASSAGES_DB} unreadable: {error}") from error


def _read_bm25(path: Path) -> bm25s.BM25:
    try:
        return bm25s.BM25.load(str(path / BM25_DIR), show_progress=False)
    except (OSError, EOFError, ValueError, KeyError) as error:
        raise _corrupt(path, f"{BM25_DIR} does not load") from error
