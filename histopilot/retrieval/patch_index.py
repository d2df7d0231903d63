"""A patch index on disk: FAISS vectors plus a SQLite table saying where each patch came from.

Layout of an index folder::

    manifest.json     encoder name, dimension, index kind, patch count
    metadata.sqlite   one row per patch: slide id and path, level-0 x/y and size, µm/px,
                      optional label and caption, and the vector itself
    vectors.faiss     the search structure, keyed by the row ids (a folder of shard files
                      when the index is sharded)

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
from filelock import FileLock, Timeout
from pydantic import BaseModel, Field

from histopilot.errors import SearchIndexError
from histopilot.retrieval.features import SlideFeatures
from histopilot.retrieval.vectors import (
    IVF_MIN_TRAIN,
    IndexKind,
    add_vectors,
    build_faiss_index,
    checked_kind,
    forget_gpu_copy,
    index_kind,
    normalized,
    read_index,
    remove_vectors,
    search,
    shard_count,
    supports_removal,
    write_index,
)
from histopilot.storage import atomic_file

INDEX_FORMAT = 1
MANIFEST, METADATA, VECTORS = "manifest.json", "metadata.sqlite", "vectors.faiss"
LOCK = ".write.lock"
#: More shards than this buys nothing: each shard is searched by its own thread or GPU.
MAX_SHARDS = 64

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
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: Ids per ``IN (…)`` query: well under SQLite's limit on bound variables in every build.
SQL_CHUNK = 500
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
    shards: int = Field(1, ge=1)
    count: int
    updated: str


class SlideEntry(BaseModel):
    """A slide in the index and how many of its patches are there."""

    slide_id: str
    slide_path: str
    patches: int
    label: str | None


class PatchIndex:
    """Add, remove, search and rebuild patch embeddings with their metadata.

    The metadata table is the source of truth, down to the encoder and dimension (kept in its
    ``settings`` table), so ``rebuild`` can regenerate the other two files from it alone.
    """

    def __init__(self, path: Path, manifest: IndexManifest, index: faiss.Index) -> None:
        self.path, self.manifest, self._index = path, manifest, index
        self._saving_deferred = False

    @contextmanager
    def deferred_saving(self) -> Iterator[PatchIndex]:
        """Commit each write to the metadata table as usual, but save the search structure
        once, at the end, instead of after every write: adding thousands of slides then costs
        one FAISS file write, not one per slide. If the process dies first, the files disagree
        on the count and ``open`` asks for a rebuild, which restores the structure from the
        table (nothing committed is lost)."""
        self._saving_deferred = True
        try:
            yield self
        finally:
            self._saving_deferred = False
            with self._writing():
                self._save_search_structure()

    # -- life cycle ----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        encoder: str,
        dim: int,
        kind: IndexKind = "flat",
        shards: int = 1,
    ) -> PatchIndex:
        """A new, empty index folder (refused if one is already there), its search structure
        split into ``shards``."""
        path, kind = Path(path), checked_kind(kind)
        shards = _checked_shards(shards)
        if (path / MANIFEST).exists() or (path / METADATA).exists():
            raise SearchIndexError(
                f"{path} already holds an index; add to it with `histopilot index add`, or "
                "choose another folder."
            )
        path.mkdir(parents=True, exist_ok=True)
        with closing(_connect(path)) as db, db:
            db.executescript(_SCHEMA)
            db.executemany(
                "INSERT INTO settings VALUES (?, ?)",
                [("encoder", encoder), ("dim", str(dim)), ("kind", kind), ("shards", str(shards))],
            )
        manifest = IndexManifest(
            encoder=encoder, dim=dim, kind=kind, shards=shards, count=0, updated=_now()
        )
        empty = np.zeros((0, dim), np.float32)
        structure = build_faiss_index(empty, kind=_structure_kind(kind, 0), shards=shards)
        index = cls(path, manifest, structure)
        index._save_search_structure()
        return index

    @classmethod
    def open(cls, path: str | Path, *, check: bool = True) -> PatchIndex:
        """Open an index; with ``check``, its three parts must agree. Without it (for
        ``rebuild``), only the metadata table is read."""
        path = Path(path)
        if not (path / METADATA).is_file():
            raise SearchIndexError(
                f"no patch index at {path} (no {METADATA}); build one with "
                "`histopilot index build SLIDES... --out INDEX`."
            )
        index = cls(path, _settings_manifest(path), faiss.IndexFlatIP(1))
        if check:
            index.manifest = index._read_manifest()
            index._index = read_index(path / VECTORS)
            index._check_consistent()
        return index

    def _read_manifest(self) -> IndexManifest:
        settings = self.manifest
        try:
            manifest = IndexManifest.model_validate_json((self.path / MANIFEST).read_text("utf-8"))
        except (OSError, ValueError) as error:
            raise self._needs_rebuild(f"{MANIFEST} is missing or corrupt") from error
        if manifest.format != INDEX_FORMAT:
            raise SearchIndexError(
                f"the index at {self.path} has format {manifest.format}; this histopilot reads "
                f"format {INDEX_FORMAT}. Rebuild the index from its slides."
            )
        identity = ("encoder", "dim", "shards")
        if any(getattr(manifest, key) != getattr(settings, key) for key in identity):
            raise self._needs_rebuild(f"{MANIFEST} disagrees with the metadata table")
        return manifest

    def _check_consistent(self) -> None:
        rows = self._count_rows()
        if not (rows == self._index.ntotal == self.manifest.count):
            raise self._needs_rebuild(
                f"{rows} metadata rows, {self._index.ntotal} vectors in {VECTORS} and "
                f"{self.manifest.count} in the manifest (an interrupted write?)"
            )
        if self._index.d != self.manifest.dim:
            raise self._needs_rebuild(
                f"{VECTORS} holds {self._index.d}-d vectors but the index is {self.manifest.dim}-d"
            )
        if shard_count(self._index) != self.manifest.shards:
            raise self._needs_rebuild(
                f"{VECTORS} has {shard_count(self._index)} shards but the index has "
                f"{self.manifest.shards}"
            )

    def _needs_rebuild(self, problem: str) -> SearchIndexError:
        return SearchIndexError(
            f"the index at {self.path} is inconsistent: {problem}; repair it with "
            f"`histopilot index rebuild {self.path}` (no data is lost: the metadata table holds "
            "every vector)."
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

    def slide_path(self, slide_id: str) -> str | None:
        """The file a slide id stands for in the index, or None when it is not there (one
        indexed lookup, unlike ``slides``, which counts every patch)."""
        with self._db() as db:
            row = db.execute(
                "SELECT slide_path FROM patches WHERE slide_id = ? LIMIT 1", (slide_id,)
            ).fetchone()
        return row[0] if row else None

    def labels(self) -> list[tuple[str, str | None, int]]:
        """Each patch label in the index with its caption (the label's full name, when one was
        given) and how many patches carry it."""
        with self._db() as db:
            return db.execute(
                "SELECT label, MAX(caption), COUNT(*) FROM patches "
                "WHERE label IS NOT NULL GROUP BY label ORDER BY label"
            ).fetchall()

    def labelled_patches(self) -> list[tuple[int, str, str, int, int]]:
        """(id, slide id, label, x, y) of every labelled patch, by slide then id: what a
        retrieval evaluation queries with."""
        with self._db() as db:
            return db.execute(
                "SELECT id, slide_id, label, x, y FROM patches WHERE label IS NOT NULL "
                "ORDER BY slide_id, id"
            ).fetchall()

    def require_entries(self) -> None:
        """Refuse to search an empty index (before any costly query embedding)."""
        if self.manifest.count == 0:
            raise SearchIndexError(
                f"the index at {self.path} is empty; add slides with `histopilot index add`."
            )

    def search(
        self, queries: np.ndarray, k: int = 10, *, exclude_slide: str | None = None
    ) -> list[list[PatchHit]]:
        """The ``k`` most similar patches to each query vector, best first, optionally
        leaving out one slide's patches (a slide should not find itself)."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        self.require_entries()
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
        found = dict(self._select("id, vector", wanted))
        missing = [i for i in wanted if i not in found]
        if missing:
            raise SearchIndexError(f"no patches with ids {missing[:10]} in {self.path}.")
        stacked = [np.frombuffer(found[i], dtype=np.float32) for i in wanted]
        return np.stack(stacked) if stacked else np.zeros((0, self.manifest.dim), np.float32)

    def _records(self, ids: np.ndarray) -> dict[int, dict]:
        rows = self._select(f"id, {', '.join(_FIELDS)}", sorted({int(i) for i in ids}))
        return {row[0]: dict(zip(_FIELDS, row[1:], strict=True)) for row in rows}

    def _select(self, columns: str, ids: list[int]) -> list[tuple]:
        """Rows of ``ids``, fetched in chunks that stay under SQLite's variable limit."""
        rows: list[tuple] = []
        with self._db() as db:
            for start in range(0, len(ids), SQL_CHUNK):
                chunk = ids[start : start + SQL_CHUNK]
                marks = ", ".join("?" * len(chunk))
                query = f"SELECT {columns} FROM patches WHERE id IN ({marks})"
                rows += db.execute(query, chunk).fetchall()
        return rows

    def _slide_ids(self, slide_id: str) -> np.ndarray:
        with self._db() as db:
            rows = db.execute("SELECT id FROM patches WHERE slide_id = ?", (slide_id,))
            return np.fromiter((row[0] for row in rows), dtype=np.int64)

    # -- writing -------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, records: Sequence[PatchRecord]) -> np.ndarray:
        """Store ``records`` with their ``vectors``; returns the new row ids."""
        return self._write(vectors, records, replace_slide=None)

    def add_slide(self, slide: SlideFeatures, *, label: str | None = None) -> int:
        """Add one slide's patches, replacing the slide if it is there already; returns how
        many were added. Nothing changes if the new patches cannot be added."""
        if slide.encoder != self.manifest.encoder:
            raise SearchIndexError(
                f"{slide.slide_id} was embedded with {slide.encoder!r} but the index at "
                f"{self.path} uses {self.manifest.encoder!r}; embed it with that encoder."
            )
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
        self._write(slide.features, records, replace_slide=slide.slide_id)
        return len(records)

    def remove_slides(self, slide_ids: Sequence[str]) -> dict[str, int]:
        """Remove every patch of the given slides (all or none); returns patches per slide."""
        with self._writing():
            removed = {slide_id: self._slide_ids(slide_id) for slide_id in slide_ids}
            unknown = [slide_id for slide_id, ids in removed.items() if len(ids) == 0]
            if unknown:
                known = ", ".join(entry.slide_id for entry in self.slides()[:10])
                raise SearchIndexError(
                    f"no slide {', '.join(map(repr, unknown))} in the index at {self.path}; "
                    f"slide ids are file names without their suffix (here: {known or 'none'})."
                )
            with self._db() as db:
                db.executemany(
                    "DELETE FROM patches WHERE slide_id = ?", [(slide_id,) for slide_id in removed]
                )
            all_ids = np.concatenate(list(removed.values())) if removed else np.zeros(0, np.int64)
            self._update_structure(all_ids, None, None)
        return {slide_id: len(ids) for slide_id, ids in removed.items()}

    def _write(
        self, vectors: np.ndarray, records: Sequence[PatchRecord], *, replace_slide: str | None
    ) -> np.ndarray:
        vectors = normalized(vectors)
        if len(vectors) != len(records):
            raise SearchIndexError(f"{len(vectors)} vectors for {len(records)} records.")
        if vectors.shape[1] != self.manifest.dim:
            raise SearchIndexError(
                f"these vectors have {vectors.shape[1]} dimensions but the index at "
                f"{self.path} holds {self.manifest.dim}-d vectors from the encoder "
                f"{self.manifest.encoder!r}; embed with that encoder or build a new index."
            )
        with self._writing():
            replaced = self._slide_ids(replace_slide) if replace_slide else np.zeros(0, np.int64)
            with self._db() as db:  # one transaction: the old patches go only if the new land
                self._refuse_id_clash(db, records)
                if replace_slide:
                    db.execute("DELETE FROM patches WHERE slide_id = ?", (replace_slide,))
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
            self._update_structure(replaced, ids, vectors)
        return ids

    def _refuse_id_clash(self, db: sqlite3.Connection, records: Sequence[PatchRecord]) -> None:
        """Two files must not share a slide id: adding one would silently replace the other."""
        for slide_id, path in {(r.slide_id, r.slide_path) for r in records}:
            row = db.execute(
                "SELECT slide_path FROM patches WHERE slide_id = ? AND slide_path != ? LIMIT 1",
                (slide_id, path),
            ).fetchone()
            if row:
                raise SearchIndexError(
                    f"the slide id {slide_id!r} already belongs to {row[0]} in the index at "
                    f"{self.path}; {path} would replace it. Rename one of the files."
                )

    def _update_structure(
        self, removed: np.ndarray, added: np.ndarray | None, vectors: np.ndarray | None
    ) -> None:
        """Bring the FAISS structure in line with a committed table change, then save it."""
        count = self._count_rows()
        in_place = index_kind(self._index) == _structure_kind(self.manifest.kind, count) and (
            len(removed) == 0 or supports_removal(self._index)
        )
        if not in_place:
            self._rebuild_from_table(self.manifest.kind, self.manifest.shards)
            return
        if len(removed):
            remove_vectors(self._index, removed)
        if added is not None and len(added):
            add_vectors(self._index, vectors, added)
        forget_gpu_copy(self._index)
        self._save_search_structure()

    def rebuild(self, kind: IndexKind | None = None, shards: int | None = None) -> None:
        """Rebuild the search structure and manifest from the metadata table (optionally as
        another kind, or split into another number of shards)."""
        with self._writing():
            self._rebuild_from_table(
                checked_kind(kind) if kind else self.manifest.kind,
                _checked_shards(shards) if shards else self.manifest.shards,
            )

    def _rebuild_from_table(self, kind: IndexKind, shards: int) -> None:
        dim = self.manifest.dim
        with self._db() as db:
            rows = db.execute("SELECT id, vector FROM patches ORDER BY id").fetchall()
            db.executemany(
                "INSERT OR REPLACE INTO settings VALUES (?, ?)",
                [("kind", kind), ("shards", str(shards))],
            )
        if any(len(vector) != dim * 4 for _, vector in rows):
            raise SearchIndexError(
                f"the metadata table {self.path / METADATA} holds vectors that are not "
                f"{dim}-d float32; the index cannot be repaired, build it again from its slides."
            )
        ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.empty((len(rows), dim), np.float32)
        for position, (_, vector) in enumerate(rows):
            vectors[position] = np.frombuffer(vector, dtype=np.float32)
        self._index = build_faiss_index(
            vectors, ids, kind=_structure_kind(kind, len(rows)), shards=shards
        )
        self.manifest = self.manifest.model_copy(update={"kind": kind, "shards": shards})
        self._save_search_structure()

    def _save_search_structure(self) -> None:
        if self._saving_deferred:
            self.manifest = self.manifest.model_copy(update={"count": int(self._index.ntotal)})
            return
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
    def _writing(self) -> Iterator[None]:
        """One writer at a time: two processes adding slides would each save a FAISS file
        that lacks the other's patches."""
        try:
            with FileLock(self.path / LOCK, timeout=0):
                yield
        except Timeout:
            raise SearchIndexError(
                f"another process is writing to the index at {self.path}; try again when it "
                "has finished."
            ) from None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction: committed on success, rolled back on error."""
        try:
            connection = _connect(self.path)
            with closing(connection), connection:
                yield connection
        except sqlite3.OperationalError as error:
            if "locked" in str(error):
                raise SearchIndexError(
                    f"the metadata table of {self.path} is locked by another process; try again."
                ) from error
            raise _unreadable(self.path, error) from error
        except sqlite3.DatabaseError as error:
            raise _unreadable(self.path, error) from error


def _unreadable(path: Path, error: Exception) -> SearchIndexError:
    return SearchIndexError(
        f"the metadata table {path / METADATA} cannot be read ({error}); restore it from a "
        "backup or build the index again from its slides."
    )


def _settings_manifest(path: Path) -> IndexManifest:
    """The index's identity from the metadata table (the manifest file is only a copy)."""
    try:
        with closing(_connect(path)) as db:
            settings = dict(db.execute("SELECT key, value FROM settings").fetchall())
            count = db.execute("SELECT COUNT(*) FROM patches").fetchone()[0]
        return IndexManifest(
            encoder=settings["encoder"],
            dim=int(settings["dim"]),
            kind=settings["kind"],
            shards=int(settings.get("shards", 1)),
            count=count,
            updated=_now(),
        )
    except (sqlite3.DatabaseError, KeyError, ValueError) as error:
        raise _unreadable(path, error) from error


def _checked_shards(shards: int) -> int:
    if not 1 <= shards <= MAX_SHARDS:
        raise SearchIndexError(f"an index has 1 to {MAX_SHARDS} shards, not {shards}.")
    return shards


def _structure_kind(kind: IndexKind, count: int) -> IndexKind:
    """IVF-PQ needs enough vectors to train its codebooks; until then the index stays exact."""
    return "flat" if kind == "ivfpq" and count < IVF_MIN_TRAIN else kind


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path / METADATA)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
