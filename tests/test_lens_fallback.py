"""backend="auto"'s first-batch check of the fused kernel, and its fallback to torch.

No GPU run precedes a user's first one, so "auto" checks the kernel once per lens against
the torch backend (entropy_fast/lens.py, `Lens._checked_kernel_statistics`). On CPU "auto"
never picks the kernel: `_kernel_by_default` is patched here so that it does, and the
kernel is the real one under the Triton interpreter (tests/conftest.py) or a stand-in that
raises (a compile error) or returns wrong numbers. Small vocabularies, few rows: the
interpreter's cost grows with both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from entropy_fast import lens as lens_module
from entropy_fast.entropy import LensStatistics
from entropy_fast.lens import Lens
from tests.tiny_models import HIDDEN, VOCAB, tiny_model

ALPHAS = (0.5, 1.0, 2.0, math.inf)
FIELDS = ("entropy", "top_token", "target_surprisal", "target_rank")


class Counted:
    """A stand-in for a lens method that counts its calls."""

    def __init__(self, function: Callable) -> None:
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture(autouse=True)
def kernel_by_default(monkeypatch):
    """backend="auto" picks the kernel, as on CUDA."""
    monkeypatch.setattr(lens_module, "_kernel_by_default", lambda device: True)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def batches(dtype: torch.dtype = torch.float32, n_rows=(12, 5, 9)):
    """A few (hidden, targets) batches of pre-norm rows for the tiny models."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, HIDDEN, generator=gen).mul(3.0).to(dtype),
             torch.randint(0, VOCAB, (n,), generator=gen)) for n in n_rows]


def run(lens: Lens, data, backend: str = "auto") -> list[LensStatistics]:
    return [lens.statistics(hidden, ALPHAS, backend=backend, targets=targets,
                            with_top_token=True) for hidden, targets in data]


def assert_same(got: list[LensStatistics], expected: list[LensStatistics]) -> None:
    for a, b in zip(got, expected, strict=True):
        for field in FIELDS:
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "entropy_fast" and r.levelno == logging.WARNING]


def torch_kernel(lens: Lens, perturb: Callable[[LensStatistics], None]) -> Callable:
    """A stand-in kernel: the torch backend's statistics, then `perturb`ed in place."""
    def kernel(hidden, alphas, *, normed=False, targets=None, with_top_token=False, top_k=0,
               kl_groups=0):
        stats = Lens._statistics_torch(lens, hidden, alphas, normed, targets, with_top_token,
                                       top_k, kl_groups)
        perturb(stats)
        return stats
    return kernel


def compile_error(*args, **kwargs):
    raise RuntimeError("at 12:4:\n    acc = tl.dot(a, b)\n    ^\nPTXAS error: Internal Triton "
                       "PTX codegen error")


def test_a_kernel_that_raises_falls_back_once(llama, caplog):
    lens = Lens.from_model(llama)
    data = batches()
    lens.kernel_statistics = kernel = Counted(compile_error)
    assert_same(run(lens, data), run(lens, data, backend="torch"))
    assert kernel.calls == 1  # the first batch only: no check, no kernel afterwards
    [message] = warnings(caplog)
    assert "\n" not in message
    assert "RuntimeError: at 12:4: ... PTXAS error: Internal Triton PTX codegen" in message
    assert "using the torch backend instead (slower, same results)" in message
    assert "torch.cuda.get_device_name()" in message and "triton.__version__" in message


def shift(field: str, amount: float, column: int | None = None) -> Callable:
    def perturb(stats: LensStatistics) -> None:
        value = getattr(stats, field)
        target = value if column is None else value[:, column]
        target += amount
    return perturb


def nan_at(row: int, column: int) -> Callable:
    def perturb(stats: LensStatistics) -> None:
        stats.entropy[row, column] = math.nan
    return perturb


def next_token(stats: LensStatistics) -> None:
    stats.top_token[3] = (stats.top_token[3] + 1) % VOCAB


@pytest.mark.parametrize("perturb, reason", [
    (shift("entropy", 0.5), "entropy (alpha=0.5) at row "),
    (nan_at(5, 2), "entropy (alpha=2) at row 5: kernel nan"),
    (shift("entropy", 0.05, column=3), "entropy (alpha=inf)"),
    (shift("target_surprisal", -0.5), "target surprisal"),
    (next_token, "top token at row 3"),
    (shift("target_rank", 5), "target rank at row "),
], ids=["entropy+0.5", "nan", "inf-order+0.05", "surprisal-0.5", "top-token", "rank+5"])
def test_a_kernel_with_wrong_numbers_falls_back_once(llama, caplog, perturb, reason):
    lens = Lens.from_model(llama)
    data = batches()
    lens.kernel_statistics = kernel = Counted(torch_kernel(lens, perturb))
    assert_same(run(lens, data), run(lens, data, backend="torch"))
    assert kernel.calls == 1
    [message] = warnings(caplog)
    assert message.startswith("LlamaForCausalLM: the fused Triton lens kernel failed its "
                              f"first-batch check ({reason}")
    assert "torch backend instead" in message


@pytest.mark.parametrize("kind, dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                         ("gemma2", torch.float32), ("opt", torch.float32)],
                         ids=["llama-fp32", "llama-bf16", "gemma2-fp32", "opt-fp32"])
def test_the_real_kernel_passes_and_is_kept(kind, dtype, caplog):
    """Under the interpreter: fused RMSNorm (fp32, bf16), soft-cap, OPT's projection in
    torch; later batches straight to the kernel, one with already normed rows."""
    lens = Lens.from_model(tiny_model(kind, dtype=dtype))
    data = batches(dtype)
    data[-1] = (lens.normalize(data[-1][0]), data[-1][1])
    lens.kernel_statistics = kernel = Counted(lens.kernel_statistics)
    lens._statistics_torch = reference = Counted(lens._statistics_torch)
    got = [lens.statistics(h, ALPHAS, targets=t, with_top_token=True, normed=i == 2)
           for i, (h, t) in enumerate(data)]
    assert warnings(caplog) == [] and lens._kernel_passed is True
    assert kernel.calls == 3 and reference.calls == 1  # the check's sample, once
    expected = [lens.kernel_statistics(h, ALPHAS, targets=t, with_top_token=True,
                                       normed=i == 2) for i, (h, t) in enumerate(data)]
    assert_same(got, expected)


def tied_lens() -> tuple[Lens, torch.Tensor, torch.Tensor]:
    """A head whose tokens 5 and 7 are the same vector; rows along it: an exact tie at the
    top, and the target (5) ranked 0 by torch (7 is equal, not larger)."""
    head = nn.Linear(16, 40, bias=False)
    with torch.no_grad():
        head.weight.normal_(generator=torch.Generator().manual_seed(0))
        head.weight[7] = head.weight[5]
    hidden = head.weight[5].detach().repeat(6, 1) * torch.linspace(1.0, 3.0, 6)[:, None]
    return Lens(head), hidden, torch.full((6,), 5)


@pytest.mark.parametrize("perturb, passes", [
    (lambda s: s.top_token.fill_(7), True),  # the other half of an exact tie
    (shift("target_rank", 1), True),  # one token ties with the target
    (shift("target_rank", 2), False),  # only one does
    (shift("entropy", 1e-4), True),  # well within tolerance
], ids=["top-tie", "rank-within-ties", "rank-beyond-ties", "entropy+1e-4"])
def test_near_ties_and_rounding_are_not_disagreements(perturb, passes, caplog):
    lens, hidden, targets = tied_lens()
    truth = lens.statistics(hidden, ALPHAS, backend="torch", targets=targets,
                            with_top_token=True)
    assert (truth.top_token == 5).all() and (truth.target_rank == 0).all()
    lens.kernel_statistics = torch_kernel(lens, perturb)
    lens.statistics(hidden, ALPHAS, targets=targets, with_top_token=True)
    assert lens._kernel_passed is passes
    assert len(warnings(caplog)) == (0 if passes else 1)


def test_explicit_triton_is_never_checked(llama, caplog):
    """A user or benchmark who asks for the kernel gets it, errors and numbers included."""
    lens = Lens.from_model(llama)
    (hidden, targets), *_ = batches()
    lens.kernel_statistics = compile_error
    with pytest.raises(RuntimeError, match="PTXAS"):
        lens.statistics(hidden, ALPHAS, backend="triton", targets=targets)
    lens.kernel_statistics = torch_kernel(lens, shift("entropy", 0.5))
    wrong = lens.statistics(hidden, ALPHAS, backend="triton")
    right = lens.statistics(hidden, ALPHAS, backend="torch")
    assert torch.allclose(wrong.entropy, right.entropy + 0.5)
    assert warnings(caplog) == [] and lens._kernel_passed is None


def test_the_check_waits_for_rows_and_out_of_memory_is_raised(llama, caplog):
    lens = Lens.from_model(llama)
    (hidden, targets), *_ = batches()
    lens.kernel_statistics = kernel = Counted(compile_error)
    empty = lens.statistics(hidden[:0], ALPHAS, targets=targets[:0], with_top_token=True)
    assert empty.entropy.shape == (0, len(ALPHAS)) and kernel.calls == 0
    assert lens._kernel_passed is None

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    lens.kernel_statistics = out_of_memory  # the batch's fault, not the kernel's
    with pytest.raises(torch.cuda.OutOfMemoryError):
        lens.statistics(hidden, ALPHAS)
    assert lens._kernel_passed is None and warnings(caplog) == []


@pytest.mark.parametrize("perturb, reason", [
    (shift("kl_to_final", 0.05), "KL to the final layer at row "),
    (shift("top_probs", 0.05, column=2), "probability of top token 2 at row "),
], ids=["kl+0.05", "top-prob+0.05"])
def test_wrong_kl_or_top_k_falls_back_once(llama, caplog, perturb, reason):
    """The extra statistics are checked too (batches of 3 layer groups of the same tokens)."""
    lens = Lens.from_model(llama)
    data = batches(n_rows=(12, 9))
    lens.kernel_statistics = kernel = Counted(torch_kernel(lens, perturb))
    got = [lens.statistics(hidden, ALPHAS, top_k=4, kl_groups=3) for hidden, _ in data]
    want = [lens.statistics(hidden, ALPHAS, top_k=4, kl_groups=3, backend="torch")
            for hidden, _ in data]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.kl_to_final, b.kl_to_final) and torch.equal(a.top_probs,
                                                                         b.top_probs)
    assert kernel.calls == 1
    [message] = warnings(caplog)
    assert f"first-batch check ({reason}" in message
