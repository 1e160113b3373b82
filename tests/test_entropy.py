"""Entropy math: probability-space functions, per-chunk partial sums, their merge and
finalize (shared by both lens backends), and the torch.compile switch of the chunk sums."""

import math
import threading
import warnings

import pytest
import torch

from entropy_fast.entropy import (
    ChunkMoments,
    Partials,
    chunk_partials,
    finalize,
    renyi_entropy,
    shannon_entropy,
    tilted_orders,
    validate_alphas,
)
from tests.reference import assert_close, entropy_from_logits

ALPHAS = (0.0, 0.5, 0.999, 1.0, 1.001, 2.0, 5.0, math.inf)
VOCAB = 1013
EAGER = ChunkMoments(compile=False)


def streamed(logits: torch.Tensor, alphas=ALPHAS, chunk: int = 97, targets=None,
             estimate=None, with_argmax: bool = False):
    """finalize(Partials.cat(one part per chunk)): the torch backend's path, on logits."""
    logits = logits.float()
    parts = [chunk_partials(logits[:, start:start + chunk], tilted_orders(alphas),
                            offset=start, targets=targets, target_estimate=estimate,
                            with_argmax=with_argmax, moments=EAGER)
             for start in range(0, logits.shape[1], chunk)]
    return finalize(Partials.cat(parts), alphas, targets)


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
    got = streamed(logits).entropy
    # The reference sees the same float32-rounded logits.
    expected = entropy_from_logits(logits.float(), ALPHAS)
    assert torch.isfinite(got).all()
    assert (got >= -1e-6).all()
    assert_close(case, got, expected, 2e-5 * math.log(VOCAB))


def test_alpha_near_one_is_as_accurate_as_shannon():
    logits = hazard_logits()["typical"]
    got = streamed(logits, alphas=(1 - 1e-6, 1.0, 1 + 1e-6)).entropy
    expected = entropy_from_logits(logits.float(), (1.0,)).expand(-1, 3)
    assert_close("orders 1 - 1e-6, 1, 1 + 1e-6", got, expected, 1e-5)


def test_chunking_does_not_change_the_result():
    logits = hazard_logits()["typical"]
    whole = streamed(logits, chunk=VOCAB).entropy
    for chunk in (1, 64, 500):
        assert_close(f"chunks of {chunk}", streamed(logits, chunk=chunk).entropy, whole, 1e-5)


def test_token_statistics():
    logits = hazard_logits()["typical"].float()
    targets = torch.tensor([5, 900, 17, 0, VOCAB - 1, 333])
    estimate = logits.gather(1, targets[:, None])[:, 0]
    stats = streamed(logits, alphas=(1.0,), targets=targets, estimate=estimate,
                     with_argmax=True)
    p = torch.softmax(logits.double(), dim=1)
    assert torch.equal(stats.top_token, logits.argmax(dim=1))
    assert_close("surprisal", stats.target_surprisal,
                 -torch.log(p.gather(1, targets[:, None])[:, 0]), 1e-5)
    ranks = (logits > logits.gather(1, targets[:, None])).sum(dim=1)
    assert torch.equal(stats.target_rank, ranks)


def test_merge_takes_the_first_maximal_part_and_rescales_every_sum():
    """Two parts with the same maximum: the argmax comes from the first; the sums of a
    part far below the maximum (exp(shift) = 0) vanish without nan."""
    logits = torch.tensor([[1.0, 3.0, 0.0, 3.0, -200.0, -300.0]])
    parts = Partials.cat([chunk_partials(logits[:, i:i + 2], (0.5, 1.001), offset=i,
                                         with_argmax=True, moments=EAGER)
                          for i in (0, 2, 4)])
    merged = parts.merge()
    assert merged.top.tolist() == [[1]] and merged.m.tolist() == [[3.0]]
    x = logits[0] - 3.0
    assert_close("S", merged.s[0], x.exp().sum()[None], 1e-6)
    assert_close("U", merged.u[0], (x.exp() * x).sum()[None], 1e-6)
    for a, d in zip(merged.orders, merged.d, strict=True):
        assert_close(f"D_{a}", d[0], ((a * x).exp() - x.exp()).sum()[None], 1e-6)


def test_probability_space_functions():
    p = torch.softmax(torch.randn(4, 50, dtype=torch.float64) * 2, dim=-1)
    expected = entropy_from_logits(torch.log(p), ALPHAS)
    assert_close("shannon_entropy", shannon_entropy(p)[:, None], expected[:, 3:4], 1e-8)
    for k, a in enumerate(ALPHAS):
        assert_close(f"renyi_entropy {a}", renyi_entropy(p, a)[:, None],
                     expected[:, k:k + 1], 1e-8)
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
    assert tilted_orders((0.0, 0.5, 1.0, 2.0, math.inf)) == (0.5, 2.0)


def chunk_logits() -> torch.Tensor:
    return torch.cat([hazard_logits()[case] for case in ("typical", "peaked",
                                                         "huge_logits")]).float()


def test_compiled_statistics_equal_eager():
    """Large CPU chunks go through torch.compile; it must give the eager numbers."""
    moments = ChunkMoments(compile=True, min_elements=0)
    logits, orders = chunk_logits(), (0.5, 0.999, 1.001, 2.0)
    assert moments.uses_compiled(logits)
    compiled = moments(logits, orders)
    assert moments.failure is None and moments.compile, moments.failure
    eager = EAGER(logits, orders)
    for name, a, b in zip(("m", "S", "U", *orders), (*eager[:3], *eager[3]),
                          (*compiled[:3], *compiled[3]), strict=True):
        assert_close(f"compiled {name}", b[:, None], a[:, None], 1e-5 + 1e-5 * a.abs()[:, None])


def test_small_chunks_and_switched_off_compilation_run_eager():
    logits = chunk_logits()

    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile was called")

    assert not ChunkMoments(compile=True, compiler=refuse).uses_compiled(logits)  # < 2^20
    off = ChunkMoments(compile=False, min_elements=0, compiler=refuse)
    assert not off.uses_compiled(logits)
    off(logits, (2.0,))


def test_failed_compilation_warns_once_and_falls_back_to_eager():
    import torch._dynamo.exc

    calls = []

    def broken(fn, **kwargs):
        calls.append(kwargs)

        def run(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(
                "inductor", RuntimeError("no C++ compiler"), None)
        return run

    moments = ChunkMoments(compile=True, min_elements=0, compiler=broken)
    logits = chunk_logits()
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        got = moments(logits, (2.0,))
    assert moments.compile is False and "no C++ compiler" in moments.failure
    eager = EAGER(logits, (2.0,))
    assert all(torch.equal(a, b) for a, b in zip((*got[:3], *got[3]), (*eager[:3], *eager[3]),
                                                 strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        moments(logits, (2.0,))
    assert calls == [{"dynamic": True}]  # compiled once, never retried


def test_other_errors_of_compiled_code_propagate():
    def buggy(fn, **kwargs):
        def run(*args):
            raise IndexError("a bug, not a missing compiler")
        return run

    with pytest.raises(IndexError):
        ChunkMoments(compile=True, min_elements=0, compiler=buggy)(chunk_logits(), ())


@pytest.mark.parametrize(("value", "compiles"), [("0", False), ("1", True), (None, True)])
def test_environment_switch(value, compiles, monkeypatch):
    if value is None:
        monkeypatch.delenv("ENTROPY_FAST_COMPILE", raising=False)
    else:
        monkeypatch.setenv("ENTROPY_FAST_COMPILE", value)
    assert ChunkMoments.from_environment().compile is (
        compiles and torch._dynamo.is_dynamo_supported())


def gated_compiler(gate: threading.Event, calls: list, fail: Exception | None = None):
    """A stand-in for torch.compile whose compilation (the first call of the compiled
    function) waits for `gate`; later calls are counted in `calls` by thread name."""
    def compile_(fn, **kwargs):
        def run(*args):
            if not calls:
                gate.wait(10)
                if fail is not None:
                    raise fail
            calls.append(threading.current_thread().name)
            return fn(*args)
        return run
    return compile_


def test_background_compilation_runs_eager_until_the_compiled_code_is_ready():
    gate, calls = threading.Event(), []
    moments = ChunkMoments(compile=True, min_elements=0, background=True,
                           compiler=gated_compiler(gate, calls))
    logits, orders = chunk_logits(), (2.0,)
    eager = EAGER(logits, orders)
    for _ in range(3):  # compiling: eager numbers, nothing compiled runs on this thread
        got = moments(logits, orders)
        assert all(torch.equal(a, b) for a, b in zip((*got[:3], *got[3]),
                                                     (*eager[:3], *eager[3]), strict=True))
    assert calls == [] and moments._builder.name == "lens-statistics-compile"
    gate.set()
    moments._builder.join(10)
    assert calls == ["lens-statistics-compile"]
    moments(logits, orders)
    assert calls == ["lens-statistics-compile", threading.current_thread().name]


def test_a_background_compile_error_warns_at_the_next_call_and_a_bug_propagates():
    import torch._dynamo.exc

    logits, gate = chunk_logits(), threading.Event()
    gate.set()
    failed = torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("no cc"), None)
    moments = ChunkMoments(compile=True, min_elements=0, background=True,
                           compiler=gated_compiler(gate, [], failed))
    moments(logits, ())
    moments._builder.join(10)
    with pytest.warns(UserWarning, match="no cc"):
        moments(logits, ())
    assert moments.compile is False and "no cc" in moments.failure
    buggy = ChunkMoments(compile=True, min_elements=0, background=True,
                         compiler=gated_compiler(gate, [], IndexError("a bug")))
    buggy(logits, ())
    buggy._builder.join(10)
    with pytest.raises(IndexError, match="a bug"):
        buggy(logits, ())
