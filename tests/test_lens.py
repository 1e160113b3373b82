"""The lens on both backends against the float64 reference, and its resolution.

One case table (tests/lens_cases.py: norms, bias, soft-cap, scale, odd shapes, hazard
rows) and every tiny architecture run over backends "torch" and "triton". Tolerances:
fp32 inputs are held to the fp32 rounding of the logits (`fp32_tol`); bf16 inputs to a
same-dtype torch reference's own error plus 1e-3 nats (STYLE.md item 12) and, against a
float64 evaluation of the rows each backend actually multiplies, to the fp32 tolerance.
"""

import math

import pytest
import torch

from entropy_fast.forward import StateTap, find_decoder_layers
from entropy_fast.lens import Lens, UnsupportedArchitectureError
from tests.lens_cases import (
    ALPHAS,
    BACKENDS,
    BF16_CASES,
    CASES,
    DEVICE,
    kernel_operands,
    make_case,
    on_device,
)
from tests.reference import (
    assert_close,
    check_tokens,
    entropy_from_logits,
    float64_rows,
    fp32_tol,
    model_dtype_rows,
    reference,
)
from tests.tiny_models import N_LAYERS, tiny_model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_case_fp32_against_float64(name, backend):
    lens, hidden, targets = make_case(name)
    ref = reference(lens, float64_rows(lens, hidden), ALPHAS, targets)
    stats = lens.statistics(hidden, ALPHAS, backend=backend, targets=targets,
                            with_top_token=True)
    assert stats.entropy.dtype == torch.float32
    assert stats.entropy.shape == (len(hidden), len(ALPHAS))
    assert_close(f"{name} entropy", stats.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
    check_tokens(stats, ref, lens.vocab_size)
    if name == "layernorm":  # row 1 is nearly one-hot: near-zero entropy stays accurate
        assert ref["entropy"][1, 3] < 1e-6 and stats.entropy[1, 3].abs() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", BF16_CASES)
def test_case_bf16_against_float64(name, backend):
    lens, hidden, targets = make_case(name, torch.bfloat16)
    truth = reference(lens, float64_rows(lens, hidden), ALPHAS)
    same_dtype = reference(lens, model_dtype_rows(lens, hidden), ALPHAS)
    stats = lens.statistics(hidden, ALPHAS, backend=backend, targets=targets,
                            with_top_token=True)
    assert_close(f"{name} entropy vs truth", stats.entropy, truth["entropy"], 1e-3,
                 baseline=same_dtype["entropy"])
    # The rows each backend multiplies, in float64: only the fp32 rounding of the logits.
    rows = kernel_operands(lens, hidden) if backend == "triton" else model_dtype_rows(
        lens, hidden)
    exact = reference(lens, rows, ALPHAS, targets)
    assert_close(f"{name} entropy vs own operands", stats.entropy, exact["entropy"],
                 fp32_tol(exact["zmax"]))
    check_tokens(stats, exact, lens.vocab_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["layernorm", "huge-logits"])
def test_many_orders(name, backend):
    """Nine orders beside 0, 1 and inf: the kernel sweeps three times, and the later
    sweeps' D_a rest on the first sweep's maxima (huge logits would show any drift)."""
    alphas = (0.25, 0.5, 0.75, 0.999, 1.0, 1.001, 2.0, 3.0, 5.0, 9.0, math.inf, 0.0)
    lens, hidden, targets = make_case(name, n_rows=20)
    ref = reference(lens, float64_rows(lens, hidden), alphas, targets)
    stats = lens.statistics(hidden, alphas, backend=backend, targets=targets,
                            with_top_token=True)
    assert_close(f"{name} entropy", stats.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
    check_tokens(stats, ref, lens.vocab_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normed_rows_and_edge_inputs(backend):
    lens, hidden, targets = make_case("layernorm", n_rows=9)
    rows = lens.normalize(hidden)
    ref = reference(lens, rows, ALPHAS, targets)
    stats = lens.statistics(rows, ALPHAS, backend=backend, normed=True, targets=targets)
    assert_close("entropy", stats.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
    shannon = lens.entropy(hidden, 1.0, backend=backend)  # pre-norm rows
    assert_close("pre-norm Shannon", shannon[:, 0], stats.entropy[:, 3], 1e-5)
    bad = targets.clone()
    bad[0], bad[1] = -1, lens.vocab_size
    odd = lens.statistics(hidden, 1.0, backend=backend, targets=bad)
    assert odd.target_surprisal[:2].isnan().all() and (odd.target_rank[:2] == -1).all()
    assert_close("other targets", odd.target_surprisal[2:], stats.target_surprisal[2:], 1e-5)
    assert torch.equal(odd.target_rank[2:], stats.target_rank[2:])
    empty = lens.statistics(hidden[:0], ALPHAS, backend=backend, targets=targets[:0],
                            with_top_token=True)
    assert empty.entropy.shape == (0, len(ALPHAS)) and empty.top_token.shape == (0,)
    assert empty.target_surprisal.shape == empty.target_rank.shape == (0,)


def run_with_taps(model, ids):
    """HF's hidden states and logits, and our tapped pre-norm states, from one forward."""
    layers = find_decoder_layers(model)
    tapped = {}
    with StateTap(layers, range(len(layers) + 1), lambda i, h: tapped.setdefault(i, h[0])):
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out, tapped


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 211, (1, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def test_taps_match_hf_hidden_states(arch_model, ids):
    model = on_device(arch_model[1])
    out, tapped = run_with_taps(model, ids)
    assert len(out.hidden_states) == N_LAYERS + 1 == len(tapped)
    for index in range(N_LAYERS):  # HF's last entry is normed; ours is not
        assert_close(f"state {index}", tapped[index], out.hidden_states[index][0], 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lens_on_last_state_reproduces_model_logits(arch_model, ids, backend):
    model = on_device(arch_model[1])
    lens = Lens.from_model(model)
    out, tapped = run_with_taps(model, ids)
    expected = entropy_from_logits(out.logits[0], ALPHAS)
    got_prenorm = lens.entropy(tapped[N_LAYERS], ALPHAS, backend=backend)
    got_normed = lens.entropy(out.hidden_states[-1][0], ALPHAS, backend=backend, normed=True)
    assert_close("pre-norm last state", got_prenorm, expected, 1e-4)
    assert_close("normed last state", got_normed, expected, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_state_against_float64(arch_model, ids, backend):
    """Every pre-norm state in one call, HF's normed last state in another: entropies,
    argmax, surprisal and rank of the next token."""
    kind, model = arch_model[0], on_device(arch_model[1])
    lens = Lens.from_model(model)
    out, tapped = run_with_taps(model, ids)
    targets = ids[0].roll(-1)
    pre = torch.cat([tapped[i] for i in range(N_LAYERS + 1)])
    refs = []
    for rows, normed, tgt in ((pre, False, targets.repeat(N_LAYERS + 1)),
                              (out.hidden_states[-1][0], True, targets)):
        ref = reference(lens, float64_rows(lens, rows, normed), ALPHAS, tgt)
        refs.append(ref)
        got = lens.statistics(rows, ALPHAS, backend=backend, normed=normed, targets=tgt,
                              with_top_token=True)
        assert_close(f"{kind} entropy", got.entropy, ref["entropy"], fp32_tol(ref["zmax"]))
        check_tokens(got, ref, lens.vocab_size)
        assert (got.target_rank == ref["rank"]).float().mean() > 0.95
    # Every state peaked enough that a wrong norm or head would show (not all near log V).
    shannon = refs[0]["entropy"][:, ALPHAS.index(1.0)].reshape(N_LAYERS + 1, -1)
    assert (shannon.amin(1) < 0.9 * math.log(lens.vocab_size)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2"])
def test_bf16_models_against_float64(kind, backend, ids):
    """Every pre-norm state of a bf16 model, the last one included."""
    model = on_device(tiny_model(kind, dtype=torch.bfloat16))
    lens = Lens.from_model(model)
    _, tapped = run_with_taps(model, ids)
    rows = torch.cat([tapped[i] for i in range(N_LAYERS + 1)])
    truth = reference(lens, float64_rows(lens, rows), ALPHAS)
    same_dtype = reference(lens, model_dtype_rows(lens, rows), ALPHAS)
    got = lens.statistics(rows, ALPHAS, backend=backend)
    assert got.entropy.dtype == torch.float32
    assert_close(f"{kind} bf16 entropy", got.entropy, truth["entropy"], 1e-3,
                 baseline=same_dtype["entropy"])
    assert_close(f"{kind} bf16 entropy, absolute", got.entropy, truth["entropy"], 0.05)


def test_resolution_finds_each_architecture_component():
    assert Lens.from_model(tiny_model("opt")).projection is not None
    assert Lens.from_model(tiny_model("gemma2")).softcap == 2.0
    assert Lens.from_model(tiny_model("gemma")).norm_spec.weight_offset == 1.0
    assert Lens.from_model(tiny_model("gpt2")).norm_spec.kind == "layernorm"
    assert Lens.from_model(tiny_model("llama")).norm_spec.kind == "rmsnorm"


def test_self_check_rejects_a_lens_that_does_not_match_the_model():
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 1.0  # the lens would cap, the model does not
    with pytest.raises(UnsupportedArchitectureError, match="does not reproduce"):
        Lens.from_model(model)


def test_models_without_a_head_are_rejected():
    from transformers import AutoModel

    base = AutoModel.from_config(tiny_model("llama").config)
    with pytest.raises(UnsupportedArchitectureError, match="lm_head"):
        Lens.from_model(base)


def test_bad_hidden_shape_and_backend():
    lens = Lens.from_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="n_rows x d_model"):
        lens.entropy(torch.zeros(2, 3, 48))
    with pytest.raises(ValueError, match="backend"):
        lens.entropy(torch.zeros(2, 48), backend="cuda")
