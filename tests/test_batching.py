"""Length buckets: every sequence once, within the token budget, little padding."""

import numpy as np
import pytest

from entropy_fast.batching import length_buckets


def padding_fraction(lengths, batches) -> float:
    """Padded positions over all positions, each batch padded to its longest member."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / padded


@pytest.mark.parametrize("budget", [2048, 8192, 32768])
def test_every_sequence_once_within_the_budget(budget):
    lengths = np.random.default_rng(0).integers(1, 3000, size=500).tolist()
    batches = length_buckets(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= budget
        assert lengths[batch[0]] == longest  # the longest first: it fails early if too big


def test_batches_run_longest_first():
    lengths = [5, 50, 7, 300, 40, 41]
    firsts = [lengths[b[0]] for b in length_buckets(lengths, 100)]
    assert firsts == sorted(firsts, reverse=True)
    assert length_buckets(lengths, 100)[0] == [3]  # longer than the budget: alone


def test_padding_stays_small_on_a_corpus_like_length_mix():
    """Prompt lengths of a real corpus are roughly log-normal; the design allows < ~10%."""
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(5.0, 0.9, size=5000), 4, 4096).astype(int).tolist()
    for budget in (8192, 32768):
        assert padding_fraction(lengths, length_buckets(lengths, budget)) < 0.10


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="batch_tokens must be >= 1"):
        length_buckets([3, 4], 0)
