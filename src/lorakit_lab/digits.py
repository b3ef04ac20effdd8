"""Real handwritten digits and two measurable handwriting styles: ink mass and slant.

The images are scikit-learn's copy of the UCI optical-recognition digits (1,797 scans of 43
writers, 8x8 pixels, 17 grey levels), shipped inside the package: nothing is downloaded.
Pixels are scaled to [0, 1] (1 = ink).

For an image I(y, x) with mass m = Σ I, centroid (x̄, ȳ) and central moments
mu11 = Σ I·(x - x̄)(y - ȳ) / m and mu02 = Σ I·(y - ȳ)² / m (y grows downwards):

    ink   = m / 64                  mean ink per pixel (heavier strokes -> larger)
    slant = -mu11 / mu02            horizontal shift per row upwards, in pixels (> 0: leans right)

A style sub-population is the top third of one statistic *within each digit class*, so it holds
the same mix of digits as the whole set and differs only in how the digits are written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorakit.errors import LorakitError

STATISTICS = ("ink", "slant")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) float32 in [0, 1], labels (N,) int) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise LorakitError("the digits come from scikit-learn, which is missing: pip install 'lorakit[lab]'") from err
    data = sklearn_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def ink(images: np.ndarray) -> np.ndarray:
    """Mean ink per pixel of each image (N, H, W) -> (N,)."""
    return images.mean(axis=(1, 2))


def slant(images: np.ndarray) -> np.ndarray:
    """-mu11/mu02 per image: > 0 when the top of the digit lies right of its bottom; 0 for a blank image."""
    n, h, w = images.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    img = images.astype(np.float64)
    mass = img.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    cx = (img * xs).sum(axis=(1, 2)) / safe
    cy = (img * ys).sum(axis=(1, 2)) / safe
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    mu11 = (img * dx * dy).sum(axis=(1, 2)) / safe
    mu02 = (img * dy * dy).sum(axis=(1, 2)) / safe
    return np.where(mu02 > 1e-9, -mu11 / np.where(mu02 > 1e-9, mu02, 1.0), 0.0)


def statistic(name: str, images: np.ndarray) -> np.ndarray:
    if name not in STATISTICS:
        raise LorakitError(f"unknown style statistic {name!r}; choose one of {', '.join(STATISTICS)}")
    return ink(images) if name == "ink" else slant(images)


@dataclass
class Style:
    """A sub-population: the `share` of each digit class with the largest `stat`."""

    name: str
    stat: str
    description: str
    share: float = 1 / 3


def select(style: Style, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of the images in `style`'s sub-population (top `share` of its statistic per class)."""
    values = statistic(style.stat, images)
    chosen = []
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        keep = max(1, round(style.share * len(members)))
        order = np.argsort(-values[members], kind="stable")
        chosen.append(members[order[:keep]])
    return np.sort(np.concatenate(chosen))


def summary(images: np.ndarray) -> dict[str, float]:
    """Mean and standard error of each style statistic over a set of images."""
    out = {"n": int(len(images))}
    for name in STATISTICS:
        values = statistic(name, images)
        out[name] = float(values.mean())
        out[f"{name}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return out


def paired_shift(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Mean and standard error of each statistic's change from `reference`, image i against image i.

    Samples that start from the same noise share most of their variation, so the paired error of a
    shift is far smaller than the two sets' own standard errors combined.
    """
    out = {}
    for name in STATISTICS:
        change = statistic(name, images) - statistic(name, reference)
        out[f"{name}_shift"] = float(change.mean())
        out[f"{name}_shift_se"] = float(change.std(ddof=1) / np.sqrt(len(change))) if len(change) > 1 else 0.0
    return out
