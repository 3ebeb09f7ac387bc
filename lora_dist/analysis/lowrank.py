"""Low-rank linear algebra for Section 7, in float64, never forming a d x d matrix.

Notation follows the LoRA paper: a linear map W (out x in), an update ΔW = s·B·A with
B (out x r) and A (r x in). A thin SVD is ΔW = U·diag(σ)·Vh with U (out x r) and Vh (r x in):
the columns of U are directions in the output space, the rows of Vh directions in the input
space. The paper's "U^T W V^T" is Uᵀ·W·Vhᵀ in this notation: W seen through r output and r
input directions, an r x r matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class ThinSVD:
    """M ≈ u·diag(s)·vh with orthonormal columns of u (m x k) and rows of vh (k x n)."""

    u: Tensor
    s: Tensor
    vh: Tensor

    def top(self, k: int) -> ThinSVD:
        """The leading k singular triplets."""
        return ThinSVD(self.u[:, :k], self.s[:k], self.vh[:k])


def lowrank_svd(b: Tensor, a: Tensor, scale: float) -> ThinSVD:
    """SVD of ΔW = scale·B·A from QR factorisations of B and Aᵀ and the SVD of an r x r core.

    B = Qb·Rb and Aᵀ = Qa·Ra give ΔW = Qb·(scale·Rb·Raᵀ)·Qaᵀ; the core's SVD P·Σ·Sᵀ then gives
    U = Qb·P and Vh = Sᵀ·Qaᵀ. Cost O((out + in)·r²); memory O((out + in)·r).
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    p, s, st = torch.linalg.svd(scale * (rb @ ra.T), full_matrices=False)
    return ThinSVD(u=qb @ p, s=s, vh=st @ qa.T)


def energy_fractions(s: Tensor) -> Tensor:
    """Cumulative share of ||ΔW||_F² held by the top 1, 2, ... singular values."""
    sq = s.double() ** 2
    total = sq.sum()
    if total == 0:
        return torch.zeros_like(sq)
    return sq.cumsum(0) / total


def effective_rank(s: Tensor, fraction: float) -> int:
    """The smallest k whose top-k singular values hold `fraction` of Σσ² (0 when ΔW = 0)."""
    cum = energy_fractions(s)
    if len(cum) == 0 or cum[-1] == 0:
        return 0
    # A relative slack keeps an exact-fraction boundary from flipping on the last bit.
    return int((cum < fraction * (1 - 1e-12)).sum().item()) + 1


def right_singular_basis(m: Tensor) -> Tensor:
    """The right-singular unitary matrix of m (r x k) as k x min(r, k) columns, σ descending.

    For the paper's A (r x in) these are directions in the input space R^in; column i spans
    the i-th right-singular direction, so the first i columns are the paper's U_A^i.
    """
    _, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return vh.T


def similarity_from_bases(u1: Tensor, u2: Tensor) -> Tensor:
    """φ[i-1, j-1] = ||u1[:, :i]ᵀ·u2[:, :j]||_F² / min(i, j) for orthonormal columns u1, u2."""
    overlap = (u1.T @ u2) ** 2
    cum = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def subspace_similarity(a1: Tensor, a2: Tensor) -> Tensor:
    """The paper's normalised subspace similarity φ(A1, A2, i, j) for every i, j (Section 7.2).

    φ(A1, A2, i, j) = ||U1_iᵀ·U2_j||_F² / min(i, j), where U1_i (in x i) holds the top-i
    right-singular vectors of A1 (r1 x in) as columns, i.e. an orthonormal basis of the i
    input-space directions A1 reads most strongly, and U2_j likewise for A2. It is 1 when one
    subspace contains the other and 0 when they are orthogonal. Returns an r1 x r2 matrix
    whose [i-1, j-1] entry is φ(i, j).
    """
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"A matrices read different input sizes: {a1.shape[1]} and {a2.shape[1]}")
    return similarity_from_bases(right_singular_basis(a1), right_singular_basis(a2))


def expected_random_similarity(i: int, j: int, dim: int) -> float:
    """E[φ(i, j)] for independent uniformly random i- and j-dimensional subspaces of R^dim.

    With U_i uniform, E[U_i·U_iᵀ] = (i/dim)·I (it is rotation-invariant with trace i), so
    E||U_iᵀ·U_j||_F² = tr(U_jᵀ·(i/dim)·I·U_j) = i·j/dim, and dividing by min(i, j) gives
    max(i, j)/dim.
    """
    return max(i, j) / dim


def random_orthonormal(n: int, k: int, generator: torch.Generator) -> Tensor:
    """n x k orthonormal columns spanning a uniformly random k-dimensional subspace of R^n.

    The column space of a Gaussian matrix is rotation-invariant, hence uniform; QR keeps it.
    """
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return q


def projected_norm(matmul: Callable[[Tensor], Tensor], u: Tensor, vh: Tensor) -> float:
    """||Uᵀ·W·Vhᵀ||_F, with W known only through matmul(X) = W·X."""
    return float(torch.linalg.matrix_norm(u.T @ matmul(vh.T)))


@dataclass(frozen=True)
class TopSubspace:
    """W's top-k singular directions found by subspace iteration, and how the iteration went."""

    svd: ThinSVD
    iterations: int
    converged: bool


def top_singular_subspace(
    matmul: Callable[[Tensor], Tensor],
    rmatmul: Callable[[Tensor], Tensor],
    shape: tuple[int, int],
    k: int,
    generator: torch.Generator,
    tol: float = 1e-10,
    max_iters: int = 200,
) -> TopSubspace:
    """Top-k singular triplets of W (m x n), known only through W·X and Wᵀ·Y.

    Block subspace iteration with oversampling p = min(max(2k, k + 10), m, n) and a
    Rayleigh-Ritz step each round: Y = W·Q, Qy = orth(Y), Zᵀ = Qyᵀ·W = P·Σ·Sᵀ, and the next
    Q = S. It stops when Σ_{i<=k} σ_i² changes by at most `tol` relative, or after
    `max_iters` rounds. Each round reads W twice and holds O((m + n)·p) floats besides it.
    The error falls like (σ_{p+1}/σ_k)^(2·rounds); with p = min(m, n) one round is exact.
    """
    m, n = shape
    k = min(k, m, n)
    p = min(max(2 * k, k + 10), m, n)
    q = random_orthonormal(n, p, generator)
    previous = None
    iterations, converged = 0, False
    while iterations < max_iters:
        iterations += 1
        qy, _ = torch.linalg.qr(matmul(q))
        zt = rmatmul(qy).T  # p x n, = Qyᵀ·W
        pm, s, sh = torch.linalg.svd(zt, full_matrices=False)
        q = sh.T
        energy = float((s[:k] ** 2).sum())
        # With p = min(m, n), Q or Qy spans its whole space, so Zᵀ has exactly W's singular values.
        exact = p == min(m, n)
        if exact or (previous is not None and abs(energy - previous) <= tol * energy):
            converged = True
            break
        previous = energy
    return TopSubspace(ThinSVD(qy @ pm[:, :k], s[:k], sh[:k]), iterations, converged)
