"""Linear CKA against a textbook float64 HSIC, and matrix-based Rényi entropy / MI against
closed forms and an independent numpy eigen-decomposition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entropy_fast.estimators import MatrixRenyiMI, linear_cka


def textbook_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T, HSIC = tr(K H L H) / (n-1)^2."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, m = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, m) / math.sqrt(hsic(k, k) * hsic(m, m)))


@pytest.mark.parametrize(("n", "d1", "d2"), [(50, 8, 5), (12, 40, 30), (30, 1, 7)])
def test_linear_cka_equals_textbook(n, d1, d2):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d1))
    y = x[:, :1] @ rng.normal(size=(1, d2)) + rng.normal(size=(n, d2))
    got = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    expected = textbook_cka(x.astype(np.float32).astype(np.float64),
                            y.astype(np.float32).astype(np.float64))
    assert got == pytest.approx(expected, rel=1e-10)


def test_linear_cka_invariances():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(40, 6)))
    y = torch.tensor(rng.normal(size=(40, 9)))
    q, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(6, 6))))
    assert linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    assert 0.0 <= linear_cka(x, y) <= 1.0
    assert math.isnan(linear_cka(torch.ones(5, 3), x[:5]))


def numpy_renyi(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    """Independent implementation: explicit kernels, numpy eigvalsh."""
    def gram(z):
        d = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
        sigma = np.median(d[d > 0])
        return np.exp(-d ** 2 / (2 * sigma ** 2)) / len(z)

    def entropy(a):
        lam = np.clip(np.linalg.eigvalsh(a), 0, None)
        lam = lam / lam.sum()
        return float(np.log(np.sum(lam ** alpha)) / (1 - alpha))

    a, b = gram(x), gram(y)
    ab = a * b
    return entropy(a) + entropy(b) - entropy(ab / np.trace(ab))


@pytest.mark.parametrize("alpha", [0.5, 1.01, 2.0])
def test_renyi_mi_equals_numpy_reference(alpha):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    y = np.tanh(x @ rng.normal(size=(4, 3))) + 0.1 * rng.normal(size=(30, 3))
    got = MatrixRenyiMI(alpha).mutual_information(torch.tensor(x), torch.tensor(y))
    assert got == pytest.approx(numpy_renyi(x, y, alpha), rel=1e-9)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.01, 3.0])
def test_renyi_entropy_closed_forms(alpha):
    estimator = MatrixRenyiMI(alpha)
    n = 16
    assert estimator.entropy(torch.eye(n, dtype=torch.float64) / n) == pytest.approx(math.log(n))
    same = estimator.gram(torch.ones(n, 3))
    assert estimator.entropy(same) == pytest.approx(0.0, abs=1e-9)
    far = MatrixRenyiMI(alpha, sigma=1e-3).gram(torch.arange(n, dtype=torch.float64)[:, None])
    assert estimator.entropy(far) == pytest.approx(math.log(n), rel=1e-9)


def test_renyi_mi_orders_dependence():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(60, 5)))
    dependent = torch.tanh(x @ torch.tensor(rng.normal(size=(5, 5))))
    independent = torch.tensor(rng.normal(size=(60, 5)))
    estimator = MatrixRenyiMI()
    mi_dep = estimator.mutual_information(x, dependent)
    mi_ind = estimator.mutual_information(x, independent)
    assert mi_dep > mi_ind >= -1e-9
    assert mi_dep <= math.log(60) + 1e-9


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="alpha must be a finite order > 0"):
        MatrixRenyiMI(alpha=0.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        MatrixRenyiMI(sigma=-1.0)
    with pytest.raises(ValueError, match="x has 4 samples but y has 5"):
        linear_cka(torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="need at least 2 samples"):
        MatrixRenyiMI().mutual_information(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"\(n_samples x n_features\)"):
        linear_cka(torch.zeros(4), torch.zeros(4))
