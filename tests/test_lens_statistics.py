"""Top-k tokens and KL to the final layer, on both lens backends, against float64.

The reference is the obvious computation: float64 logits of the whole vocabulary, a
materialized softmax, torch.sort for the top-k (stable: ties rank the lower token id
first) and the KL sum. Tolerances (issue 23): ids equal except at ties within 1e-6,
probabilities within 1e-5, KL within 1e-4 nats.
"""

import pytest
import torch
from torch import nn

from entropy_fast.lens import Lens
from tests.lens_cases import BACKENDS, CASES, DEVICE, make_case, on_device
from tests.reference import float64_rows, fp32_tol, head_logits_float64
from tests.test_lens import ids, run_with_taps  # noqa: F401 (ids: a fixture)
from tests.tiny_models import N_LAYERS

K = 7


def top_k_reference(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probs) of the k most probable tokens of float64 logits, lower id first at ties."""
    probs = torch.softmax(z, dim=1)
    order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :k]
    return order, probs.gather(1, order)


def kl_reference(z: torch.Tensor, groups: int) -> torch.Tensor:
    """KL(p_final || p_row) of every row; rows are `groups` layer groups, the final last."""
    logp = torch.log_softmax(z, dim=1).view(groups, -1, z.shape[1])
    final = logp[-1]
    return (final.exp() * (final - logp)).sum(dim=2).reshape(-1)


def check_top(stats, z: torch.Tensor, k: int, tie: float = 1e-6) -> None:
    """Ids equal but at ties; probabilities within 1e-5, or what fp32 rounding of the
    logits allows on the hazard rows (|z| ~ 1e3: p moves by ~|dz| p)."""
    want, probs = top_k_reference(z, k)
    got = stats.top_tokens.to(z.device)
    assert got.shape == want.shape and got.dtype == torch.int64
    differ = got != want
    # where ids differ, the two tokens' logits must tie (within `tie` of each other)
    gap = (z.gather(1, got.clamp(0, z.shape[1] - 1)) - z.gather(1, want)).abs()
    assert (gap[differ] <= tie).all(), f"{int(differ.sum())} top-k ids differ beyond ties"
    tol = max(1e-5, 2 * fp32_tol(z.abs().max().item()))
    assert (stats.top_probs.double().to(z.device) - probs).abs().max() <= tol


def grouped_rows(name: str, groups: int, n_tokens: int):
    """`groups` layer groups of the same tokens: a case's rows at different seeds, the
    last group's rows the final layer."""
    lens, first, _ = make_case(name, n_rows=n_tokens, seed=0)
    rows = [first] + [make_case(name, n_rows=n_tokens, seed=s)[1] for s in range(1, groups)]
    return lens, torch.cat(rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_top_tokens_of_each_case(name, backend):
    lens, hidden, _ = make_case(name)
    z = head_logits_float64(lens, float64_rows(lens, hidden))
    stats = lens.statistics(hidden, (1.0, 2.0), backend=backend, top_k=K, with_top_token=True)
    check_top(stats, z, K)
    assert (stats.top_token == stats.top_tokens[:, 0]).all()
    # the extra statistic leaves the others as they were (up to fp32 rounding of the logits)
    plain = lens.statistics(hidden, (1.0, 2.0), backend=backend, with_top_token=True)
    torch.testing.assert_close(stats.entropy, plain.entropy, rtol=0,
                               atol=fp32_tol(z.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_kl_to_final_of_each_case(name, backend):
    groups = 3
    lens, hidden = grouped_rows(name, groups, CASES[name][-1] // 2)
    z = head_logits_float64(lens, float64_rows(lens, hidden))
    stats = lens.statistics(hidden, (1.0, 2.0), backend=backend, top_k=K, kl_groups=groups)
    check_top(stats, z, K)
    kl = stats.kl_to_final.double().to(z.device)
    # 1e-4 nats plus what fp32 rounding of the logits allows: a logit error e of the final
    # row moves KL by up to ~2 e |log p_L - log p| (hundreds of nats on the hazard rows)
    want = kl_reference(z, groups)
    off = (lens.logits(hidden).double() - z).abs().amax(dim=1).view(groups, -1)
    allowed = 1e-4 + 2 * (off + off[-1]).reshape(-1) * (1 + want)
    assert ((kl - want).abs() <= allowed).all()
    n = len(hidden) // groups
    assert (stats.kl_to_final[-n:] == 0).all(), "the final layer's own KL is not exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_rank_the_lower_token_id_first(backend):
    """Exact ties (integer weights and rows: every logit exact in fp32) across and within
    vocabulary chunks and more tied tokens than k: the lowest ids win, in id order."""
    vocab, d = 300, 8
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randint(-3, 4, (vocab, d), generator=gen).float())
        head.weight[[5, 127, 128, 129, 250, 251, 299]] = torch.full((d,), 4.0)
    lens = Lens(head.to(DEVICE))
    lens.row_block, lens.vocab_chunk = 4, 128
    hidden = torch.randint(0, 3, (10, d), generator=gen).float()
    hidden[:5] = 1.0  # the tied rows hold the maximum: 32 > any other row's logit
    stats = lens.statistics(hidden.to(DEVICE), backend=backend, top_k=5, normed=True)
    assert stats.top_tokens[:5].tolist() == [[5, 127, 128, 129, 250]] * 5
    z = head_logits_float64(lens, hidden.double().to(DEVICE))
    check_top(stats, z, 5, tie=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_state_of_each_architecture(arch_model, ids, backend):  # noqa: F811
    """Every hidden state of a tiny model as layer groups, the last state the final one."""
    kind, model = arch_model[0], on_device(arch_model[1])
    lens = Lens.from_model(model)
    _, tapped = run_with_taps(model, ids)
    hidden = torch.cat([tapped[i] for i in range(N_LAYERS + 1)])
    z = head_logits_float64(lens, float64_rows(lens, hidden))
    check_top(lens.statistics(hidden, backend=backend, top_k=10), z, 10)
    stats = lens.statistics(hidden, backend=backend, kl_groups=N_LAYERS + 1)
    kl = stats.kl_to_final.double().to(z.device)
    assert (kl - kl_reference(z, N_LAYERS + 1)).abs().max() <= 1e-4, kind
    assert kl.max() > 1e-2, f"{kind}: every layer's distribution equals the last one's"


def test_bad_top_k_and_groups():
    lens, hidden, _ = make_case("layernorm")
    with pytest.raises(ValueError, match="top_k"):
        lens.statistics(hidden, top_k=33)
    with pytest.raises(ValueError, match="kl_groups"):
        lens.statistics(hidden, kl_groups=3)  # 70 rows: not 3 groups of the same tokens
