"""Spectral tools for looking at weight updates (the LoRA paper, Section 7).

* energy_rank(M, 0.9): the fewest singular directions holding 90% of ||M||_F^2 (Eckart-Young:
  the best rank-k approximation keeps exactly sum_{i<=k} s_i^2 of the energy).
* captured_energy(M, k): that share for the best rank-k approximation.
* subspace_similarity(U1, U2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), in [0, 1]: 1 when
  one span contains the other, about max(i, j)/d for random subspaces of R^d.
* projected_energy(M, U): the share of M's energy inside span(U) (what an adapter's column space
  captures of another update).
"""

from __future__ import annotations

import torch


def singular_values(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m.detach().double())


def energy_rank(m: torch.Tensor, share: float = 0.9) -> int:
    s2 = singular_values(m) ** 2
    total = s2.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype)).item()) + 1


def captured_energy(m: torch.Tensor, k: int) -> float:
    s2 = singular_values(m) ** 2
    total = s2.sum()
    return float(s2[:k].sum() / total) if total > 0 else 0.0


def left_basis(m: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Orthonormal top-k left singular vectors of m (columns)."""
    u, _, _ = torch.linalg.svd(m.detach().double(), full_matrices=False)
    return u if k is None else u[:, :k]


def subspace_similarity(u1: torch.Tensor, u2: torch.Tensor, i: int, j: int) -> float:
    overlap = u1[:, :i].T @ u2[:, :j]
    return float((overlap**2).sum() / min(i, j))


def projected_energy(m: torch.Tensor, basis: torch.Tensor) -> float:
    m = m.detach().double()
    total = (m**2).sum()
    return float(((basis.T @ m) ** 2).sum() / total) if total > 0 else 0.0
