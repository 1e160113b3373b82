"""entropy-profiler 0.2.1's `entropy_profiler.estimators`: its matrix-based Rényi MI.

0.2.1's estimator, kept as it was: float32, entropies in bits (log2), eigenvalues floored
at 1e-9 without renormalising, the kernel width the median of all pairwise distances
(zeros included; 1 if that median is 0). entropy_fast.estimators.MatrixRenyiMI is the
native one (float64, nats, median of the distinct distances).

One difference: 0.2.1's default device is "cuda"; where CUDA is missing it fails, so here
the default falls back to the CPU (what the estimator computes is the same).
"""

from __future__ import annotations

import numpy as np
import torch


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


class MatrixRenyiMI:
    """Matrix-based Rényi mutual information between two sets of feature vectors.

    Gaussian Gram matrices with the median-heuristic width, normalised to unit trace;
    S(A) = log2(sum lambda^alpha) / (1 - alpha); I = S(A) + S(B) - S(A o B / tr(A o B)).

    Parameters
    ----------
    alpha : float
        Rényi order, > 1; 1.01 approximates Shannon MI.
    device : str
        Torch device of the computation ("cuda" falls back to "cpu" without CUDA).
    """

    def __init__(self, alpha: float = 1.01, device: str = "cuda") -> None:
        self.alpha = alpha
        self.device = _device(device)

    def gram_matrix(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(N, N) Gaussian Gram matrix of the rows of x (N, d), divided by its trace."""
        norms = (x**2).sum(1).view(-1, 1)
        dist_sq = torch.clamp(norms + norms.view(1, -1) - 2.0 * torch.mm(x, x.t()), min=0.0)
        kernel = torch.exp(-dist_sq / (2 * sigma**2))
        return kernel / torch.trace(kernel)

    def entropy(self, A: torch.Tensor) -> torch.Tensor:
        """Matrix-based Rényi entropy (bits) of a unit-trace Gram matrix; a scalar tensor."""
        eig_vals = torch.clamp(torch.linalg.eigvalsh(A), min=1e-9)
        return (1 / (1 - self.alpha)) * torch.log2((eig_vals**self.alpha).sum())

    def joint_entropy(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Entropy of the Hadamard product A o B renormalised to unit trace."""
        joint = A * B
        return self.entropy(joint / torch.trace(joint))

    def compute_mi(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
        """Mutual information (bits) between x (n, d1) and y (n, d2), rows = samples."""
        if not torch.is_tensor(x):
            x = torch.tensor(x, device=self.device, dtype=torch.float32)
        if not torch.is_tensor(y):
            y = torch.tensor(y, device=self.device, dtype=torch.float32)
        a = self.gram_matrix(x, self._bandwidth_heuristic(x))
        b = self.gram_matrix(y, self._bandwidth_heuristic(y))
        return (self.entropy(a) + self.entropy(b) - self.joint_entropy(a, b)).item()

    def _bandwidth_heuristic(self, x: torch.Tensor) -> torch.Tensor:
        """Median of the pairwise distances of the rows of x (1 when it is 0)."""
        sigma = torch.median(torch.pdist(x))
        return torch.tensor(1.0, device=self.device) if sigma == 0 else sigma
