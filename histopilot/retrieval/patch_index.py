"""A patch index on disk: FAISS vectors plus a SQLite table saying where each patch came from.

Layout of an index folder::

    manifest.json     encoder name, dimension, index kind, patch count
    metadata.sqlite   one row per patch: slide id and path, level-0 x/y and size, µm/px,
                      optional label and caption, and the vector itself
    vectors.faiss     the search structure, keyed by the row ids

SQLite is the source of truth: it holds every vector, so the FAISS file can always be rebuilt
from it (``rebuild``), switched to another kind, or checked against it. A write commits the
table first, then replaces the FAISS file and the manifest atomically; ``open`` compares the
three counts, so an interrupted write is reported (with the command that repairs it) instead of
silently serving a stale or half-updated index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from pydantic import BaseModel, Field

from histopilot.errors import SearchIndexError
from histopilot.retrieval.features import SlideFeatures
from histopilot.retrieval.storage import atomic_file
from histopilot.retrieval.vectors import (
    IVF_MIN_TRAIN,
    IndexKind,
    build_faiss_index,
    index_kind,
    normalized,
    read_index,
    search,
    supports_removal,
    write_index,
)

INDEX_FORMAT = 1
MANIFEST, METADATA, VECTORS = "manifest.json", "metadata.sqlite", "vectors.faiss"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patches (
    id INTEGER PRIMARY KEY,
    slide_id TEXT NOT NULL,
    slide_path TEXT NOT NULL,
    x INTEGER NOT NULL,
    y INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mpp REAL,
    label TEXT,
    caption TEXT,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS patches_slide ON patches (slide_id);
"""
_FIELDS = ("slide_id", "slide_path", "x", "y", "size", "mpp", "label", "caption")


class PatchRecord(BaseModel):
    """Where a patch comes from: enough to read it again from its slide."""

    slide_id: str
    slide_path: str
    x: int = Field(description="level-0 x of the top-left corner")
    y: int = Field(description="level-0 y of the top-left corner")
    size: int = Field(description="side length in level-0 pixels")
    mpp: float | None = Field(None, description="µm per pixel the patch was embedded at")
    label: str | None = None
    caption: str | None = None


class PatchHit(PatchRecord):
    """A search result: the patch, its cosine similarity to the query and its rank (1 = best)."""

    id: int
    score: float
    rank: int


class IndexManifest(BaseModel):
    format: int = INDEX_FORMAT
    encoder: str
    dim: int
    kind: IndexKind
    count: int
    updated: str


class SlideEntry(BaseModel):
    """A slide in the index and how many of its patches are there."""

    slide_id: str
    slide_path: str
    patches: int
    label: str | None


class PatchIndex:
    """Add, remove, search and rebuild patch embeddings with their metadata."""

    def __init__(self, path: Path, manifest: IndexManifest, index: faiss.Index) -> None:
        self.path, self.manifest, self._index = path, manifest, index

    # -- life cycle ----------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | Path, *, encoder: str, dim: int, kind: IndexKind = "flat"
    ) -> PatchIndex:
        """A new, empty index folder (refused if one is already there)."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise SearchIndexError(
                f"{path} already holds an index; add to it with `histopilot index add`, or "
                "choose another folder."
            )
        path.mkdir(parents=True, exist_ok=True)
        manifest = IndexManifest(encoder=encoder, dim=dim, kind=kind, count=0, updated=_now())
        with closing(_connect(path)) as db:
            db.executescript(_SCHEMA)
        empty = np.zeros((0, dim), np.float32)
        index = cls(path, manifest, build_faiss_index(empty, kind=_structure_kind(kind, 0)))
        index._save_search_structure()
        return index

    @classmethod
    def open(cls, path: str | Path, *, check: bool = True) -> PatchIndex:
        """Open an index; with ``check``, its three parts must agree."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise SearchIndexError(
                f"no patch index at {path} (no {MANIFEST}); build one with "
                "`histopilot index build SLIDES... --out INDEX`."
            )
        try:
            manifest = IndexManifest.model_validate_json(manifest_path.read_text("utf-8"))
        except ValueError as error:
            raise SearchIndexError(
                f"{manifest_path} is corrupt ({error.__class__.__name__}); rebuild it with "
                f"`histopilot index rebuild {path}`."
            ) from error
        if not (path / METADATA).is_file():
            raise SearchIndexError(f"the metadata table {path / METADATA} is missing.")
        index = cls(path, manifest, read_index(path / VECTORS) if check else faiss.IndexFlatIP(1))
        if check:
            index._check_consistent()
        return index

    def _check_consistent(self) -> None:
        rows = self._count_rows()
        if not (rows == self._index.ntotal == self.manifest.count):
            raise SearchIndexError(
                f"the index at {self.path} is inconsistent: {rows} metadata rows, "
                f"{self._index.ntotal} vectors in {VECTORS}, {self.manifest.count} in the "
                f"manifest (an interrupted write?); repair it with "
                f"`histopilot index rebuild {self.path}` (no data is lost: the metadata table "
                "holds every vector)."
            )
        if self._index.d != self.manifest.dim:
            raise SearchIndexError(
                f"{VECTORS} holds {self._index.d}-d vectors but the manifest says "
                f"{self.manifest.dim}; rebuild with `histopilot index rebuild {self.path}`."
            )

    # -- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.count

    @property
    def encoder(self) -> str:
        return self.manifest.encoder

    def info(self) -> dict:
        """A JSON-ready summary: the manifest, the structure searched now and the slides."""
        return self.manifest.model_dump() | {
            "path": str(self.path),
            "search_structure": index_kind(self._index),
            "slides": [entry.model_dump() for entry in self.slides()],
        }

    def slides(self) -> list[SlideEntry]:
        """Every slide in the index, with its patch count and most common patch label."""
        query = """
            SELECT slide_id, slide_path, COUNT(*),
                   (SELECT label FROM patches p2 WHERE p2.slide_id = p.slide_id
                    AND label IS NOT NULL GROUP BY label ORDER BY COUNT(*) DESC LIMIT 1)
            FROM patches p GROUP BY slide_id ORDER BY slide_id
        """
        with self._db() as db:
            rows = db.execute(query).fetchall()
        return [SlideEntry(slide_id=a, slide_path=b, patches=c, label=d) for a, b, c, d in rows]

    def search(
        self, queries: np.ndarray, k: int = 10, *, exclude_slide: str | None = None
    ) -> list[list[PatchHit]]:
        """The ``k`` most similar patches to each query vector, best first, optionally
        leaving out one slide's patches (a slide should not find itself)."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if self.manifest.count == 0:
            raise SearchIndexError(
                f"the index at {self.path} is empty; add slides with `histopilot index add`."
            )
        if queries.shape[1] != self.manifest.dim:
            raise SearchIndexError(
                f"the query has {queries.shape[1]} dimensions but the index at {self.path} "
                f"holds {self.manifest.dim}-d vectors from the encoder "
                f"{self.manifest.encoder!r}; search with that encoder."
            )
        excluded = self._slide_ids(exclude_slide) if exclude_slide else None
        scores, ids = search(self._index, queries, k, exclude=excluded)
        records = self._records(ids[ids >= 0])
        return [
            [
                PatchHit(id=int(i), score=float(s), rank=rank, **records[int(i)])
                for rank, (s, i) in enumerate(
                    ((s, i) for s, i in zip(row_scores, row_ids, strict=True) if i >= 0), 1
                )
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of patches ``ids`` (e.g. to search for more like a hit)."""
        wanted = [int(i) for i in ids]
        with self._db() as db:
            rows = dict(
                db.execute(
                    f"SELECT id, vector FROM patches WHERE id IN ({', '.join('?' * len(wanted))})",
                    wanted,
                ).fetchall()
            )
        missing = [i for i in wanted if i not in rows]
        if missing:
            raise SearchIndexError(f"no patches with ids {missing} in {self.path}.")
        return np.stack([np.frombuffer(rows[i], dtype=np.float32) for i in wanted])

    def _slide_ids(self, slide_id: str) -> np.ndarray:
        with self._db() as db:
            rows = db.execute("SELECT id FROM patches WHERE slide_id = ?", (slide_id,))
            return np.fromiter((row[0] for row in rows), dtype=np.int64)

    def _records(self, ids: np.ndarray) -> dict[int, dict]:
        unique = sorted({int(i) for i in ids})
        with self._db() as db:
            rows = db.execute(
                f"SELECT id, {', '.join(_FIELDS)} FROM patches WHERE id IN "
                f"({', '.join('?' * len(unique))})",
                unique,
            ).fetchall()
        return {row[0]: dict(zip(_FIELDS, row[1:], strict=True)) for row in rows}

    # -- writing -------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, records: Sequence[PatchRecord]) -> np.ndarray:
        """Store ``records`` with their ``vectors``; returns the new row ids."""
        vectors = normalized(vectors)
        if len(vectors) != len(records):
            raise SearchIndexError(f"{len(vectors)} vectors for {len(records)} records.")
        if vectors.shape[1] != self.manifest.dim:
            raise SearchIndexError(
                f"these vectors have {vectors.shape[1]} dimensions but the index at "
                f"{self.path} holds {self.manifest.dim}-d vectors from the encoder "
                f"{self.manifest.encoder!r}; embed with that encoder or build a new index."
            )
        with self._db() as db:
            start = db.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM patches").fetchone()[0]
            ids = np.arange(start, start + len(records), dtype=np.int64)
            db.executemany(
                f"INSERT INTO patches (id, {', '.join(_FIELDS)}, vector) "
                f"VALUES (?, {', '.join('?' * len(_FIELDS))}, ?)",
                (
                    (int(i), *(getattr(record, f) for f in _FIELDS), vector.tobytes())
                    for i, record, vector in zip(ids, records, vectors, strict=True)
                ),
            )
        if index_kind(self._index) != _structure_kind(self.manifest.kind, len(self) + len(ids)):
            self.rebuild()  # enough vectors now to train the configured kind
        else:
            self._index.add_with_ids(vectors, ids)
            self._save_search_structure()
        return ids

    def add_slide(self, slide: SlideFeatures, *, label: str | None = None) -> int:
        """Add (or replace) every patch of one slide; returns how many were added."""
        if slide.encoder != self.manifest.encoder:
            raise SearchIndexError(
                f"{slide.slide_id} was embedded with {slide.encoder!r} but the index at "
                f"{self.path} uses {self.manifest.encoder!r}; embed it with that encoder."
            )
        self.remove_slide(slide.slide_id)
        records = [
            PatchRecord(
                slide_id=slide.slide_id,
                slide_path=slide.slide_path,
                x=int(x),
                y=int(y),
                size=slide.size_level0,
                mpp=slide.mpp,
                label=label,
            )
            for x, y in slide.coords
        ]
        if records:
            self.add(slide.features, records)
        return len(records)

    def remove_slide(self, slide_id: str) -> int:
        """Remove every patch of ``slide_id``; returns how many were removed."""
        ids = self._slide_ids(slide_id)
        with self._db() as db:
            db.execute("DELETE FROM patches WHERE slide_id = ?", (slide_id,))
        if len(ids) == 0:
            return 0
        if supports_removal(self._index):
            self._index.remove_ids(ids)
            self._save_search_structure()
        else:
            self.rebuild()
        return len(ids)

    def rebuild(self, kind: IndexKind | None = None) -> None:
        """Rebuild the search structure from the metadata table (optionally as another kind)."""
        kind = kind or self.manifest.kind
        with self._db() as db:
            rows = db.execute("SELECT id, vector FROM patches ORDER BY id").fetchall()
        ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32)
        vectors = vectors.reshape(len(rows), self.manifest.dim)
        self._index = build_faiss_index(vectors, ids, kind=_structure_kind(kind, len(rows)))
        self.manifest = self.manifest.model_copy(update={"kind": kind})
        self._save_search_structure()

    def _save_search_structure(self) -> None:
        write_index(self._index, self.path / VECTORS)
        self.manifest = self.manifest.model_copy(
            update={"count": int(self._index.ntotal), "updated": _now()}
        )
        with atomic_file(self.path / MANIFEST) as tmp:
            tmp.write_text(self.manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")

    def _count_rows(self) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM patches").fetchone()[0]

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction: committed on success, rolled back on error."""
        try:
            connection = _connect(self.path)
            with closing(connection), connection:
                yield connection
        except sqlite3.DatabaseError as error:
            raise SearchIndexError(
                f"the metadata table {self.path / METADATA} cannot be read ({error}); restore "
                "it from a backup or rebuild the index from its slides."
            ) from error


def _structure_kind(kind: IndexKind, count: int) -> IndexKind:
    """IVF-PQ needs enough vectors to train its codebooks; until then the index stays exact."""
    return "flat" if kind == "ivfpq" and count < IVF_MIN_TRAIN else kind


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path / METADATA)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
