"""Patch indexes: the three FAISS kinds, metadata beside them, slide embedding and its cache."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import h5py
import numpy as np
import pytest

from histopilot.errors import SearchIndexError
from histopilot.retrieval.encoders import OfflineEncoder
from histopilot.retrieval.features import SlideFeatures, embed_slide, slide_id_of
from histopilot.retrieval.patch_index import PatchIndex, PatchRecord
from histopilot.retrieval.search import mosaic, search_patches, search_slides
from histopilot.retrieval.vectors import IVF_MIN_TRAIN, build_faiss_index, search, shard_parts
from histopilot.slide import open_slide


def clustered(count: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, dim))
    return (centres[rng.integers(0, 8, count)] + 0.3 * rng.normal(size=(count, dim))).astype(
        np.float32
    )


def records(count: int, slides: int = 3) -> list[PatchRecord]:
    return [
        PatchRecord(
            slide_id=f"s{i % slides}", slide_path=f"/data/s{i % slides}.svs", x=i, y=0, size=448
        )
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("kind", "count"), [("flat", 500), ("hnsw", 500), ("ivfpq", IVF_MIN_TRAIN)]
)
def test_every_kind_finds_each_vector_itself(kind: str, count: int) -> None:
    vectors = clustered(count)
    index = build_faiss_index(vectors, kind=kind)
    scores, ids = search(index, vectors[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
    assert scores.max() <= 1.01  # cosine


@pytest.mark.parametrize(("kind", "agreement"), [("flat", 1.0), ("hnsw", 0.95)])
def test_sharded_and_single_indexes_find_the_same_neighbours(kind: str, agreement: float) -> None:
    vectors, ids = clustered(2000), np.random.default_rng(1).permutation(10_000)[:2000]
    single = build_faiss_index(vectors, ids, kind=kind)
    sharded = build_faiss_index(vectors, ids, kind=kind, shards=4)
    assert [part.ntotal for part in shard_parts(sharded)] == [
        int(((ids % 4) == shard).sum()) for shard in range(4)
    ]
    queries, left_out = clustered(100, seed=2), ids[:300]
    for exclude in (None, left_out):
        single_scores, single_ids = search(single, queries, 10, exclude=exclude)
        sharded_scores, sharded_ids = search(sharded, queries, 10, exclude=exclude)
        assert (single_ids == sharded_ids).mean() >= agreement
        np.testing.assert_allclose(
            single_scores, sharded_scores, atol=1e-5 if kind == "flat" else 1
        )
    assert not np.isin(search(sharded, queries, 10, exclude=left_out)[1], left_out).any()


def test_a_sharded_patch_index_answers_like_a_single_one(tmp_path: Path) -> None:
    vectors = clustered(600)
    single = PatchIndex.create(tmp_path / "single", encoder="test", dim=16)
    sharded = PatchIndex.create(tmp_path / "sharded", encoder="test", dim=16, shards=3)
    for index in (single, sharded):
        index.add(vectors, records(600))
        index.remove_slides(["s2"])
    reopened = PatchIndex.open(tmp_path / "sharded")
    assert reopened.info()["shards"] == 3 and len(reopened) == len(single) == 400

    def answers(index: PatchIndex) -> list[list[tuple[int, str]]]:
        hits = index.search(vectors[:40], k=5, exclude_slide="s0")
        return [[(hit.id, hit.slide_id) for hit in row] for row in hits]

    assert answers(reopened) == answers(single)
    reopened.rebuild(shards=1)  # and back to one file
    assert (tmp_path / "sharded" / "vectors.faiss").is_file()
    assert answers(PatchIndex.open(tmp_path / "sharded")) == answers(single)


def test_ivfpq_needs_enough_vectors_to_train() -> None:
    with pytest.raises(SearchIndexError, match="use the exact 'flat' kind"):
        build_faiss_index(clustered(100), kind="ivfpq")


def test_index_round_trip_add_search_remove_rebuild(tmp_path: Path) -> None:
    vectors = clustered(300)
    index = PatchIndex.create(tmp_path / "index", encoder="test", dim=16)
    index.add(vectors, records(300))
    reopened = PatchIndex.open(tmp_path / "index")
    [hits] = reopened.search(vectors[7], k=3)
    assert hits[0].id == 7 and hits[0].x == 7 and hits[0].slide_id == "s1"
    assert [hit.rank for hit in hits] == [1, 2, 3]
    assert all(
        hit.slide_id != "s1" for hit in reopened.search(vectors[7], k=5, exclude_slide="s1")[0]
    )

    assert reopened.remove_slides(["s1"]) == {"s1": 100} and len(reopened) == 200
    assert all(hit.slide_id != "s1" for hit in reopened.search(vectors[7], k=20)[0])
    assert [entry.slide_id for entry in PatchIndex.open(tmp_path / "index").slides()] == [
        "s0",
        "s2",
    ]

    reopened.rebuild("hnsw")
    again = PatchIndex.open(tmp_path / "index")
    assert again.info()["search_structure"] == "hnsw" and len(again) == 200
    assert again.search(vectors[9], k=1)[0][0].id == 9
    assert again.remove_slides(["s0"]) == {"s0": 100}
    assert len(PatchIndex.open(tmp_path / "index")) == 100
    with pytest.raises(SearchIndexError, match=r"no slide 's9'.*here: s2"):
        again.remove_slides(["s2", "s9"])
    assert len(PatchIndex.open(tmp_path / "index")) == 100  # all or nothing


def test_an_ivfpq_index_stays_exact_until_it_can_train(tmp_path: Path) -> None:
    vectors = clustered(IVF_MIN_TRAIN + 100)
    index = PatchIndex.create(tmp_path / "index", encoder="test", dim=16, kind="ivfpq")
    index.add(vectors[:100], records(100))
    assert index.info()["search_structure"] == "flat"
    index.add(vectors[100:], records(IVF_MIN_TRAIN, slides=4)[:IVF_MIN_TRAIN])
    reopened = PatchIndex.open(tmp_path / "index")
    assert reopened.info()["search_structure"] == "ivfpq"
    assert reopened.search(vectors[5], k=1)[0][0].id == 5
    hits = reopened.search(vectors[5], k=5, exclude_slide="s2")[0]
    assert len(hits) == 5 and all(hit.slide_id != "s2" for hit in hits)


def test_replacing_a_slide_with_bad_features_keeps_the_old_ones(tmp_path: Path) -> None:
    index = PatchIndex.create(tmp_path / "index", encoder="offline", dim=16)
    coords = np.array([[0, 0], [448, 0]])
    good = SlideFeatures("a", "/data/a.svs", "offline", clustered(2), coords, 448, 0.5)
    index.add_slide(good)
    for bad in (
        SlideFeatures("a", "/data/a.svs", "offline", np.ones((2, 8), np.float32), coords, 448, 0.5),
        SlideFeatures("a", "/data/a.svs", "offline", clustered(3), coords, 448, 0.5),
    ):
        with pytest.raises(SearchIndexError):
            index.add_slide(bad)
    assert [(e.slide_id, e.patches) for e in PatchIndex.open(tmp_path / "index").slides()] == [
        ("a", 2)
    ]


def test_two_files_with_one_slide_id_are_refused(tmp_path: Path) -> None:
    index = PatchIndex.create(tmp_path / "index", encoder="offline", dim=16)
    coords = np.array([[0, 0]])
    index.add_slide(SlideFeatures("case", "/a/case.svs", "offline", clustered(1), coords, 448, 0.5))
    clash = SlideFeatures("case", "/b/case.svs", "offline", clustered(1), coords, 448, 0.5)
    with pytest.raises(SearchIndexError, match="already belongs to /a/case.svs"):
        index.add_slide(clash)
    assert slide_id_of("/b/case.v2.svs") == "case.v2"
    assert slide_id_of("/b/scan.ome.tiff") == "scan"


def test_bad_queries_and_bad_folders_are_explained(tmp_path: Path) -> None:
    index = PatchIndex.create(tmp_path / "index", encoder="test", dim=16)
    with pytest.raises(SearchIndexError, match="is empty"):
        index.search(clustered(1), k=1)
    with pytest.raises(SearchIndexError, match="already holds an index"):
        PatchIndex.create(tmp_path / "index", encoder="test", dim=16)
    with pytest.raises(SearchIndexError, match="16-d vectors"):
        index.add(np.ones((2, 8), np.float32), records(2))
    index.add(clustered(10), records(10))
    with pytest.raises(SearchIndexError, match="search with that encoder"):
        index.search(np.ones((1, 8), np.float32))
    with pytest.raises(SearchIndexError, match="no patch index"):
        PatchIndex.open(tmp_path / "nowhere")
    with pytest.raises(SearchIndexError, match="NaN"):
        index.search(np.full((1, 16), np.nan, np.float32))


def test_a_rebuild_recovers_from_a_lost_manifest(tmp_path: Path) -> None:
    index = PatchIndex.create(tmp_path / "index", encoder="test", dim=16)
    index.add(clustered(20), records(20))
    (tmp_path / "index" / "manifest.json").write_text('{"dim": 8}')
    with pytest.raises(SearchIndexError, match="missing or corrupt.*index rebuild"):
        PatchIndex.open(tmp_path / "index")
    PatchIndex.open(tmp_path / "index", check=False).rebuild()
    repaired = PatchIndex.open(tmp_path / "index")
    assert (repaired.encoder, repaired.manifest.dim, len(repaired)) == ("test", 16, 20)


def test_an_interrupted_write_is_reported_and_rebuild_repairs_it(tmp_path: Path) -> None:
    index = PatchIndex.create(tmp_path / "index", encoder="test", dim=16)
    index.add(clustered(20), records(20))
    with sqlite3.connect(tmp_path / "index" / "metadata.sqlite") as db:
        db.execute("DELETE FROM patches WHERE id >= 15")
    with pytest.raises(SearchIndexError, match="inconsistent.*index rebuild"):
        PatchIndex.open(tmp_path / "index")
    PatchIndex.open(tmp_path / "index", check=False).rebuild()
    assert len(PatchIndex.open(tmp_path / "index")) == 15


def test_corrupt_files_are_reported_never_rebuilt_silently(tmp_path: Path) -> None:
    index = PatchIndex.create(tmp_path / "index", encoder="test", dim=16)
    index.add(clustered(20), records(20))
    faiss_file = tmp_path / "index" / "vectors.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:50])
    with pytest.raises(SearchIndexError, match="corrupt or not a FAISS index"):
        PatchIndex.open(tmp_path / "index")
    assert faiss_file.stat().st_size == 50
    (tmp_path / "index" / "metadata.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(SearchIndexError, match="cannot be read"):
        PatchIndex.open(tmp_path / "index", check=False)


@pytest.fixture(scope="module")
def offline() -> OfflineEncoder:
    return OfflineEncoder()


def test_slide_features_are_cached_and_reused(wsi_dir: Path, tmp_path: Path, offline) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        first = embed_slide(slide, offline, cache_dir=tmp_path)
        cache = tmp_path / "CMU-1-Small-Region.h5"
        with h5py.File(cache) as handle:
            assert handle["features"].shape == (len(first), offline.dim)
            assert handle["coords"].shape == (len(first), 2)
            assert handle["coords"].attrs["patch_size"] == 224
        written = cache.stat().st_mtime_ns
        again = embed_slide(slide, offline, cache_dir=tmp_path)
    assert cache.stat().st_mtime_ns == written
    np.testing.assert_array_equal(first.features, again.features)
    np.testing.assert_array_equal(first.coords, again.coords)


def test_a_cache_made_at_another_slide_resolution_is_not_reused(
    wsi_dir: Path, tmp_path: Path, offline
) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        declared = embed_slide(slide, offline, cache_dir=tmp_path)
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs", mpp=0.25) as slide:
        overridden = embed_slide(slide, offline, cache_dir=tmp_path)
    assert declared.size_level0 in (224, 225) and overridden.size_level0 == 448
    assert len(overridden) < len(declared)


def test_a_corrupt_cache_is_recomputed(wsi_dir: Path, tmp_path: Path, offline) -> None:
    (tmp_path / "CMU-1-Small-Region.h5").write_bytes(b"\x89HDF\r\n" + b"0" * 100)
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        features = embed_slide(slide, offline, cache_dir=tmp_path)
    assert len(features) > 0
    with h5py.File(tmp_path / "CMU-1-Small-Region.h5") as handle:
        assert handle["features"].shape[0] == len(features)


@pytest.fixture(scope="module")
def shared_slides_index(wsi_dir: Path, tmp_path_factory, offline) -> PatchIndex:
    folder = tmp_path_factory.mktemp("idx") / "index"
    index = PatchIndex.create(folder, encoder="offline", dim=offline.dim)
    for name, label in (
        ("CMU-1-Small-Region.svs", "CMU-1"),
        ("dicom-wsi-TCGA-XK-AAJU-01A-01-TS1-level.dcm", "TCGA-PRAD"),
        ("tcga-cr-7395-01a-01-ts1.svs", "TCGA-HNSC"),
    ):
        with open_slide(wsi_dir / name, mpp=None if name.startswith("CMU") else 0.5) as slide:
            index.add_slide(embed_slide(slide, offline), label=label)
    return index


def test_a_region_of_an_indexed_slide_finds_itself(
    shared_slides_index: PatchIndex, offline
) -> None:
    [entry] = shared_slides_index.search(shared_slides_index.vectors([60]), k=1)[0]
    with open_slide(entry.slide_path, mpp=0.5) as slide:
        tile = slide.read_region_at(entry.x, entry.y, 224, 224, downsample=entry.size / 224)
    [best, *_] = search_patches(shared_slides_index, offline.encode_images([tile]), k=3)
    assert (best.id, best.slide_id, best.x, best.y) == (60, entry.slide_id, entry.x, entry.y)
    assert best.score > 0.99


def test_slide_search_puts_the_same_tissue_first_and_never_the_query(
    wsi_dir: Path, tmp_path: Path, shared_slides_index: PatchIndex, offline
) -> None:
    rescanned = tmp_path / "cmu-rescan.svs"  # the same tissue under another name
    rescanned.write_bytes((wsi_dir / "CMU-1-Small-Region.svs").read_bytes())
    with open_slide(rescanned) as slide:
        query = embed_slide(slide, offline)
    chosen = mosaic(query.features, query.coords)
    assert 1 <= len(chosen) < len(query)
    slides = search_slides(shared_slides_index, query, k=5)
    assert slides[0].slide_id == "CMU-1-Small-Region" and slides[0].label == "CMU-1"
    assert slides[0].votes == len(chosen) and slides[0].median_similarity > 0.99
    assert [hit.rank for hit in slides] == list(range(1, len(slides) + 1))

    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as slide:
        own = embed_slide(slide, offline)
    found = {hit.slide_id for hit in search_slides(shared_slides_index, own)}
    assert "CMU-1-Small-Region" not in found
