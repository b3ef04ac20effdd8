"""The style statistics on hand-made images, and the per-class sub-populations on the real digits."""

import numpy as np

from lorakit_lab import digits


def stroke(shear: float, width: int = 1) -> np.ndarray:
    """A vertical bar whose column moves by `shear` pixels per row upwards."""
    image = np.zeros((8, 8), dtype=np.float32)
    for y in range(8):
        x = int(round(3.5 + shear * (3.5 - y)))
        image[y, x : x + width] = 1.0
    return image


def test_slant_sign_and_size():
    upright, right, left = stroke(0.0), stroke(0.4), stroke(-0.4)
    values = digits.slant(np.stack([upright, right, left, np.zeros((8, 8), np.float32)]))
    assert abs(values[0]) < 1e-9 and values[3] == 0.0  # a blank image has no slant, not a NaN
    assert values[1] > 0.3 and values[2] < -0.3 and abs(values[1] + values[2]) < 1e-9


def test_ink_counts_mass():
    thin, thick = stroke(0.0, 1), stroke(0.0, 2)
    assert np.allclose(digits.ink(np.stack([thin, thick])), [8 / 64, 16 / 64])


def test_sub_population_keeps_the_digit_mix():
    images, labels = digits.load_digits()
    assert images.shape == (1797, 8, 8) and 0.0 <= images.min() and images.max() == 1.0
    for style in (digits.Style("heavy", "ink", ""), digits.Style("slanted", "slant", "")):
        chosen = digits.select(style, images, labels)
        counts, totals = np.bincount(labels[chosen], minlength=10), np.bincount(labels, minlength=10)
        assert np.all(np.abs(counts - totals / 3) <= 1)
        values = digits.statistic(style.stat, images)
        for digit in range(10):  # within each class, every chosen image beats every other one
            inside = values[chosen][labels[chosen] == digit]
            outside = np.delete(values, chosen)[np.delete(labels, chosen) == digit]
            assert inside.min() >= outside.max()
