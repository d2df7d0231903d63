"""Colour-space conversions on batched 0–255 RGB tensors (sRGB, D65 white)."""

from __future__ import annotations

import torch

from histopilot.slide.tissue import pen_ink

_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])
_DELTA = 6.0 / 29.0


def rgb_to_lab(pixels: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* of (..., 3) RGB in 0–255 (L in 0–100)."""
    unit = pixels / 255.0
    linear = torch.where(unit > 0.04045, ((unit + 0.055) / 1.055) ** 2.4, unit / 12.92)
    xyz = linear @ _RGB_TO_XYZ.to(pixels).T / _WHITE.to(pixels)
    f = torch.where(
        xyz > _DELTA**3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * _DELTA**2) + 4 / 29
    )
    return torch.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """0–255 RGB (clipped to the gamut) of (..., 3) CIE L*a*b*."""
    fy = (lab[..., 0] + 16) / 116
    f = torch.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29)) * _WHITE.to(lab)
    linear = (xyz @ torch.linalg.inv(_RGB_TO_XYZ).to(lab).T).clamp(0.0, 1.0)
    unit = torch.where(
        linear > 0.0031308, 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055, 12.92 * linear
    )
    return (unit * 255.0).clamp(0.0, 255.0)


# At tile magnification, strongly stained nuclei meet the black and dark-teal ink rules
# (measured on CMU-1 at 0.5 µm/px); green, bright blue and red ink stay distinct from stains.
TILE_INKS = frozenset({"green", "light_blue", "red"})


def pen_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Marker ink (True) in (..., 3) RGB 0–255, by the slide layer's rules (OpenCV HSV)."""
    high, _ = pixels.max(-1)
    low, _ = pixels.min(-1)
    spread = (high - low).clamp_min(1e-6)
    red, green, blue = pixels.unbind(-1)
    hue = torch.where(
        high == red,
        60 * (green - blue) / spread,
        torch.where(
            high == green, 120 + 60 * (blue - red) / spread, 240 + 60 * (red - green) / spread
        ),
    )
    hue = torch.where(high == low, torch.zeros_like(hue), hue) % 360 / 2
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-6) * 255, 0.0)
    return pen_ink(hue.round(), saturation.round(), high, inks=TILE_INKS)
