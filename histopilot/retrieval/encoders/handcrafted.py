"""Hand-crafted tissue features: stain, texture and nuclear morphology, computed per batch.

These are the measurements pathologists' image-analysis tools have long relied on, chosen so
each group sees a different property of H&E tissue:

- **stain**: colour deconvolution into hematoxylin, eosin and DAB optical densities (Ruifrok &
  Johnston 2001), their distributions, the joint H–E histogram and the share of bare glass;
- **texture**: uniform rotation-invariant local binary patterns (Ojala et al. 2002), grey-level
  co-occurrence statistics (Haralick et al. 1973) and Gabor energy at three scales, each on the
  grey image and on the H and E channels, so nuclear and stromal texture are seen separately;
- **nuclei**: hematoxylin-rich blobs segmented by Otsu's threshold, described by density, size,
  elongation, alignment, darkness and spacing.

Everything is vectorised over the batch with NumPy and OpenCV; only the per-nucleus statistics
loop over images. ``FEATURE_GROUPS`` names each group's columns so a model or a person can
see what a dimension means.
"""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np
from scipy.spatial import cKDTree
from skimage.color import hed_from_rgb

#: Optical densities above these are clipped when binning: H and E of well-stained tissue
#: stay below 1 (Macenko-normalised tiles peak around 0.6).
STAIN_OD_MAX = 1.0
#: Pixels whose summed optical density stays below this are glass (about 82 % transmission).
GLASS_OD = 0.25
LBP_RADII = (1, 2, 4)
GLCM_LEVELS = 16
GLCM_DISTANCES = (1, 4)
#: Gabor wavelength in pixels at full resolution; the pyramid adds 8 and 16 px.
GABOR_WAVELENGTH = 4.0
GABOR_SCALES = 3
GABOR_ORIENTATIONS = 4
HE_HIST_BINS = 6
#: Nuclei smaller than this many pixels are noise at 0.5 µm/px (a lymphocyte is ~50 px).
MIN_NUCLEUS_PX = 12
NUCLEUS_AREA_BINS = (3.5, 5.0, 6.0, 7.0, 8.0, 20.0)  # log2 px
#: Minimum hematoxylin OD for a nucleus, so a tile with no nuclei does not get Otsu's
#: threshold applied to its background noise.
MIN_NUCLEUS_OD = 0.2


def stain_densities(images: np.ndarray) -> np.ndarray:
    """Hematoxylin, eosin and DAB optical densities, float32 (B, H, W, 3), clipped at 0."""
    od = -np.log10(np.maximum(images, 1).astype(np.float32) / 255.0)
    hed = od.reshape(-1, 3) @ hed_from_rgb.astype(np.float32)
    return np.maximum(hed, 0).reshape(od.shape)


def _distribution(values: np.ndarray) -> np.ndarray:
    """Mean, standard deviation and 10th/50th/90th percentiles of each image's values."""
    flat = values.reshape(len(values), -1)
    percentiles = np.percentile(flat, (10, 50, 90), axis=1).T
    return np.column_stack([flat.mean(1), flat.std(1), percentiles])


def stain_features(images: np.ndarray, hed: np.ndarray) -> np.ndarray:
    total_od = -np.log10(np.maximum(images, 1).astype(np.float32) / 255.0).sum(-1)
    hsv = cv2.cvtColor(images.reshape(-1, images.shape[2], 3), cv2.COLOR_RGB2HSV)
    saturation = hsv.reshape(images.shape)[..., 1].astype(np.float32) / 255.0
    glass = (total_od < GLASS_OD).reshape(len(images), -1).mean(1)
    return np.column_stack(
        [
            *(_distribution(hed[..., channel]) for channel in range(3)),
            glass,
            _distribution(saturation)[:, :2],
        ]
    )


def he_histogram(hed: np.ndarray) -> np.ndarray:
    """Joint histogram of H and E density (square-rooted, so cosine acts as Hellinger)."""
    bins = HE_HIST_BINS
    scaled = np.clip(hed[..., :2] / STAIN_OD_MAX * bins, 0, bins - 1).astype(np.int64)
    cell = (scaled[..., 0] * bins + scaled[..., 1]).reshape(len(hed), -1)
    counts = _per_image_bincount(cell, bins * bins)
    return np.sqrt(counts / counts.sum(1, keepdims=True))


def _per_image_bincount(values: np.ndarray, size: int) -> np.ndarray:
    """Histogram of integer ``values`` (B, N) in [0, size) for each image, in one bincount."""
    offsets = np.arange(len(values), dtype=np.int64)[:, None] * size
    counts = np.bincount((values + offsets).ravel(), minlength=len(values) * size)
    return counts.reshape(len(values), size).astype(np.float32)


def lbp_histograms(channel: np.ndarray) -> np.ndarray:
    """Uniform rotation-invariant LBP (8 neighbours) histograms at each of ``LBP_RADII``."""
    return np.column_stack([_lbp_histogram(channel, radius) for radius in LBP_RADII])


def _lbp_histogram(channel: np.ndarray, radius: int) -> np.ndarray:
    height, width = channel.shape[1:]
    r = radius
    centre = channel[:, r : height - r, r : width - r]
    steps = [(-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r)]
    code = np.zeros(centre.shape, np.uint8)
    for bit, (dy, dx) in enumerate(steps):
        neighbour = channel[:, r + dy : height - r + dy, r + dx : width - r + dx]
        code |= (neighbour >= centre).astype(np.uint8) << bit
    labels = _uniform_pattern_labels()[code].reshape(len(channel), -1)
    counts = _per_image_bincount(labels, 10)
    return np.sqrt(counts / counts.sum(1, keepdims=True))


@cache
def _uniform_pattern_labels() -> np.ndarray:
    """Label of each 8-bit pattern: its number of ones when it is uniform (at most two 0/1
    transitions around the circle), else 9."""
    codes = np.arange(256)
    bits = (codes[:, None] >> np.arange(8)) & 1
    transitions = np.abs(np.diff(bits, axis=1, append=bits[:, :1])).sum(1)
    return np.where(transitions <= 2, bits.sum(1), 9).astype(np.int64)


def glcm_features(channel: np.ndarray) -> np.ndarray:
    """Contrast, homogeneity, energy, correlation and entropy of the symmetric co-occurrence
    matrix, averaged over four directions, at each of ``GLCM_DISTANCES``."""
    levels = GLCM_LEVELS
    quantised = (channel.astype(np.int64) * levels) // 256
    i, j = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")
    per_distance = []
    for distance in GLCM_DISTANCES:
        properties = []
        for dy, dx in ((0, distance), (distance, 0), (distance, distance), (distance, -distance)):
            first, second = _shifted_pairs(quantised, dy, dx)
            pairs = (first * levels + second).reshape(len(channel), -1)
            matrix = _per_image_bincount(pairs, levels * levels).reshape(-1, levels, levels)
            matrix = matrix + matrix.transpose(0, 2, 1)
            matrix /= matrix.sum((1, 2), keepdims=True)
            mean = (matrix * i).sum((1, 2))[:, None, None]
            variance = (matrix * (i - mean) ** 2).sum((1, 2))
            covariance = (matrix * (i - mean) * (j - mean)).sum((1, 2))
            properties.append(
                np.column_stack(
                    [
                        np.log1p((matrix * (i - j) ** 2).sum((1, 2))),
                        (matrix / (1 + (i - j) ** 2)).sum((1, 2)),
                        np.sqrt((matrix**2).sum((1, 2))),
                        covariance / np.maximum(variance, 1e-9),
                        -(matrix * np.log(matrix + 1e-12)).sum((1, 2)),
                    ]
                )
            )
        per_distance.append(np.mean(properties, axis=0))
    return np.column_stack(per_distance)


def _shifted_pairs(image: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel values and their neighbours ``dy`` rows down and ``dx`` columns across."""
    height, width = image.shape[1:]
    rows, rows_shifted = slice(0, height - dy), slice(dy, height)
    if dx >= 0:
        cols, cols_shifted = slice(0, width - dx), slice(dx, width)
    else:
        cols, cols_shifted = slice(-dx, width), slice(0, width + dx)
    return image[:, rows, cols], image[:, rows_shifted, cols_shifted]


@cache
def _gabor_bank() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Even/odd Gabor kernel pairs at ``GABOR_ORIENTATIONS`` orientations, one octave wide."""
    wavelength = GABOR_WAVELENGTH
    sigma = 0.56 * wavelength
    size = int(2 * round(3 * sigma) + 1)
    bank = []
    for step in range(GABOR_ORIENTATIONS):
        theta = step * np.pi / GABOR_ORIENTATIONS
        even = cv2.getGaborKernel((size, size), sigma, theta, wavelength, 0.5, 0)
        odd = cv2.getGaborKernel((size, size), sigma, theta, wavelength, 0.5, np.pi / 2)
        bank.append(((even - even.mean()).astype(np.float32), odd.astype(np.float32)))
    return tuple(bank)


def gabor_features(channel: np.ndarray) -> np.ndarray:
    """Per scale: mean Gabor energy over orientations and its orientation spread (high for
    aligned structures such as muscle fibres, low for isotropic ones).

    Coarser scales apply the same small kernels to a Gaussian pyramid rather than growing the
    kernels, which keeps each filter a few hundred multiply-adds per pixel.
    """
    energy = np.empty((len(channel), GABOR_SCALES, GABOR_ORIENTATIONS), np.float32)
    for row, image in enumerate(channel.astype(np.float32) / 255.0):
        for scale in range(GABOR_SCALES):
            for column, (even, odd) in enumerate(_gabor_bank()):
                real = cv2.filter2D(image, -1, even, borderType=cv2.BORDER_REFLECT)
                imaginary = cv2.filter2D(image, -1, odd, borderType=cv2.BORDER_REFLECT)
                energy[row, scale, column] = cv2.magnitude(real, imaginary).mean()
            image = cv2.pyrDown(image)
    spread = (energy.max(-1) - energy.min(-1)) / np.maximum(energy.mean(-1), 1e-6)
    return np.column_stack([np.log(energy.mean(-1) + 1e-4), spread])


NUCLEUS_FEATURES = 8 + len(NUCLEUS_AREA_BINS) - 1


def nucleus_features(hematoxylin: np.ndarray) -> np.ndarray:
    """Nuclear density, size distribution, shape, alignment, darkness and spacing per image."""
    return np.stack([_nuclei_of(image) for image in hematoxylin])


def nucleus_mask(hematoxylin: np.ndarray) -> np.ndarray:
    """Nuclei of one image as a uint8 mask: hematoxylin above Otsu's threshold (and above
    ``MIN_NUCLEUS_OD``), opened to drop specks."""
    scaled = np.clip(hematoxylin / STAIN_OD_MAX * 255, 0, 255).astype(np.uint8)
    smooth = cv2.GaussianBlur(scaled, (3, 3), 0)
    otsu, _ = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(otsu, MIN_NUCLEUS_OD / STAIN_OD_MAX * 255)
    return cv2.morphologyEx(
        (smooth > threshold).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)
    )


def _nuclei_of(hematoxylin: np.ndarray) -> np.ndarray:
    mask = nucleus_mask(hematoxylin)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    kept = np.flatnonzero(areas >= MIN_NUCLEUS_PX)
    features = np.zeros(NUCLEUS_FEATURES, np.float32)
    if len(kept) == 0:
        return features
    ys, xs = np.nonzero(labels)
    label_of = labels[ys, xs] - 1
    # Second moments per component give each nucleus's elongation and orientation.
    n = count - 1
    sums = [np.bincount(label_of, weights=w, minlength=n) for w in (xs, ys, xs * xs, ys * ys)]
    sum_xy = np.bincount(label_of, weights=xs * ys, minlength=n)
    darkness = np.bincount(label_of, weights=hematoxylin[ys, xs], minlength=n)
    area = areas[kept]
    mean_x, mean_y = sums[0][kept] / area, sums[1][kept] / area
    var_x = sums[2][kept] / area - mean_x**2
    var_y = sums[3][kept] / area - mean_y**2
    cov = sum_xy[kept] / area - mean_x * mean_y
    half_gap = np.sqrt(((var_x - var_y) / 2) ** 2 + cov**2)
    major, minor = (var_x + var_y) / 2 + half_gap, np.maximum((var_x + var_y) / 2 - half_gap, 1e-6)
    elongation = np.log(np.sqrt(major / minor))
    # Orientation coherence: 1 when all nuclei point the same way (smooth muscle), ~0 at random.
    angle = 0.5 * np.arctan2(2 * cov, var_x - var_y)
    coherence = np.abs(np.average(np.exp(2j * angle), weights=elongation + 1e-6))
    log_area = np.log2(area)
    size_histogram = np.histogram(log_area, bins=NUCLEUS_AREA_BINS)[0].astype(np.float32)
    spacing = (
        np.median(cKDTree(centroids[1:][kept]).query(centroids[1:][kept], k=2)[0][:, 1])
        if len(kept) > 1
        else float(max(hematoxylin.shape))
    )
    pixels = hematoxylin.size
    features[:8] = (
        np.log1p(len(kept) / pixels * 1e4),
        area.sum() / pixels,
        log_area.mean(),
        log_area.std(),
        elongation.mean(),
        coherence,
        (darkness[kept] / area).mean(),
        np.log(spacing),
    )
    features[8:] = np.sqrt(size_histogram / size_histogram.sum())
    return features


def feature_groups(images: np.ndarray) -> dict[str, np.ndarray]:
    """Every feature group of a uint8 RGB batch (B, H, W, 3), float32 (B, n_group) each."""
    images = np.ascontiguousarray(images[..., :3], dtype=np.uint8)
    hed = stain_densities(images)
    grey = cv2.cvtColor(images.reshape(-1, images.shape[2], 3), cv2.COLOR_RGB2GRAY)
    channels = {
        "grey": grey.reshape(images.shape[:3]),
        "hematoxylin": _to_uint8(hed[..., 0]),
        "eosin": _to_uint8(hed[..., 1]),
    }
    groups = {"stain": stain_features(images, hed), "he_histogram": he_histogram(hed)}
    for name, channel in channels.items():
        groups[f"lbp_{name}"] = lbp_histograms(channel)
        groups[f"glcm_{name}"] = glcm_features(channel)
        groups[f"gabor_{name}"] = gabor_features(channel)
    groups["nuclei"] = nucleus_features(hed[..., 0])
    return {name: values.astype(np.float32) for name, values in groups.items()}


def _to_uint8(density: np.ndarray) -> np.ndarray:
    return np.clip(density / STAIN_OD_MAX * 255, 0, 255).astype(np.uint8)
