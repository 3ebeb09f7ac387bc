"""Section 7 math (lora_dist.analysis.lowrank) against dense float64 and known answers."""

from __future__ import annotations

import pytest
import torch

from lora_dist.analysis.lowrank import (
    effective_rank,
    expected_random_similarity,
    lowrank_svd,
    random_orthonormal,
    subspace_similarity,
    top_singular_subspace,
)

TOL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def dense_phi(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) straight from the definition: full SVDs, explicit slices, a double loop."""
    v1 = torch.linalg.svd(a1, full_matrices=True).Vh  # rows: right-singular vectors
    v2 = torch.linalg.svd(a2, full_matrices=True).Vh
    r1, r2 = a1.shape[0], a2.shape[0]
    phi = torch.empty(r1, r2, dtype=torch.float64)
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            phi[i - 1, j - 1] = torch.linalg.matrix_norm(v1[:i] @ v2[:j].T) ** 2 / min(i, j)
    return phi


@pytest.mark.parametrize("out_dim,in_dim,r", [(40, 24, 4), (24, 40, 6), (16, 16, 16)])
def test_lowrank_svd_equals_dense_svd(out_dim: int, in_dim: int, r: int) -> None:
    g = gen(out_dim * in_dim + r)
    b, a, scale = randn(out_dim, r, g=g), randn(r, in_dim, g=g), 0.7
    got = lowrank_svd(b, a, scale)
    delta = scale * b @ a
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    torch.testing.assert_close(got.s, s[:r], atol=TOL, rtol=0)
    # Same subspaces: the projectors agree (vectors themselves are defined up to sign).
    torch.testing.assert_close(got.u @ got.u.T, u[:, :r] @ u[:, :r].T, atol=TOL, rtol=0)
    torch.testing.assert_close(got.vh.T @ got.vh, vh[:r].T @ vh[:r], atol=TOL, rtol=0)
    torch.testing.assert_close(got.u @ torch.diag(got.s) @ got.vh, delta, atol=TOL, rtol=0)


def test_effective_rank_counts_energy() -> None:
    g = gen(0)
    u = random_orthonormal(20, 3, g)
    v = random_orthonormal(12, 3, g)
    b, a = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)), v.T
    s = lowrank_svd(b, a, 1.0).s  # energies 9, 4, 1 of 14: 64%, 93%, 100%
    assert (effective_rank(s, 0.90), effective_rank(s, 0.99)) == (2, 3)
    assert effective_rank(torch.zeros(4, dtype=torch.float64), 0.9) == 0


def test_similarity_equals_definition() -> None:
    g = gen(1)
    a1, a2 = randn(8, 30, g=g), randn(12, 30, g=g)
    torch.testing.assert_close(subspace_similarity(a1, a2), dense_phi(a1, a2), atol=TOL, rtol=0)


def test_identical_subspaces_give_one() -> None:
    a = randn(6, 20, g=gen(2))
    ones = torch.ones(6, 6, dtype=torch.float64)
    torch.testing.assert_close(subspace_similarity(a, a), ones, atol=TOL, rtol=0)
    torch.testing.assert_close(subspace_similarity(a, -3.0 * a), ones, atol=TOL, rtol=0)
    # The same row space with different singular directions: only the full spans agree.
    mixed = randn(6, 6, g=gen(3)) @ a
    phi = subspace_similarity(a, mixed)
    assert phi[-1, -1] == pytest.approx(1.0, abs=TOL)
    assert phi[0, 0] < 0.99


def test_orthogonal_subspaces_give_zero() -> None:
    g = gen(4)
    a1 = torch.zeros(4, 16, dtype=torch.float64)
    a2 = torch.zeros(8, 16, dtype=torch.float64)
    a1[:, :4] = randn(4, 4, g=g)  # reads inputs 0..3 only
    a2[:, 4:12] = randn(8, 8, g=g)  # reads inputs 4..11 only
    torch.testing.assert_close(subspace_similarity(a1, a2), torch.zeros(4, 8, dtype=torch.float64))


def test_random_subspaces_match_their_expectation() -> None:
    """E φ(i, j) = max(i, j)/k for random subspaces of R^k; the mean of 400 draws within 5 SE."""
    dim, r1, r2, trials = 24, 4, 8, 400
    g = gen(5)
    draws = torch.stack(
        [subspace_similarity(randn(r1, dim, g=g), randn(r2, dim, g=g)) for _ in range(trials)]
    )
    mean, se = draws.mean(0), draws.std(0) / trials**0.5
    expected = torch.tensor(
        [
            [expected_random_similarity(i, j, dim) for j in range(1, r2 + 1)]
            for i in range(1, r1 + 1)
        ],
        dtype=torch.float64,
    )
    assert ((mean - expected).abs() < 5 * se).all(), (mean - expected) / se
    # The expectation itself: i = j = 1 is 1/k, and i*j/k before normalising.
    assert expected_random_similarity(1, 1, dim) == 1 / dim
    assert expected_random_similarity(3, 5, dim) * min(3, 5) == 3 * 5 / dim


def test_random_orthonormal_is_orthonormal_and_seeded() -> None:
    q = random_orthonormal(30, 5, gen(6))
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(q, random_orthonormal(30, 5, gen(6)), atol=0, rtol=0)


@pytest.mark.parametrize("m,n,k", [(60, 50, 3), (50, 60, 5), (30, 12, 2), (12, 30, 8)])
def test_top_singular_subspace_equals_dense(m: int, n: int, k: int) -> None:
    w = randn(m, n, g=gen(m + n + k))
    found = top_singular_subspace(lambda x: w @ x, lambda y: w.T @ y, (m, n), k, gen(7))
    assert found.converged
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(found.svd.s, s[:k], atol=TOL, rtol=0)
    projected = torch.linalg.matrix_norm(found.svd.u.T @ w @ found.svd.vh.T)
    assert float(projected) == pytest.approx(float(s[:k].norm()), abs=TOL)
