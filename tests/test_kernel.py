"""The fused Triton kernel's own surface: its launcher, tile configurations, TMA loads.

The lens-level accuracy of the kernel (every case, hazard and architecture) is in
tests/test_lens.py, run over both backends. Here: the launcher takes plain tensors and
returns per-split partial sums whose every part is the softmax sums of its own tokens;
tile shapes, split counts, the flat loop and tensor-descriptor loads change nothing
beyond fp32 rounding; bad operands raise ValueError. Under the Triton interpreter on CPU
(tests/conftest.py); compiled on CUDA with TRITON_INTERPRET=0.
"""

import math
from dataclasses import replace

import pytest
import torch

from entropy_fast.entropy import finalize
from entropy_fast.kernels import lens_entropy
from entropy_fast.kernels.lens_entropy import KernelConfig, lens_entropy_partials
from tests.lens_cases import ALPHAS, DEVICE, make_case
from tests.reference import (
    assert_close,
    check_tokens,
    float64_rows,
    fp32_tol,
    head_logits_float64,
    reference,
)


def plain_inputs(name: str, dtype: torch.dtype = torch.float32, n_rows: int | None = None):
    """A case's rows, head and norm as plain tensors and scalars (no Lens), the lens for
    the reference, and the targets."""
    lens, hidden, targets = make_case(name, dtype, n_rows)
    norm, head = lens.norm, lens.head
    tensors = dict(norm="layernorm", norm_weight=norm.weight.detach(),
                   norm_bias=norm.bias.detach(), norm_eps=norm.eps,
                   logit_scale=lens.logit_scale, softcap=lens.softcap)
    return lens, hidden, head.weight.detach(), head.bias.detach(), tensors, targets


def test_launcher_takes_tensors_and_returns_each_splits_sums():
    """V = 507 in tiles of 128, two tiles per split: split 0 holds tokens 0..255, split 1
    tokens 256..506 (the last tile ragged). Each part is its own tokens' softmax sums."""
    lens, hidden, weight, bias, tensors, targets = plain_inputs("odd-shape")
    config = KernelConfig(block_n=64, block_v=128, block_k=64, n_splits=2)
    parts = lens_entropy_partials(hidden, weight, bias, **tensors, alphas=ALPHAS,
                                  targets=targets, with_argmax=True, config=config)
    n = len(hidden)
    assert parts.orders == (0.5, 0.999, 1.001, 2.0) and parts.vocab == 507
    assert parts.m.shape == (2, n) and parts.m.dtype == torch.float64
    assert parts.top.shape == parts.above.shape == (2, n) and parts.target_logit.shape == (n,)
    z = head_logits_float64(lens, float64_rows(lens, hidden))
    tol = fp32_tol(z.abs().max().item())
    for k, tokens in enumerate((slice(0, 256), slice(256, 507))):
        zk = z[:, tokens]
        m = zk.max(1).values
        x = zk - m[:, None]
        assert_close(f"split {k} m", parts.m[k], m, tol)
        assert_close(f"split {k} S", parts.s[k] / x.exp().sum(1), torch.ones_like(m), 1e-5)
        assert_close(f"split {k} U/S", parts.u[k] / parts.s[k],
                     (x.exp() * x).sum(1) / x.exp().sum(1), tol)
        for a, d in zip(parts.orders, parts.d, strict=True):
            assert_close(f"split {k} D_{a}/S", d[k] / parts.s[k],
                         ((a * x).exp() - x.exp()).sum(1) / x.exp().sum(1), 1e-5)
        assert (parts.top[k] - tokens.start == zk.argmax(1)).float().mean() > 0.9
    ref = reference(lens, float64_rows(lens, hidden), ALPHAS, targets)
    stats = finalize(parts, ALPHAS, targets)
    assert_close("entropy", stats.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
    check_tokens(stats, ref, lens.vocab_size)


BAD_OPERANDS = {  # argument: (value, what the error names)
    "x": (lambda t: t["x"][:, :-1], "do not fit the head"),
    "bias": (lambda t: t["bias"][:-1], "bias must be"),
    "norm_weight": (lambda t: t["norm_weight"][:-1], "norm_weight must be"),
    "targets": (lambda t: t["targets"][:-1], "targets must be"),
    "norm": (lambda t: "batchnorm", "norm must be"),
    "softcap": (lambda t: -1.0, "softcap > 0"),
    "logit_scale": (lambda t: 0.0, "logit_scale > 0"),
}


@pytest.mark.parametrize("bad", list(BAD_OPERANDS))
def test_launcher_rejects_operands_that_do_not_fit(bad):
    _, hidden, weight, bias, tensors, targets = plain_inputs("odd-shape", n_rows=5)
    args = dict(x=hidden, weight=weight, bias=bias, **tensors, targets=targets)
    value, message = BAD_OPERANDS[bad]
    args[bad] = value(args)
    with pytest.raises(ValueError, match=message):
        lens_entropy_partials(**args)


CONFIGS = {
    "splits-flat": KernelConfig(block_n=16, block_v=64, block_k=16, n_splits=3, flat=True),
    "one-split": KernelConfig(block_n=32, block_v=128, block_k=32, n_splits=1),
    "many-splits": KernelConfig(block_n=64, block_v=32, block_k=64, n_splits=100, group_n=1),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_configs_agree(config):
    """Tile shapes, split counts and the flat loop change nothing beyond fp32 rounding."""
    lens, hidden, targets = make_case("bias-scale-softcap", n_rows=40)
    ref = reference(lens, float64_rows(lens, hidden), ALPHAS, targets)
    stats = lens.kernel_statistics(hidden, ALPHAS, targets=targets, with_top_token=True,
                                   config=CONFIGS[config])
    assert_close("entropy", stats.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
    check_tokens(stats, ref, lens.vocab_size)


@pytest.mark.parametrize("flat", [False, True])
def test_tma_descriptors_match_pointer_loads(flat, monkeypatch):
    """Tensor-descriptor loads (zeros past every edge: 37 rows, d = 48 against K steps of
    32, V = 211) give exactly what clamped and masked pointer loads give."""
    lens, hidden, targets = make_case("gemma-softcap", torch.bfloat16, n_rows=37)
    pointers = KernelConfig(block_n=16, block_v=64, block_k=32, n_splits=2, flat=flat)
    used, operands = [], lens_entropy._operands

    def spy(*args):
        cfg, x, weight = operands(*args)
        used.append(cfg.tma)
        return cfg, x, weight

    monkeypatch.setattr(lens_entropy, "_operands", spy)
    runs = [lens.kernel_statistics(hidden, ALPHAS, targets=targets, with_top_token=True,
                                   config=cfg) for cfg in (pointers, replace(pointers, tma=True))]
    assert used == [False, True]  # no silent fallback to pointers
    for field in ("entropy", "top_token", "target_surprisal", "target_rank"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field)), field


@pytest.mark.parametrize("case", ["fp32", "unaligned rows", "unaligned head rows",
                                  "unaligned base"])
def test_tma_falls_back_where_it_cannot_serve(case):
    def empty(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device=DEVICE)

    rows, weight = empty(5, 96), empty(211, 96)
    if case == "fp32":
        rows, weight = rows.float(), weight.float()
    elif case == "unaligned rows":  # 200-byte rows
        rows = empty(5, 100)
    elif case == "unaligned head rows":
        weight = empty(211, 100)[:, :96]
    else:  # a view 2 bytes past an aligned allocation
        rows = empty(5 * 96 + 1)[1:].view(5, 96)
    assert lens_entropy._operands(KernelConfig(tma=True), rows, weight)[0].tma is False
    aligned = empty(5, 96), empty(211, 96)
    if DEVICE.type == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert lens_entropy._operands(KernelConfig(tma=True), *aligned)[0].tma is True


def test_orders_beyond_four_take_extra_sweeps(monkeypatch):
    """Nine tilted orders: three launches; argmax and targets only in the first."""
    launches = []
    kernel = lens_entropy._lens_entropy_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kwargs["WITH_ARGMAX"], kwargs["HAS_TARGETS"]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(lens_entropy, "_lens_entropy_kernel", Spy())
    alphas = (0.25, 0.5, 0.75, 0.999, 1.0, 1.001, 2.0, 3.0, 5.0, 9.0, math.inf, 0.0)
    lens, hidden, targets = make_case("layernorm", n_rows=8)
    parts = lens_entropy_partials(hidden, lens.head.weight.detach(), lens.head.bias.detach(),
                                  alphas=alphas, targets=targets, with_argmax=True)
    assert launches == [(True, True), (False, False), (False, False)]
    assert parts.orders == (0.25, 0.5, 0.75, 0.999, 1.001, 2.0, 3.0, 5.0, 9.0)
    assert len(parts.d) == 9
