"""Entropy math: probability-space functions and the streamed online statistics."""

import math

import pytest
import torch

from entropy_fast.entropy import OnlineEntropy, renyi_entropy, shannon_entropy, validate_alphas
from tests.reference import entropy_from_logits

ALPHAS = (0.0, 0.5, 0.999, 1.0, 1.001, 2.0, 5.0, math.inf)
VOCAB = 1013


def streamed(logits: torch.Tensor, alphas=ALPHAS, chunk: int = 97, **kwargs):
    online = OnlineEntropy(alphas, **kwargs)
    for block in logits.float().split(chunk, dim=1):
        online.update(block)
    return online.finalize()


def hazard_logits() -> dict[str, torch.Tensor]:
    """One documented case per numerical hazard (STYLE.md item 15)."""
    g = torch.Generator().manual_seed(0)
    randn = torch.randn(6, VOCAB, generator=g, dtype=torch.float64)
    one_hot = torch.zeros(3, VOCAB, dtype=torch.float64)
    one_hot[:, 17] = 40.0  # late layers: entropy ~ 1e-14, must not go negative or NaN
    return {
        "uniform": torch.zeros(3, VOCAB, dtype=torch.float64),  # early layers: H = log V
        "near_uniform": randn * 1e-3,
        "typical": randn * 3,
        "peaked": randn * 30,
        "nearly_one_hot": one_hot,
        "huge_logits": randn * 3 + 1e4,  # shifts must cancel exactly
        "max_in_last_chunk": torch.cat([randn[:, :-1] * 2, randn[:, -1:] * 2 + 25], dim=1),
    }


@pytest.mark.parametrize("case", list(hazard_logits()))
def test_streamed_entropy_matches_float64_reference(case):
    logits = hazard_logits()[case]
    got = streamed(logits).entropy.double()
    # Compare after float32 rounding of the inputs: the reference sees the same logits.
    expected = entropy_from_logits(logits.float().double() - 0, ALPHAS)
    assert torch.isfinite(got).all()
    assert (got >= -1e-6).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * max(1.0, math.log(VOCAB)))


def test_alpha_near_one_is_as_accurate_as_shannon():
    logits = hazard_logits()["typical"]
    got = streamed(logits, alphas=(1 - 1e-6, 1.0, 1 + 1e-6)).entropy.double()
    expected = entropy_from_logits(logits.float().double(), (1.0,))[:, 0]
    for column in range(3):
        torch.testing.assert_close(got[:, column], expected, rtol=0, atol=1e-5)


def test_chunking_does_not_change_the_result():
    logits = hazard_logits()["typical"]
    whole = streamed(logits, chunk=VOCAB).entropy
    for chunk in (1, 64, 500):
        torch.testing.assert_close(streamed(logits, chunk=chunk).entropy, whole, rtol=0,
                                   atol=1e-5)


def test_token_statistics():
    logits = hazard_logits()["typical"].float()
    targets = torch.tensor([5, 900, 17, 0, VOCAB - 1, 333])
    estimate = logits.gather(1, targets[:, None])[:, 0]
    stats = streamed(logits, alphas=(1.0,), targets=targets, target_logit_estimate=estimate,
                     track_argmax=True)
    p = torch.softmax(logits.double(), dim=1)
    assert torch.equal(stats.top_token, logits.argmax(dim=1))
    torch.testing.assert_close(stats.target_surprisal.double(),
                               -torch.log(p.gather(1, targets[:, None])[:, 0]), rtol=0, atol=1e-5)
    ranks = (logits > logits.gather(1, targets[:, None])).sum(dim=1)
    assert torch.equal(stats.target_rank, ranks)


def test_probability_space_functions():
    p = torch.softmax(torch.randn(4, 50, dtype=torch.float64) * 2, dim=-1)
    expected = entropy_from_logits(torch.log(p), ALPHAS)
    assert torch.allclose(shannon_entropy(p), expected[:, 3])
    for k, a in enumerate(ALPHAS):
        assert torch.allclose(renyi_entropy(p, a), expected[:, k], atol=1e-8), a
    zero = torch.tensor([0.5, 0.5, 0.0])
    assert shannon_entropy(zero).item() == pytest.approx(math.log(2))
    assert renyi_entropy(zero, 0.0).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("bad", [-0.5, float("nan"), "x", (), (1.0, 1.0)])
def test_invalid_alpha_is_rejected_with_a_clear_message(bad):
    with pytest.raises(ValueError, match="alpha"):
        validate_alphas(bad)


def test_validate_alphas_accepts_orders():
    assert validate_alphas(2) == (2.0,)
    assert validate_alphas([0, 1, math.inf]) == (0.0, 1.0, math.inf)


def test_compiled_statistics_equal_eager(monkeypatch):
    """Large CPU chunks go through torch.compile; it must give the eager numbers."""
    from entropy_fast import entropy

    monkeypatch.setattr(entropy, "_COMPILE_MIN_ELEMENTS", 0)
    logits = torch.cat([hazard_logits()[case] for case in ("typical", "peaked", "huge_logits")])
    tilted = (0.0, 0.5, 0.999, 1.001, 2.0)
    eager = entropy._eager_chunk_moments(logits.float(), tilted)
    compiled = entropy.chunk_moments(logits.float(), tilted)
    assert entropy._compiled_chunk_moments not in (None, False)
    for a, b in zip((*eager[:3], *eager[3]), (*compiled[:3], *compiled[3]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
