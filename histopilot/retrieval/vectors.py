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
"""

from __future__ import annotations

import math
import re
import weakref
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from histopilot.errors import SearchIndexError
from histopilot.storage import atomic_file

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
) -> faiss.Index:
    """An index of ``kind`` holding ``vectors`` (normalised here) under ``ids`` (0..n-1)."""
    kind = checked_kind(kind)
    vectors = normalized(vectors)
    count, dim = vectors.shape
    ids = np.arange(count, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        graph.hnsw.efSearch = HNSW_EF_SEARCH
        index = faiss.IndexIDMap2(graph)
    else:
        index = _trained_ivfpq(vectors, seed)
    if count:
        index.add_with_ids(vectors, ids)
    return index


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
    """Which of the kinds above ``index`` is."""
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
    return index.search(queries, k, params=_search_parameters(index, selector))


def _search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    kind = index_kind(index)
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=HNSW_EF_SEARCH)
    if kind == "ivfpq":
        return faiss.SearchParametersIVF(sel=selector, nprobe=faiss.extract_index_ivf(index).nprobe)
    return faiss.SearchParameters(sel=selector)


#: GPU copies of CPU indexes, made once per index object and dropped with it.
_GPU_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` when faiss-gpu sees a GPU, else ``index`` itself.

    HNSW has no GPU form, and some IVF-PQ code sizes are not supported on the GPU; those stay
    on the CPU. The copy is cached (weakly keyed by the index), so repeated searches do not
    move the index each time; whoever changes an index in place calls ``forget_gpu_copy``.
    """
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    if index_kind(index) == "hnsw":
        return index
    if index not in _GPU_COPIES:
        try:
            resources = faiss.StandardGpuResources()
            _GPU_COPIES[index] = faiss.index_cpu_to_gpu(resources, 0, index)
        except RuntimeError:
            _GPU_COPIES[index] = index
    return _GPU_COPIES[index]


def forget_gpu_copy(index: faiss.Index) -> None:
    """Drop the GPU copy of an index that was just changed in place."""
    _GPU_COPIES.pop(index, None)


def write_index(index: faiss.Index, path: str | Path) -> Path:
    """Save ``index`` atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        faiss.write_index(index, str(tmp))
    return path


def read_index(path: str | Path) -> faiss.Index:
    """Load an index written by ``write_index``; a file that does not load is an error."""
    path = Path(path)
    if not path.is_file():
        raise SearchIndexError(f"no index file at {path}.")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as error:
        reason = re.sub(r"^.*\.cpp:\d+: ", "", str(error).strip()) or "unreadable"
        raise SearchIndexError(
            f"the index file {path} is corrupt or not a FAISS index ({reason}); restore it from "
            "a backup or rebuild the index from its metadata."
        ) from error
