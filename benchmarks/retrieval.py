"""Retrieval speed: FAISS kinds against exact search, offline encoder against plain scikit-image.

Part 1: N x 512 float32 clustered vectors (seeded) and 1,000 queries; for exact (flat), HNSW
and IVF-PQ as histopilot builds them: build time, queries/s, recall@10 against exact search,
memory per vector, and the speed-up over exact search.

Part 2: offline-encoder throughput (tiles/s) against a reference implementation of the same
feature families with per-tile scikit-image calls (rgb2hed, local_binary_pattern,
graycomatrix/graycoprops, gabor, regionprops), on the same tiles.

    python benchmarks/retrieval.py                 # 1,000,000 vectors (several minutes)
    python benchmarks/retrieval.py --count 200000  # quicker
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import faiss
import numpy as np

from histopilot.retrieval.encoders import OfflineEncoder
from histopilot.retrieval.vectors import (
    HNSW_EF_SEARCH,
    build_faiss_index,
    normalized,
    search,
    write_index,
)


def clustered_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """Embedding-like data: 1,000 clusters in a 32-d latent space mapped into ``dim`` columns
    (learned embeddings have a low intrinsic dimension), plus a little isotropic noise."""
    rng = np.random.default_rng(0)  # the same clusters and mapping for data and queries
    centres = rng.normal(size=(1000, 32)).astype(np.float32)
    mapping = rng.normal(size=(32, dim)).astype(np.float32) / np.sqrt(32)
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, 1000, size=count)
    vectors = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
        part = labels[start : start + 100_000]
        latent = centres[part] + 0.5 * rng.standard_normal((len(part), 32), dtype=np.float32)
        noise = 0.05 * rng.standard_normal((len(part), dim), dtype=np.float32)
        vectors[start : start + len(part)] = latent @ mapping + noise
    return normalized(vectors)


def bench_indexes(count: int, dim: int, queries: int) -> None:
    data = clustered_vectors(count, dim, seed=0)
    probes = clustered_vectors(queries, dim, seed=1)
    print(f"{count:,} x {dim} vectors, {queries:,} queries, {faiss.omp_get_max_threads()} threads")
    print("| index | build s | queries/s | recall@10 | bytes/vector | speed-up vs exact |")
    print("|---|---|---|---|---|---|")
    truth = None
    exact_qps = None
    for kind in ("flat", "hnsw", "ivfpq"):
        start = time.perf_counter()
        index = build_faiss_index(data, kind=kind)
        build = time.perf_counter() - start
        start = time.perf_counter()
        _, ids = search(index, probes, 10)
        qps = queries / (time.perf_counter() - start)
        if truth is None:
            truth, exact_qps = ids, qps
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
        with tempfile.TemporaryDirectory() as folder:
            size = write_index(index, f"{folder}/index.faiss").stat().st_size
        print(
            f"| {kind} | {build:.1f} | {qps:,.0f} | {recall:.3f} | {size / count:.0f} | "
            f"{qps / exact_qps:.1f}x |"
        )
    print(f"(HNSW efSearch={HNSW_EF_SEARCH}; bytes/vector from the saved file, ids included)")


def reference_features(tile: np.ndarray) -> np.ndarray:
    """The same feature families with one scikit-image call per feature, tile by tile."""
    from skimage.color import rgb2gray, rgb2hed
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
    from skimage.filters import gabor, threshold_otsu
    from skimage.measure import label, regionprops

    hed = rgb2hed(tile)
    grey = (rgb2gray(tile) * 255).astype(np.uint8)
    values = [np.percentile(hed[..., c], (10, 50, 90)) for c in range(3)]
    for radius in (1, 2, 4):
        codes = local_binary_pattern(grey, 8, radius, method="uniform")
        values.append(np.bincount(codes.astype(int).ravel(), minlength=10))
    matrix = graycomatrix(
        grey // 16, [1, 4], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], 16, True, True
    )
    for prop in ("contrast", "homogeneity", "energy", "correlation"):
        values.append(graycoprops(matrix, prop).ravel())
    for frequency in (0.25, 0.125, 0.0625):
        for theta in np.arange(4) * np.pi / 4:
            real, imaginary = gabor(grey, frequency, theta=theta)
            values.append([np.hypot(real, imaginary).mean()])
    hematoxylin = hed[..., 0]
    mask = hematoxylin > max(threshold_otsu(hematoxylin), 0.05)
    regions = [r for r in regionprops(label(mask)) if r.area >= 12]
    values.append([len(regions), np.mean([r.eccentricity for r in regions]) if regions else 0])
    return np.concatenate([np.ravel(v) for v in values])


def bench_encoder(tiles: int) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(60, 255, size=(224, 224, 3), dtype=np.uint8) for _ in range(tiles)]
    encoder = OfflineEncoder()
    encoder.encode_images(images[:4])  # warm-up
    start = time.perf_counter()
    encoder.encode_images(images)
    ours = tiles / (time.perf_counter() - start)
    start = time.perf_counter()
    for image in images:
        reference_features(image)
    theirs = tiles / (time.perf_counter() - start)
    print(f"\noffline encoder on {tiles} tiles of 224 px")
    print("| implementation | tiles/s | ratio |")
    print("|---|---|---|")
    print(
        f"| histopilot OfflineEncoder ({os.cpu_count()} threads) | {ours:.1f} | "
        f"{ours / theirs:.1f}x |"
    )
    print(f"| per-tile scikit-image reference | {theirs:.1f} | 1.0x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--tiles", type=int, default=64)
    args = parser.parse_args()
    bench_indexes(args.count, args.dim, args.queries)
    bench_encoder(args.tiles)


if __name__ == "__main__":
    main()
