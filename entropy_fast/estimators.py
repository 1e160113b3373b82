"""Dependence between two representations of the same tokens, from their Gram matrices.

Owns `MatrixRenyiMI` (matrix-based Rényi entropy and mutual information, Sanchez Giraldo,
Rao & Principe 2015) and `linear_cka` (linear centered kernel alignment, Kornblith et al.
2019); `analysis.LayerAnalyzer.layer_mi` uses both. Inputs are (n_samples x n_features)
tensors whose rows are the same samples (tokens); all arithmetic is float64.
"""

from __future__ import annotations

import math

import torch


def _as_pair(x: torch.Tensor, y: torch.Tensor, device: torch.device | str | None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x and y must be (n_samples x n_features), got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}: the rows must "
                         "be the same samples (tokens)")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples, got {x.shape[0]}")
    device = device if device is not None else x.device
    return x.to(device, torch.float64), y.to(device, torch.float64)


def linear_cka(x: torch.Tensor, y: torch.Tensor, device: torch.device | str | None = None,
               ) -> float:
    """Linear CKA between x (n x d1) and y (n x d2), in [0, 1].

    With column-centred X, Y: CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), which equals
    HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear Gram matrices K = X X^T,
    L = Y Y^T. Computed in feature space or in sample space, whichever is smaller.
    Invariant to orthogonal transforms and isotropic scaling of either side. NaN when a
    side has no variance (every row equal), where CKA is undefined.
    """
    x, y = _as_pair(x, y, device)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if n * n <= d1 * d2:
        k, m = x @ x.T, y @ y.T
        cross, norm_x, norm_y = (k * m).sum(), torch.linalg.norm(k), torch.linalg.norm(m)
    else:
        cross = torch.linalg.norm(y.T @ x) ** 2
        norm_x, norm_y = torch.linalg.norm(x.T @ x), torch.linalg.norm(y.T @ y)
    denominator = float(norm_x * norm_y)
    return float(cross) / denominator if denominator > 0 else math.nan


class MatrixRenyiMI:
    """Matrix-based Rényi alpha-entropy and mutual information, in nats.

    For samples x_1..x_n (rows of x): Gaussian Gram matrix K_ij = exp(-||x_i - x_j||^2 /
    (2 sigma^2)), normalised A = K / n (trace 1, since K_ii = 1). With eigenvalues
    lambda_i of A:

        S_alpha(A) = 1 / (1 - alpha) * ln( sum_i lambda_i^alpha ),  S_1(A) = -sum lambda ln lambda
        S_alpha(A, B) = S_alpha( A o B / tr(A o B) )            (o = Hadamard product)
        I_alpha(x; y) = S_alpha(A) + S_alpha(B) - S_alpha(A, B).

    S lies in [0, ln n]; I >= 0 up to rounding. sigma=None takes, for each representation,
    the median distance between distinct rows (median heuristic, scale free).

    Args:
        alpha: Rényi order > 0 (1 = von Neumann/Shannon limit). 1.01 is the usual choice.
        device: where to build Gram matrices and eigendecompose (None = the input's).
        sigma: fixed kernel width for every representation, or None.
    """

    def __init__(self, alpha: float = 1.01, device: torch.device | str | None = None,
                 sigma: float | None = None) -> None:
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite order > 0, got {alpha}")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"sigma must be > 0 or None (median heuristic), got {sigma}")
        self.alpha = float(alpha)
        self.device = device
        self.sigma = sigma

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """(n x n) float64 trace-1 Gaussian Gram matrix A of the rows of x (n x d)."""
        x = torch.as_tensor(x).to(self.device if self.device is not None else "cpu",
                                  torch.float64)
        sq = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        sigma = self.sigma
        if sigma is None:
            distinct = sq[sq > 0]
            sigma = float(distinct.sqrt().median()) if distinct.numel() else 1.0
        return torch.exp(-sq / (2.0 * sigma * sigma)) / x.shape[0]

    def entropy(self, a: torch.Tensor) -> float:
        """S_alpha(A) in nats of a trace-1 positive semi-definite (n x n) matrix."""
        eig = torch.linalg.eigvalsh(a)
        # Eigenvalues below the decomposition's own rounding (n eps max) are zeros that came
        # out as +-1e-17: for alpha < 1, sum lambda^alpha would amplify them into the result.
        noise = eig.shape[0] * torch.finfo(eig.dtype).eps * eig.abs().max()
        eig = torch.where(eig > noise, eig, 0.0)
        eig = eig / eig.sum()
        if self.alpha == 1.0:
            return float(-torch.special.xlogy(eig, eig).sum())
        return float(torch.log((eig ** self.alpha).sum()) / (1.0 - self.alpha))

    def joint_entropy(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """S_alpha(A o B / tr(A o B)) in nats."""
        ab = a * b
        return self.entropy(ab / torch.trace(ab))

    def mutual_information(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """I_alpha(x; y) in nats between x (n x d1) and y (n x d2), rows = the same samples."""
        x, y = _as_pair(x, y, self.device)
        a, b = self.gram(x), self.gram(y)
        return self.entropy(a) + self.entropy(b) - self.joint_entropy(a, b)
