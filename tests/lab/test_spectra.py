"""Spectral helpers against numpy on matrices with known singular values."""

import numpy as np
import torch

from lorakit_lab.spectra import captured_energy, energy_rank, left_basis, projected_energy, subspace_similarity


def _matrix(singular_values, d=12, k=9, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v, _ = np.linalg.qr(rng.normal(size=(k, k)))
    s = np.zeros((d, k))
    s[: len(singular_values), : len(singular_values)] = np.diag(singular_values)
    return torch.tensor(u @ s @ v.T), u


def test_energy_rank_and_captured_energy():
    m, _ = _matrix([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    assert energy_rank(m, 0.6) == 1 and energy_rank(m, 0.9) == 2 and energy_rank(m, 0.99) == 4
    assert abs(captured_energy(m, 2) - 13 / 14.25) < 1e-9
    assert energy_rank(torch.zeros(3, 3)) == 0


def test_subspace_similarity_and_projection():
    m, u = _matrix([3.0, 2.0, 1.0])
    basis = left_basis(m, 3)
    assert abs(subspace_similarity(basis, torch.tensor(u), 3, 3) - 1.0) < 1e-9  # same span
    assert abs(subspace_similarity(basis, torch.tensor(u[:, 3:]), 3, 5)) < 1e-9  # orthogonal spans
    assert abs(projected_energy(m, torch.tensor(u[:, :1])) - 9 / 14) < 1e-9
