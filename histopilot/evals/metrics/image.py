"""Image metrics: how close each image of a pair is to the other, and how far apart two sets
of images are through their features.

Pairs come as uint8 RGB batches (B, H, W, 3) compared element-wise (image i with image i);
the pair metrics work on [0, 1] pixels and return one value per pair. The set metrics, FID's
Fréchet distance and KID, take feature arrays (N, D) from any encoder (Inception for the
published FID/KID, a pathology encoder for tiles) so that no network is loaded here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import sqrtm
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from histopilot.evals.metrics.distribution import feature_sets, mmd_from_kernels

#: LPIPS needs ImageNet AlexNet weights; they are used only when already in the torch hub
#: cache, never downloaded.
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
#: KID keeps whole kernel matrices in memory up to this many entries (4096², 128 MiB each).
KID_CACHED = 4096**2
#: SSIM's standard window: a Gaussian of σ = 1.5 px cut at 11 px (Wang et al., 2004).
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
#: MS-SSIM's weights of its five scales, finest first (Wang, Simoncelli & Bovik, 2003).
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: (scales, window) tried in turn until the window fits the coarsest scale: coarse scales go
#: first, keeping the standard window; then, at two scales, the window shrinks.
MS_SSIM_PLANS = [(scales, SSIM_WINDOW) for scales in (5, 4, 3, 2)] + [(2, w) for w in (9, 7, 5, 3)]


def ssim(first: np.ndarray, second: np.ndarray) -> list[float]:
    """SSIM per image pair, on [0, 1] pixels (1 = identical). See :func:`ssim_of_unit`."""
    return ssim_of_unit(*_unit_pairs(first, second))


def ssim_of_unit(first: torch.Tensor, second: torch.Tensor) -> list[float]:
    """SSIM per pair of float images (B, C, H, W) on [0, 1], averaged over channels.

    The standard 11-px Gaussian window, narrowed for images under 11 px so that it fits.
    The mean is over every pixel, borders included (reflection-padded), as torchmetrics
    computes it; scikit-image instead leaves out a border of half a window.
    """
    window = _window(min(first.shape[-2:]))
    values = structural_similarity_index_measure(
        first, second, data_range=1.0, kernel_size=window, sigma=_sigma(window), reduction="none"
    )
    return values.tolist()


def ms_ssim(first: np.ndarray, second: np.ndarray) -> list[float]:
    """Multi-scale SSIM per image pair, on [0, 1] pixels (1 = identical).

    The standard five scales with an 11-px window need images of at least 11·2⁴ = 176 px a
    side; smaller images drop the coarsest scales (keeping the remaining weights, rescaled to
    sum to one), then at two scales narrow the window, down to 6 px a side. Scores of
    different image sizes are therefore not comparable. Negative contrast terms count as 0
    (torchmetrics' ``normalize="relu"``), which keeps noisy pairs from giving NaN.
    """
    first_unit, second_unit = _unit_pairs(first, second)
    side = min(first_unit.shape[-2:])
    plan = next(((s, w) for s, w in MS_SSIM_PLANS if _fits(side, s, w)), None)
    if plan is None:
        scales, window = MS_SSIM_PLANS[-1]
        raise ValueError(
            f"MS-SSIM needs images of at least {window * 2 ** (scales - 1)} px a side; got "
            f"{first_unit.shape[-2]}×{first_unit.shape[-1]}. Use ssim for smaller images."
        )
    scales, window = plan
    betas = np.array(MS_SSIM_BETAS[:scales]) / sum(MS_SSIM_BETAS[:scales])
    values = multiscale_structural_similarity_index_measure(
        first_unit,
        second_unit,
        data_range=1.0,
        kernel_size=window,
        sigma=_sigma(window),
        betas=tuple(betas.tolist()),
        normalize="relu",
        reduction="none",
    )
    return values.tolist()


def psnr(first: np.ndarray, second: np.ndarray) -> list[float]:
    """Peak signal-to-noise ratio in dB per image pair: 10·log10(peak² / MSE).

    The peak is the full uint8 range, so an offset of d levels everywhere gives
    20·log10(255 / d). Identical images give 100 dB (the error is floored at 10⁻¹⁰).
    """
    first_unit, second_unit = _unit_pairs(first, second)
    error = ((first_unit - second_unit) ** 2).mean((1, 2, 3)).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / error)).tolist()


def mae(first: np.ndarray, second: np.ndarray) -> list[float]:
    """Mean absolute error per image pair, on [0, 1] pixels (0 = identical)."""
    first_unit, second_unit = _unit_pairs(first, second)
    return (first_unit - second_unit).abs().mean((1, 2, 3)).tolist()


def nrmse(first: np.ndarray, second: np.ndarray) -> list[float]:
    """Normalised root-mean-square error per pair, ``first`` being the reference.

    The RMS error divided by the reference's root mean square (scikit-image's
    ``normalized_root_mse`` with its default "euclidean" normalisation), so it is a relative
    error, independent of the pixel scale. Infinite for an all-black reference.
    """
    reference, other = _unit_pairs(first, second)
    error = ((reference - other) ** 2).mean((1, 2, 3))
    return (error.sqrt() / (reference**2).mean((1, 2, 3)).sqrt()).tolist()


def lpips(first: np.ndarray, second: np.ndarray) -> list[float] | None:
    """LPIPS (Zhang et al., 2018; AlexNet) per pair, 0 = identical; or None when the AlexNet
    weights (:data:`ALEXNET_WEIGHTS`) are not in the local torch hub cache."""
    if not (Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS).is_file():
        return None
    first_unit, second_unit = _unit_pairs(first, second)
    metric = _lpips_network()
    with torch.no_grad():
        return [
            float(metric(a * 2 - 1, b * 2 - 1))
            for a, b in zip(first_unit[:, None], second_unit[:, None], strict=True)
        ]


@functools.cache
def _lpips_network():
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex").eval()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets: FID's formula
    (Heusel et al., 2017), ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½).

    FID proper uses Inception-v3 pool features of at least a few thousand images; with
    fewer images than dimensions the covariances are singular and the value is biased up.
    Computed in float64. The square root of Σa Σb is real in exact arithmetic (a product of
    covariance matrices has non-negative eigenvalues); rounding can leave it tiny imaginary
    parts, which are dropped.
    """
    a, b = feature_sets(features_a, features_b)
    covariance_a, covariance_b = (np.atleast_2d(np.cov(x, rowvar=False)) for x in (a, b))
    cross = np.real(sqrtm(covariance_a @ covariance_b))
    difference = a.mean(0) - b.mean(0)
    spread = np.trace(covariance_a) + np.trace(covariance_b) - 2 * np.trace(cross)
    return float(difference @ difference + spread)


def kernel_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., 2018): (mean, standard deviation) over
    random subsets of the unbiased MMD² with the polynomial kernel (x·y / D + 1)^degree.

    Each subset draws ``subset_size`` vectors (at most the smaller set's size) from each set
    without replacement, using ``seed``. Unlike FID it is unbiased, so it suits small sets,
    and it is 0 in expectation for two samples of one distribution (it can be negative).
    """
    a, b = feature_sets(features_a, features_b)
    size = min(subset_size, len(a), len(b))
    if subsets < 1 or size < 2:
        raise ValueError(f"KID needs at least one subset of two vectors; got {subsets} of {size}.")
    generator = np.random.default_rng(seed)

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / a.shape[1] + 1) ** degree

    # Sets small enough to hold their kernels are multiplied once and each subset indexes the
    # result; larger sets compute each subset's kernels (same draws, same values either way).
    small = max(len(a), len(b)) ** 2 <= KID_CACHED
    whole = (kernel(a, a), kernel(b, b), kernel(a, b)) if small else None
    values = []
    for _ in range(subsets):
        i = generator.choice(len(a), size, replace=False)
        j = generator.choice(len(b), size, replace=False)
        if whole is None:
            x, y = a[i], b[j]
            values.append(mmd_from_kernels(kernel(x, x), kernel(y, y), kernel(x, y)))
        else:
            aa, bb, ab = whole
            values.append(mmd_from_kernels(aa[np.ix_(i, i)], bb[np.ix_(j, j)], ab[np.ix_(i, j)]))
    return float(np.mean(values)), float(np.std(values))


def _window(side: int) -> int:
    """The largest odd SSIM window, up to the standard one, that fits ``side`` px."""
    return min(SSIM_WINDOW, side if side % 2 else side - 1)


def _sigma(window: int) -> float:
    """The Gaussian σ that makes torchmetrics use a ``window``-px window.

    torchmetrics sizes a Gaussian window from σ alone (2·⌊3.5σ + 0.5⌋ + 1 px), ignoring its
    ``kernel_size``; scaling σ with the window (1.5 at 11 px) gives exactly that window for
    every odd size up to 11.
    """
    return SSIM_SIGMA * window / SSIM_WINDOW


def _fits(side: int, scales: int, window: int) -> bool:
    # The window must fit the coarsest scale, ``scales - 1`` halvings down; torchmetrics
    # also asks ``side // (scales - 1)²`` to exceed ``window - 1``, stricter at four scales.
    coarsest = side // 2 ** (scales - 1)
    return coarsest >= window and side // max(1, scales - 1) ** 2 > window - 1


def _unit_pairs(first: np.ndarray, second: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint8 RGB batches (B, H, W, 3) as float tensors (B, 3, H, W) on [0, 1]."""
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.ndim != 4 or first.shape[-1] != 3 or not len(first):
        raise ValueError(
            "expected two non-empty uint8 RGB batches of one shape (B, H, W, 3); got shapes "
            f"{first.shape} and {second.shape}."
        )
    if first.dtype != np.uint8 or second.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 pixels (0-255); got {first.dtype} and {second.dtype}. Convert "
            "[0, 1] floats with (images * 255).round().astype(np.uint8)."
        )
    return _unit(first), _unit(second)


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
