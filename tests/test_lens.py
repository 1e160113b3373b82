"""The lens against float64 references on every architecture, and its resolution."""

import math

import pytest
import torch

from entropy_fast.forward import StateTap, find_decoder_layers
from entropy_fast.lens import Lens, UnsupportedArchitectureError
from tests.reference import entropy_from_logits, lens_logits_float64
from tests.tiny_models import N_LAYERS, tiny_model

ALPHAS = (0.0, 0.5, 1.0, 2.0, math.inf)


def run_with_taps(model, ids):
    """HF's hidden states and logits, and our tapped pre-norm states, from one forward."""
    layers = find_decoder_layers(model)
    tapped = {}
    with StateTap(layers, range(len(layers) + 1), lambda i, h: tapped.setdefault(i, h[0])):
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out, tapped


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 211, (1, 12), generator=torch.Generator().manual_seed(1))


def test_taps_match_hf_hidden_states(arch_model, ids):
    _, model = arch_model
    out, tapped = run_with_taps(model, ids)
    assert len(out.hidden_states) == N_LAYERS + 1 == len(tapped)
    for index in range(N_LAYERS):  # HF's last entry is normed; ours is not
        torch.testing.assert_close(tapped[index], out.hidden_states[index][0])


def test_lens_on_last_state_reproduces_model_logits(arch_model, ids):
    _, model = arch_model
    lens = Lens.from_model(model)
    out, tapped = run_with_taps(model, ids)
    expected = entropy_from_logits(out.logits[0], ALPHAS)
    got_prenorm = lens.entropy(tapped[N_LAYERS], ALPHAS)
    got_normed = lens.entropy(out.hidden_states[-1][0], ALPHAS, normed=True)
    torch.testing.assert_close(got_prenorm.double(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_normed.double(), expected, rtol=0, atol=1e-4)


def test_every_layer_matches_float64_reference(arch_model, ids):
    kind, model = arch_model
    lens = Lens.from_model(model)
    _, tapped = run_with_taps(model, ids)
    for index, hidden in tapped.items():
        expected = entropy_from_logits(lens_logits_float64(lens, hidden), ALPHAS)
        got = lens.entropy(hidden, ALPHAS, backend="torch")
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4,
                                   msg=lambda m, i=index: f"{kind} state {i}: {m}")
        # Peaked enough that a wrong norm or head would show (not all near log V).
        assert expected[:, 2].min() < 0.9 * math.log(lens.vocab_size)


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


def test_bfloat16_model_entropies_stay_close_to_float64(ids):
    model = tiny_model("llama", dtype=torch.bfloat16)
    lens = Lens.from_model(model)
    _, tapped = run_with_taps(model, ids)
    hidden = tapped[N_LAYERS]
    got = lens.entropy(hidden, (1.0,))
    assert got.dtype == torch.float32
    expected = entropy_from_logits(lens_logits_float64(lens, hidden.float()), (1.0,))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=0.05)


def test_bad_hidden_shape_and_backend():
    lens = Lens.from_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="n_rows x d_model"):
        lens.entropy(torch.zeros(2, 3, 48))
    with pytest.raises(ValueError, match="backend"):
        lens.entropy(torch.zeros(2, 48), backend="cuda")
