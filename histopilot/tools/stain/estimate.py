"""Stain matrices estimated from the tissue pixels of each image in a batch.

* Macenko et al. (2009): project tissue OD onto the plane of its two main directions and take
  the extreme angles (1st and 99th percentiles) as the hematoxylin and eosin vectors.
* Vahadane et al. (2016): factor tissue OD into non-negative, sparse concentrations and stain
  vectors (sparse NMF). Here by multiplicative updates started from the Macenko estimate, which
  needs no dictionary-learning library and runs batched on a GPU.

Every function takes OD (B, N, 3) with a tissue mask (B, N) and works on all images at once;
an image with too little tissue gets NaNs, which the caller turns into a flag (and replaces
with :func:`usable` before solving with the matrix).
"""

from __future__ import annotations

import torch

from histopilot.tools.stain.optical import RUIFROK_HED, masked_angle_percentiles

ANGLE_PERCENT = 1.0  # Macenko's α: robust extremes instead of the true minimum and maximum
SPARSITY = 0.02  # L1 weight on concentrations in the sparse factorization (OD units)
_EPS = 1e-6


def macenko_matrix(od: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    """Stain matrices (B, 3, 2), hematoxylin then eosin, unit OD vectors."""
    weights = tissue.unsqueeze(-1).float()
    count = weights.sum(1).clamp_min(2.0)
    mean = (od * weights).sum(1) / count
    centred = (od - mean.unsqueeze(1)) * weights
    covariance = centred.transpose(1, 2) @ centred / (count.unsqueeze(-1) - 1)
    _, vectors = torch.linalg.eigh(covariance)
    plane = vectors[:, :, 1:3]  # the two largest directions, in ascending order
    projected = od @ plane
    angles = torch.atan2(projected[..., 1], projected[..., 0])
    extremes = masked_angle_percentiles(angles, tissue, (ANGLE_PERCENT, 100 - ANGLE_PERCENT))
    directions = torch.stack([extremes.cos(), extremes.sin()], dim=1)  # (B, 2, 2 extremes)
    return hematoxylin_first(plane @ directions)


def vahadane_matrix(
    od: torch.Tensor, tissue: torch.Tensor, *, iterations: int = 60, sample: int = 16384
) -> torch.Tensor:
    """Stain matrices (B, 3, 2) by sparse non-negative factorization of tissue OD.

    At most ``sample`` pixels per image take part (a fixed, evenly spread subset), which keeps
    the cost of the estimate for a 1024 px tile close to that of a 224 px one (unmixing every
    pixel afterwards is what makes Vahadane slower than Macenko).
    """
    if od.shape[1] > sample:
        keep = torch.linspace(0, od.shape[1] - 1, sample, device=od.device).long()
        od, tissue = od[:, keep], tissue[:, keep]
    data = od.clamp_min(0) * tissue.unsqueeze(-1)
    start = macenko_matrix(od, tissue)
    broken = ~torch.isfinite(start).flatten(1).all(1)
    matrix = usable(start).clamp_min(_EPS)
    amounts = sparse_concentrations(data, matrix, iterations=0)
    for _ in range(iterations):
        amounts = _update_amounts(data, matrix, amounts)
        matrix = (
            matrix
            * (data.transpose(1, 2) @ amounts)
            / (matrix @ (amounts.transpose(1, 2) @ amounts) + _EPS)
        )
        norms = matrix.norm(dim=1, keepdim=True).clamp_min(_EPS)
        matrix, amounts = matrix / norms, amounts * norms
    return torch.where(broken[:, None, None], start, hematoxylin_first(matrix))


def usable(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with each non-finite estimate replaced by the Ruifrok–Johnston H and E."""
    broken = ~torch.isfinite(matrix).flatten(1).all(1)
    default = RUIFROK_HED[:2].T.to(matrix)
    default = default / default.norm(dim=0, keepdim=True)
    return torch.where(broken[:, None, None], default.expand_as(matrix), matrix)


def sparse_concentrations(
    od: torch.Tensor, matrix: torch.Tensor, *, iterations: int = 20
) -> torch.Tensor:
    """Non-negative, L1-penalised concentrations (B, N, 2) of ``od`` for fixed stain vectors."""
    amounts = (od @ torch.linalg.pinv(matrix).transpose(1, 2)).clamp_min(_EPS)
    for _ in range(iterations):
        amounts = _update_amounts(od.clamp_min(0), matrix, amounts)
    return amounts


def _update_amounts(data: torch.Tensor, matrix: torch.Tensor, amounts: torch.Tensor):
    gram = matrix.transpose(1, 2) @ matrix
    return amounts * (data @ matrix) / (amounts @ gram + SPARSITY + _EPS)


def hematoxylin_first(vectors: torch.Tensor) -> torch.Tensor:
    """Order two stain vectors (B, 3, 2): hematoxylin absorbs more red light than eosin."""
    swap = vectors[:, 0, 0] < vectors[:, 0, 1]
    ordered = torch.where(swap[:, None, None], vectors.flip(-1), vectors)
    return ordered / ordered.norm(dim=1, keepdim=True).clamp_min(_EPS)


def stain_angle(matrix: torch.Tensor) -> torch.Tensor:
    """Angle (B,) in radians between the two stain vectors: near 0 means one stain only."""
    cosine = (matrix[:, :, 0] * matrix[:, :, 1]).sum(1).clamp(-1.0, 1.0)
    return torch.arccos(cosine)
