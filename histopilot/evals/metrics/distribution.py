"""Divergences and distances between distributions, and between two sets of feature vectors.

A feature set is an (N, D) float array, e.g. a patch encoder's features of real tiles and of
generated ones. The discrete divergences (KL, Jensen–Shannon) compare histograms; the set
distances summarise how far apart the two clouds of vectors lie. The unbiased MMD² estimator
here is shared with the Kernel Inception Distance in :mod:`.image`.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel
from scipy.spatial.distance import cdist, pdist
from scipy.special import rel_entr
from scipy.stats import wasserstein_distance

#: Added to every bin of the second distribution of KL(p‖q), so that a bin empty in q but
#: not in p costs a large finite amount rather than infinity.
KL_EPSILON = 1e-10


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Kullback–Leibler divergence KL(p‖q) in nats of two discrete distributions.

    Both are normalised to sum to one (counts are fine). ``q`` is smoothed by
    :data:`KL_EPSILON` per bin before normalising, so the result is finite; it is 0 for
    identical distributions and not symmetric.
    """
    p, q = _distributions(p, q)
    smoothed = (q + KL_EPSILON) / (q + KL_EPSILON).sum()
    return float(rel_entr(p, smoothed).sum())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in nats of two discrete distributions: the mean KL of each
    from their average. Symmetric, finite without smoothing, and at most ln 2.

    It is the square of SciPy's ``jensenshannon``, which is the JS distance.
    """
    p, q = _distributions(p, q)
    middle = (p + q) / 2
    return float((rel_entr(p, middle).sum() + rel_entr(q, middle).sum()) / 2)


def histogram_divergences(a: np.ndarray, b: np.ndarray, *, bins: int = 32) -> tuple[float, float]:
    """(KL(a‖b), JS) of two feature sets, per feature dimension, averaged over dimensions.

    Each dimension is binned on ``bins`` equal-width bins spanning both sets, so both
    histograms share their edges. Like :func:`wasserstein`, this compares marginals only.
    With few vectors per bin, KL is dominated by bins that ``b`` leaves empty (each costs
    about ln(1/:data:`KL_EPSILON`) ≈ 23 nats times ``a``'s share there); JS is not.
    """
    a, b = feature_sets(a, b)
    kl, js = [], []
    for column_a, column_b in zip(a.T, b.T, strict=True):
        edges = np.histogram_bin_edges(np.concatenate([column_a, column_b]), bins=bins)
        counts_a, counts_b = np.histogram(column_a, edges)[0], np.histogram(column_b, edges)[0]
        kl.append(kl_divergence(counts_a, counts_b))
        js.append(js_divergence(counts_a, counts_b))
    return float(np.mean(kl)), float(np.mean(js))


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over feature dimensions of the 1-D Wasserstein-1 (earth mover's) distance.

    Per dimension, so it compares the marginal distributions: it is not the Wasserstein
    distance between the joint D-dimensional distributions, and misses differences in how
    dimensions vary together. In the features' own units.
    """
    a, b = feature_sets(a, b)
    return float(np.mean([wasserstein_distance(x, y) for x, y in zip(a.T, b.T, strict=True)]))


#: Vectors of one set that MMD compares at most (two sets of 4,096: 8,192² distances).
MMD_MOST = 4096


def mmd(
    a: np.ndarray,
    b: np.ndarray,
    *,
    bandwidth: float | None = None,
    most: int = MMD_MOST,
    seed: int = 0,
) -> float:
    """Unbiased squared maximum mean discrepancy with a Gaussian kernel (Gretton et al., 2012).

    The kernel is exp(−‖x − y‖² / (2σ²)); σ is ``bandwidth``, or by default the median
    heuristic: the median Euclidean distance between distinct points of the pooled sets (over
    pairs at a positive distance, or 1 when all points coincide). Near 0 when both sets come
    from one distribution (it can dip slightly below 0, being unbiased); larger when they
    differ. It costs (N + M)² distances, so a set larger than ``most`` is replaced by a seeded
    random sample of ``most`` of its vectors (unbiased still, with more variance).
    """
    a, b = feature_sets(a, b)
    generator = np.random.default_rng(seed)
    a, b = (x[np.sort(generator.choice(len(x), most, replace=False))] if len(x) > most else x
            for x in (a, b))  # fmt: skip
    if bandwidth is None:
        distances = pdist(np.concatenate([a, b]))
        positive = distances[distances > 0]
        bandwidth = float(np.median(positive)) if positive.size else 1.0
    if bandwidth <= 0:
        raise ValueError(f"the kernel bandwidth must be positive; got {bandwidth}.")

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.exp(-cdist(x, y, "sqeuclidean") / (2 * bandwidth**2))

    return mmd_from_kernels(kernel(a, a), kernel(b, b), kernel(a, b))


def mmd_from_kernels(within_a: np.ndarray, within_b: np.ndarray, across: np.ndarray) -> float:
    """Unbiased MMD² from kernel matrices: k(a, a) (N, N), k(b, b) (M, M) and k(a, b) (N, M).

    The within-set means leave out the diagonal (a point compared with itself), which is
    what makes the estimate unbiased (Gretton et al., 2012, eq. 3, with all N·M cross pairs
    as in Bińkowski et al., 2018).
    """
    n, m = len(within_a), len(within_b)
    same_a = (within_a.sum() - np.trace(within_a)) / (n * (n - 1))
    same_b = (within_b.sum() - np.trace(within_b)) / (m * (m - 1))
    return float(same_a + same_b - 2 * across.mean())


def feature_sets(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two feature sets as float64 (N, D) and (M, D) arrays, checked for shape.

    Each needs at least two rows: the unbiased estimates and covariances divide by N − 1.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected two feature sets (N, D) and (M, D) of one dimension D; got {a.shape} "
            f"and {b.shape}."
        )
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"each feature set needs at least two vectors; got {len(a)} and {len(b)}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("the feature sets hold NaN or infinite values; check the encoder.")
    return a, b


class DistributionScores(BaseModel):
    """How far apart two feature sets are; 0 for identical sets except MMD² (≈ 0).

    ``kl`` and ``js`` are histogram divergences in nats averaged over dimensions
    (:func:`histogram_divergences`), ``wasserstein`` the mean per-dimension Wasserstein-1
    distance, ``mmd`` the unbiased Gaussian-kernel MMD² with the median-heuristic bandwidth.
    """

    kl: float
    js: float
    wasserstein: float
    mmd: float


def distribution_scores(a: np.ndarray, b: np.ndarray, *, bins: int = 32) -> DistributionScores:
    """All the distances of this module between feature sets ``a`` (e.g. real) and ``b``."""
    kl, js = histogram_divergences(a, b, bins=bins)
    return DistributionScores(kl=kl, js=js, wasserstein=wasserstein(a, b), mmd=mmd(a, b))


def _distributions(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.ndim != 1 or p.shape != q.shape:
        raise ValueError(
            f"expected two 1-D distributions over the same bins; got shapes {p.shape} and "
            f"{q.shape}."
        )
    for weights in (p, q):
        if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                "a distribution must hold finite non-negative weights with a positive total."
            )
    return p / p.sum(), q / q.sum()
