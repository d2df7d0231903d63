"""FAISS indexes over embeddings: exact, HNSW and IVF-PQ, cosine similarity throughout.

Every index here scores by inner product on L2-normalised vectors, which is cosine similarity,
so scores mean the same whichever kind is chosen. Each index maps vectors to caller-chosen
int64 ids (the row ids of the metadata table beside it), so a hit is one lookup away from
where it came from.

Kinds, by collection size:

- ``flat``: exact search; best up to a few hundred thousand vectors.
- ``hnsw``: a proximity graph; sub-linear search with high recall, memory ~ raw vectors.
- ``ivfpq``: inverted lists of product-quantised codes; tens of bytes per vector, so tens of
  millions fit in memory, at some cost in recall.

Any kind can be split into shards (``faiss.IndexShards``): each vector lives in the shard its
id picks (``id % shards``), a query searches every shard in parallel and the hits are merged,
so the results are those of one index of the same kind (exactly so for ``flat``). Shards let a
collection outgrow one device: with several GPUs each shard goes to its own. A sharded index is
saved as a folder of one FAISS file per shard, since FAISS cannot serialise the shard wrapper.
"""

from __future__ import annotations

import math
import re
import shutil
import weakref
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from histopilot.errors import SearchIndexError
from histopilot.storage import atomic_directory, atomic_file

IndexKind = Literal["flat", "hnsw", "ivfpq"]
INDEX_KINDS: tuple[IndexKind, ...] = ("flat", "hnsw", "ivfpq")

#: HNSW graph degree and build beam: M=32 keeps recall@10 above 0.95 on 512-d embeddings with
#: a search beam of 64-128 (see docs/performance.md); more costs memory and build time.
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 96
#: IVF-PQ trains its coarse quantiser and codebooks on a sample; k-means needs roughly 40
#: points per centroid, and each 8-bit sub-quantiser needs 256 centroids.
IVF_MIN_TRAIN = 256 * 39
IVF_TRAIN_PER_LIST = 64
IVF_NPROBE = 32
#: Bytes per PQ code: the largest divisor of the dimension up to this (plus 8 bytes of id).
PQ_MAX_BYTES = 56


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2-normalised float32 copy (all-zero rows stay zero)."""
    array = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if array.ndim != 2:
        raise SearchIndexError(f"expected a 2-D array of vectors, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise SearchIndexError(
            "some vectors hold NaN or infinite values; the encoder failed on those inputs."
        )
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.divide(array, norms, out=np.zeros_like(array), where=norms > 0)


def checked_kind(kind: str) -> IndexKind:
    """``kind`` if it names an index kind, else a clear error."""
    if kind not in INDEX_KINDS:
        raise SearchIndexError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}.")
    return kind  # type: ignore[return-value]


def build_faiss_index(
    vectors: np.ndarray,
    ids: np.ndarray | None = None,
    *,
    kind: IndexKind = "flat",
    seed: int = 0,
    shards: int = 1,
) -> faiss.Index:
    """An index of ``kind`` holding ``vectors`` (normalised here) under ``ids`` (0..n-1),
    split into ``shards`` when more than one."""
    kind = checked_kind(kind)
    if shards < 1:
        raise SearchIndexError(f"an index needs at least one shard, got {shards}.")
    vectors = normalized(vectors)
    count, dim = vectors.shape
    ids = np.arange(count, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if kind == "flat":
        empty = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        graph.hnsw.efSearch = HNSW_EF_SEARCH
        empty = faiss.IndexIDMap2(graph)
    else:  # trained once on the whole collection, so every shard shares one codebook
        empty = _trained_ivfpq(vectors, seed)
    index = empty if shards == 1 else _sharded([faiss.clone_index(empty) for _ in range(shards)])
    add_vectors(index, vectors, ids)
    return index


def _sharded(parts: list[faiss.Index]) -> faiss.IndexShards:
    # threaded: shards are searched in parallel; successive_ids=False: each keeps its ids.
    index = faiss.IndexShards(parts[0].d, True, False)
    for part in parts:
        index.add_shard(part)  # the Python wrapper keeps a reference to each part
    return index


def shard_parts(index: faiss.Index) -> list[faiss.Index]:
    """The shards of a sharded index, or the index itself as its one shard."""
    if isinstance(index, faiss.IndexShards):
        return [faiss.downcast_index(index.at(i)) for i in range(index.count())]
    return [index]


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add unit-length ``vectors`` under ``ids``; in a sharded index each goes to shard
    ``id % shards``, so where a vector lives never depends on the order it came in."""
    if not len(ids):
        return
    parts = shard_parts(index)
    if len(parts) == 1:
        index.add_with_ids(vectors, ids)
        return
    owner = ids % len(parts)
    for number, part in enumerate(parts):
        mine = owner == number
        if mine.any():
            part.add_with_ids(np.ascontiguousarray(vectors[mine]), ids[mine])
    index.syncWithSubIndexes()


def remove_vectors(index: faiss.Index, ids: np.ndarray) -> None:
    """Remove ``ids`` in place (every shard is asked; an id lives in one)."""
    selector = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(np.ascontiguousarray(ids, np.int64)))
    for part in shard_parts(index):
        part.remove_ids(selector)
    if isinstance(index, faiss.IndexShards):
        index.syncWithSubIndexes()


def shard_count(index: faiss.Index) -> int:
    return len(shard_parts(index))


def _trained_ivfpq(vectors: np.ndarray, seed: int) -> faiss.Index:
    count, dim = vectors.shape
    if count < IVF_MIN_TRAIN:
        raise SearchIndexError(
            f"an IVF-PQ index needs at least {IVF_MIN_TRAIN} vectors to train its codebooks, "
            f"got {count}; use the exact 'flat' kind for a collection this small."
        )
    lists = int(min(65536, max(16, 2 ** round(math.log2(math.sqrt(count))))))
    lists = min(lists, count // 39)
    code_bytes = max(d for d in range(1, min(dim, PQ_MAX_BYTES) + 1) if dim % d == 0)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, lists, code_bytes, 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    sample_size = min(count, max(IVF_MIN_TRAIN * 64, lists * IVF_TRAIN_PER_LIST))
    sample = np.random.default_rng(seed).choice(count, size=sample_size, replace=False)
    index.train(vectors[np.sort(sample)])
    index.nprobe = min(IVF_NPROBE, lists)
    return index


def index_kind(index: faiss.Index) -> IndexKind:
    """Which of the kinds above ``index`` is (a sharded index: the kind of its shards)."""
    index = shard_parts(index)[0]
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVF):
        return "ivfpq"
    return "flat"


def supports_removal(index: faiss.Index) -> bool:
    """Whether ids can be removed in place (an HNSW graph has to be rebuilt instead)."""
    return index_kind(index) != "hnsw"


def search(
    index: faiss.Index, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and ids of the ``k`` nearest entries to each query (id -1: no entry),
    never returning the ids in ``exclude``."""
    queries = normalized(queries)
    if queries.shape[1] != index.d:
        raise SearchIndexError(
            f"query vectors have {queries.shape[1]} dimensions but the index holds "
            f"{index.d}-dimensional vectors; query with the encoder the index was built with."
        )
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    if exclude is None or len(exclude) == 0:
        return _on_gpu(index).search(queries, k)
    # Filtering inside the search (not after it) keeps k results however many are excluded.
    excluded = np.ascontiguousarray(exclude, dtype=np.int64)
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(excluded), faiss.swig_ptr(excluded)))
    parts = shard_parts(index)
    if len(parts) == 1:
        return index.search(queries, k, params=_search_parameters(index, selector))
    # The shards of an IndexShards search in parallel with one shared parameter object, which
    # each shard's id map rewrites while it searches; so each shard is searched on its own here
    # and the hits merged.
    found = [part.search(queries, k, params=_search_parameters(part, selector)) for part in parts]
    scores = np.concatenate([s for s, _ in found], axis=1)
    ids = np.concatenate([i for _, i in found], axis=1)
    scores[ids < 0] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores, top_ids = np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)
    top_ids[~np.isfinite(top_scores)] = -1
    return top_scores.astype(np.float32), top_ids


def _search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    kind = index_kind(index)
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=HNSW_EF_SEARCH)
    if kind == "ivfpq":
        nprobe = faiss.extract_index_ivf(shard_parts(index)[0]).nprobe
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    return faiss.SearchParameters(sel=selector)


#: GPU copies of CPU indexes, made once per index object and dropped with it.
_GPU_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` when faiss-gpu sees a GPU, else ``index`` itself.

    The shards of a sharded index are spread over the GPUs (shard i on GPU i mod n). HNSW has
    no GPU form, and some IVF-PQ code sizes are not supported on the GPU; those stay on the
    CPU. The copy is cached (weakly keyed by the index), so repeated searches do not move the
    index each time; whoever changes an index in place calls ``forget_gpu_copy``.
    """
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    if index_kind(index) == "hnsw":
        return index
    if index not in _GPU_COPIES:
        resources = [faiss.StandardGpuResources() for _ in range(faiss.get_num_gpus())]
        try:
            copies = [
                faiss.index_cpu_to_gpu(
                    resources[number % len(resources)], number % len(resources), part
                )
                for number, part in enumerate(shard_parts(index))
            ]
            _GPU_COPIES[index] = copies[0] if len(copies) == 1 else _sharded(copies)
        except RuntimeError:
            _GPU_COPIES[index] = index
    return _GPU_COPIES[index]


def forget_gpu_copy(index: faiss.Index) -> None:
    """Drop the GPU copy of an index that was just changed in place."""
    _GPU_COPIES.pop(index, None)


def write_index(index: faiss.Index, path: str | Path) -> Path:
    """Save ``index`` atomically: one file, or for a sharded index a folder of shard files."""
    path = Path(path)
    parts = shard_parts(index)
    if len(parts) == 1:
        if path.is_dir():  # it was sharded before
            shutil.rmtree(path)
        with atomic_file(path) as tmp:
            faiss.write_index(index, str(tmp))
        return path
    if path.is_file():  # it was one file before
        path.unlink()
    with atomic_directory(path) as folder:
        for number, part in enumerate(parts):
            faiss.write_index(part, str(folder / f"shard-{number:03d}.faiss"))
    return path


def read_index(path: str | Path) -> faiss.Index:
    """Load an index written by ``write_index``; a file that does not load is an error."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("shard-*.faiss"))
        if not files:
            raise SearchIndexError(f"the sharded index folder {path} holds no shard files.")
        return _sharded([_read_one(file) for file in files])
    if not path.is_file():
        raise SearchIndexError(f"no index file at {path}.")
    return _read_one(path)


def _read_one(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as error:
        reason = re.sub(r"^.*\.cpp:\d+: ", "", str(error).strip()) or "unreadable"
        raise SearchIndexError(
            f"the index file {path} is corrupt or not a FAISS index ({reason}); restore it from "
            "a backup or rebuild the index from its metadata."
        ) from error
