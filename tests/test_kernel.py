"""The fused Triton lens kernel against a float64 reference, under the Triton interpreter.

Each numerical hazard has its own rows or case: all-zero rows, nearly one-hot rows
(near-zero entropy, late layers), near-uniform rows (early layers), huge logits, orders
near 1 (0.999, 1.001). Tolerances: fp32 inputs are held to the fp32 rounding of the
logits; bf16 inputs are held (STYLE.md item 12) to the torch backend's own error plus
1e-3 nats, and, against a float64 reference built from the kernel's own bf16 operands, to
the fp32 tolerance.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before torch, triton and entropy_fast are imported

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from entropy_fast.kernels import lens_entropy
from entropy_fast.kernels.lens_entropy import KernelConfig, lens_statistics_triton
from entropy_fast.lens import Lens
from tests.tiny_models import ARCHITECTURES, tiny_model

ALPHAS = (0.0, 0.5, 0.999, 1.0, 1.001, 2.0, math.inf)


class GemmaStyleNorm(nn.Module):
    """RMSNorm scaled by (1 + weight), computed in the input's dtype (float64 for references)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width) * 0.3)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * (1.0 + self.weight)


def make_norm(kind: str | None, width: int) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "gemma":
        return GemmaStyleNorm(width)
    norm = {"layernorm": lambda: nn.LayerNorm(width, eps=1e-5),
            "layernorm-nobias": lambda: nn.LayerNorm(width, eps=1e-5, bias=False),
            "rmsnorm": lambda: nn.RMSNorm(width, eps=1e-6)}[kind]()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0.0, 0.2)
    return norm


# name: (d, V, norm, head bias, soft-cap, logit scale, head weight std)
CASES = {
    "layernorm": (100, 500, "layernorm", True, None, 1.0, 1.0),
    "layernorm-nobias": (100, 211, "layernorm-nobias", False, None, 1.0, 1.0),
    "rmsnorm-even": (64, 512, "rmsnorm", False, None, 1.0, 1.0),  # no masks at all
    "gemma-softcap": (48, 211, "gemma", False, 3.0, 1.0, 1.0),
    "no-norm": (37, 500, None, True, None, 0.5, 1.0),
    "bias-scale-softcap": (100, 211, "rmsnorm", True, 30.0, 2.0, 1.0),
    "huge-logits": (100, 500, "layernorm", True, None, 300.0, 1.0),
    "near-uniform": (100, 500, "rmsnorm", False, None, 1.0, 1e-3),
}


def make_case(name: str, dtype: torch.dtype = torch.float32, n_rows: int = 70, seed: int = 0):
    """A lens and hidden rows: row 0 all zeros, rows 1-4 nearly one-hot, the rest random."""
    d, vocab, norm_kind, has_bias, softcap, scale, std = CASES[name]
    gen = torch.manual_seed(seed)
    head = nn.Linear(d, vocab, bias=has_bias)
    with torch.no_grad():
        head.weight.normal_(0.0, std, generator=gen)
        if has_bias:
            head.bias.normal_(0.0, 1.0, generator=gen)
    lens = Lens(head, make_norm(norm_kind, d), softcap=softcap, logit_scale=scale)
    hidden = torch.randn(n_rows, d, generator=gen) * 2.0 + 0.3
    hidden[0] = 0.0
    hidden[1:5] = head.weight[torch.tensor([3, 7, vocab - 1, vocab // 2])].detach() * 20.0 / std
    targets = torch.randint(0, vocab, (n_rows,), generator=gen)
    targets[1] = 3  # the top token itself
    return to_dtype(lens, dtype), hidden.to(dtype), targets


def to_dtype(lens: Lens, dtype: torch.dtype) -> Lens:
    for module in (lens.head, lens.norm, lens.projection):
        if module is not None:
            module.to(dtype)
    return lens


def float64_rows(lens: Lens, hidden: torch.Tensor, normed: bool) -> torch.Tensor:
    """The lens's own modules (final norm, projection) applied in float64."""
    rows = hidden.double()
    if not normed:
        for module in (lens.norm, lens.projection):
            if module is not None:
                rows = copy.deepcopy(module).double()(rows)
    return rows


def reference(lens: Lens, rows: torch.Tensor, alphas=ALPHAS, targets=None) -> dict:
    """Textbook statistics in float64 of normed rows (n x d): softmax, then the definitions."""
    z = rows.double() @ lens.head.weight.double().T
    if getattr(lens.head, "bias", None) is not None:
        z = z + lens.head.bias.double()
    z = z * lens.logit_scale
    if lens.softcap:
        z = torch.tanh(z / lens.softcap) * lens.softcap
    logp = torch.log_softmax(z, dim=1)
    columns = []
    for a in alphas:
        if a == 1.0:
            columns.append(-(logp.exp() * logp).sum(1))
        elif math.isinf(a):
            columns.append(-logp.max(1).values)
        elif a == 0.0:  # every finite logit has p > 0
            columns.append(torch.full_like(logp[:, 0], math.log(z.shape[1])))
        else:
            columns.append(torch.logsumexp(a * logp, 1) / (1.0 - a))
    out = {"entropy": torch.stack(columns, 1), "z": z, "zmax": z.abs().max().item()}
    if targets is not None:
        z_target = z.gather(1, targets[:, None])
        out["surprisal"] = -logp.gather(1, targets[:, None])[:, 0]
        others = torch.ones_like(z, dtype=torch.bool).scatter_(1, targets[:, None], False)
        out["rank"] = ((z > z_target) & others).sum(1)
        out["near"] = (((z - z_target).abs() <= fp32_tol(out["zmax"])) & others).sum(1)
    return out


def fp32_tol(zmax: float) -> float:
    """What fp32 rounding of the logits allows, in nats or logit units."""
    return 1e-5 + 2e-7 * zmax


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol) -> None:
    """Per-column check that reports mismatch counts and nan/inf disagreements."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    finite = torch.isfinite(got) == torch.isfinite(want)
    assert finite.all(), f"{name}: {int((~finite).sum())} nan/inf disagreements"
    err = (got - want).abs()
    atol = torch.as_tensor(atol, dtype=torch.float64)
    bad = err > atol
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} beyond tolerance; max "
                           f"error per column {err.reshape(err.shape[0], -1).amax(0).tolist()}")


def check_tokens(stats, ref, vocab: int) -> None:
    """Argmax, target surprisal and rank against the float64 logits."""
    z, tol = ref["z"], fp32_tol(ref["zmax"])
    top_logit = z.gather(1, stats.top_token[:, None])[:, 0]
    assert (stats.top_token >= 0).all() and (stats.top_token < vocab).all()
    assert (top_logit >= z.max(1).values - tol).all(), "argmax is not a maximal token"
    assert (stats.top_token == z.argmax(1)).float().mean() > 0.9
    assert_close("surprisal", stats.target_surprisal, ref["surprisal"], tol)
    off = (stats.target_rank - ref["rank"]).abs()
    assert (off <= ref["near"]).all(), f"rank off by more than the near-ties: {off.max()}"


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_against_float64(name):
    lens, hidden, targets = make_case(name)
    ref = reference(lens, float64_rows(lens, hidden, False), targets=targets)
    stats = lens.statistics(hidden, ALPHAS, backend="triton", targets=targets,
                            with_top_token=True)
    assert stats.entropy.dtype == torch.float32 and stats.entropy.shape == (len(hidden), 7)
    assert_close("entropy", stats.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
    check_tokens(stats, ref, lens.vocab_size)
    if name == "layernorm":  # row 1 is nearly one-hot: near-zero entropy stays accurate
        assert ref["entropy"][1, 3] < 1e-6 and stats.entropy[1, 3].abs() < 1e-5


@pytest.mark.parametrize("name", ["layernorm", "gemma-softcap", "bias-scale-softcap",
                                  "huge-logits", "near-uniform"])
def test_bf16_against_float64(name):
    lens, hidden, targets = make_case(name, torch.bfloat16)
    truth = reference(lens, float64_rows(lens, hidden, False))
    stats = lens.statistics(hidden, ALPHAS, backend="triton", targets=targets,
                            with_top_token=True)
    torch_stats = lens.statistics(hidden, ALPHAS, backend="torch")
    torch_err = (torch_stats.entropy.double() - truth["entropy"]).abs().amax(0)
    assert_close("entropy vs truth", stats.entropy, truth["entropy"], torch_err + 1e-3)
    # The kernel's own operands (fp32 norm rounded once to bf16) in float64: fp32 tolerance.
    spec = lens.norm_spec
    operands = spec.apply(hidden).to(torch.bfloat16)
    exact = reference(lens, operands, targets=targets)
    assert_close("entropy vs operands", stats.entropy, exact["entropy"], fp32_tol(exact["zmax"]))
    check_tokens(stats, exact, lens.vocab_size)


CONFIGS = {
    "splits-flat": KernelConfig(block_n=16, block_v=64, block_k=16, n_splits=3, flat=True),
    "one-split": KernelConfig(block_n=32, block_v=128, block_k=32, n_splits=1),
    "many-splits": KernelConfig(block_n=64, block_v=32, block_k=64, n_splits=100, group_n=1),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_configs_agree(config):
    """Tile shapes, split counts and the flat loop change nothing beyond fp32 rounding."""
    lens, hidden, targets = make_case("bias-scale-softcap", n_rows=40)
    ref = reference(lens, float64_rows(lens, hidden, False), targets=targets)
    stats = lens_statistics_triton(lens, hidden, ALPHAS, targets=targets, with_top_token=True,
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
    runs = [lens_statistics_triton(lens, hidden, ALPHAS, targets=targets, with_top_token=True,
                                   config=cfg) for cfg in (pointers, replace(pointers, tma=True))]
    assert used == [False, True]  # no silent fallback to pointers
    for field in ("entropy", "top_token", "target_surprisal", "target_rank"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field)), field


@pytest.mark.parametrize("case", ["fp32", "unaligned rows", "unaligned head rows",
                                  "unaligned base"])
def test_tma_falls_back_where_it_cannot_serve(case):
    rows, weight = torch.empty(5, 96, dtype=torch.bfloat16), torch.empty(211, 96,
                                                                         dtype=torch.bfloat16)
    if case == "fp32":
        rows, weight = rows.float(), weight.float()
    elif case == "unaligned rows":  # 200-byte rows
        rows = torch.empty(5, 100, dtype=torch.bfloat16)
    elif case == "unaligned head rows":
        weight = torch.empty(211, 100, dtype=torch.bfloat16)[:, :96]
    else:  # a view 2 bytes past an aligned allocation
        rows = torch.empty(5 * 96 + 1, dtype=torch.bfloat16)[1:].view(5, 96)
    assert lens_entropy._operands(KernelConfig(tma=True), rows, weight)[0].tma is False
    aligned = torch.empty(5, 96, dtype=torch.bfloat16), torch.empty(211, 96, dtype=torch.bfloat16)
    assert lens_entropy._operands(KernelConfig(tma=True), *aligned)[0].tma is True


def test_many_orders_take_extra_passes():
    alphas = (0.25, 0.5, 0.999, 1.0, 1.001, 2.0, 3.0, math.inf, 0.0)
    lens, hidden, targets = make_case("layernorm", n_rows=20)
    ref = reference(lens, float64_rows(lens, hidden, False), alphas, targets=targets)
    stats = lens.statistics(hidden, alphas, backend="triton", targets=targets,
                            with_top_token=True)
    assert_close("entropy", stats.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
    check_tokens(stats, ref, lens.vocab_size)


def test_normed_rows_and_edge_inputs():
    lens, hidden, targets = make_case("layernorm", n_rows=9)
    rows = lens.normalize(hidden)
    ref = reference(lens, rows, targets=targets)
    stats = lens.statistics(rows, ALPHAS, backend="triton", normed=True, targets=targets)
    assert_close("entropy", stats.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
    shannon = lens.entropy(hidden, 1.0, backend="triton")  # pre-norm rows, fused norm
    assert torch.allclose(shannon[:, 0], stats.entropy[:, 3], atol=1e-5)
    bad = targets.clone()
    bad[0], bad[1] = -1, lens.vocab_size
    odd = lens.statistics(hidden, 1.0, backend="triton", targets=bad)
    assert odd.target_surprisal[:2].isnan().all() and (odd.target_rank[:2] == -1).all()
    assert torch.allclose(odd.target_surprisal[2:], stats.target_surprisal[2:], atol=1e-5)
    empty = lens.statistics(hidden[:0], ALPHAS, backend="triton", targets=targets[:0],
                            with_top_token=True)
    assert empty.entropy.shape == (0, 7) and empty.top_token.shape == (0,)


def model_rows(model, seq: int = 16):
    """Token ids and every hidden state of one forward (index L is already normed)."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (1, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    return ids[0], states


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_models_triton_torch_float64(kind):
    """Real tiny models: every pre-norm layer in one call, the normed last state in another."""
    model = tiny_model(kind)
    lens = Lens.from_model(model)
    ids, states = model_rows(model)
    targets = torch.cat([ids[1:], ids[:1]])
    pre = torch.cat([s[0] for s in states[:-1]])
    for rows, normed, tgt in ((pre, False, targets.repeat(len(states) - 1)),
                              (states[-1][0], True, targets)):
        ref = reference(lens, float64_rows(lens, rows, normed), targets=tgt)
        got = lens.statistics(rows, ALPHAS, backend="triton", normed=normed, targets=tgt,
                              with_top_token=True)
        assert_close(f"{kind} entropy", got.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
        check_tokens(got, ref, lens.vocab_size)
        alt = lens.statistics(rows, ALPHAS, backend="torch", normed=normed, targets=tgt,
                              with_top_token=True)
        assert_close(f"{kind} triton vs torch", got.entropy, alt.entropy,
                     2 * fp32_tol(ref["zmax"]))
        assert (got.target_rank == alt.target_rank).float().mean() > 0.95


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2"])
def test_bf16_models_match_torch_backend(kind):
    model = tiny_model(kind, dtype=torch.bfloat16)
    lens = Lens.from_model(model)
    _, states = model_rows(model)
    rows = torch.cat([s[0] for s in states[:-1]])
    truth = reference(lens, float64_rows(lens, rows, False))
    got = lens.statistics(rows, ALPHAS, backend="triton")
    alt = lens.statistics(rows, ALPHAS, backend="torch")
    torch_err = (alt.entropy.double() - truth["entropy"]).abs().amax(0)
    assert_close(f"{kind} bf16 entropy", got.entropy, truth["entropy"], torch_err + 1e-3)
