"""EntropyProfiler: row alignment, generation, batching invariance, strides, bad input."""

import math

import pytest
import torch

from entropy_fast.lens import Lens
from entropy_fast.models import ModelNotFoundError
from entropy_fast.profiler import EntropyProfiler, select_layers
from tests.reference import entropy_from_logits, lens_logits_float64
from tests.tiny_models import N_LAYERS, tiny_model

PROMPTS = ["Hello world", "The quick brown fox jumps", "ab", "Once upon a time there was"]


@pytest.fixture(scope="module")
def profiler(llama, tokenizer):
    return EntropyProfiler(llama, tokenizer=tokenizer, alpha=(1.0, 2.0, math.inf),
                           top_token=True, target_stats=True)


def test_text_mode_rows_are_tokens_1_to_T_minus_1(profiler, tokenizer, llama):
    text = PROMPTS[1]
    ids = tokenizer(text)["input_ids"]
    profile = profiler.profile_text(text, max_new_tokens=0)
    assert profile.token_ids.tolist() == ids[1:]
    assert profile.layer_indices == list(range(N_LAYERS + 1))
    # Independent reference: HF's own forward, float64 lens from the normed last state.
    out = llama(input_ids=torch.tensor([ids]), output_hidden_states=True)
    lens = Lens.from_model(llama)
    expected_last = entropy_from_logits(out.logits[0, :-1], (1.0, 2.0, math.inf))
    got_last = torch.stack([profile.entropies[a][:, -1] for a in (1.0, 2.0, math.inf)], 1)
    torch.testing.assert_close(got_last.double(), expected_last, rtol=0, atol=1e-4)
    for column, index in enumerate(profile.layer_indices[:-1]):
        logits = lens_logits_float64(lens, out.hidden_states[index][0, :-1])
        expected = entropy_from_logits(logits, (1.0,))[:, 0]
        torch.testing.assert_close(profile.entropy[:, column].double(), expected, rtol=0,
                                   atol=1e-4)


def test_token_statistics_describe_the_actual_next_token(profiler, tokenizer, llama):
    text = PROMPTS[3]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    profile = profiler.profile_text(text, max_new_tokens=0)
    logits = llama(input_ids=ids).logits[0, :-1].double()
    targets = ids[0, 1:]
    p = torch.softmax(logits, -1)
    assert torch.equal(profile.top_token_ids[:, -1], logits.argmax(-1))
    torch.testing.assert_close(profile.target_surprisal[:, -1].double(),
                               -torch.log(p.gather(1, targets[:, None])[:, 0]), rtol=0, atol=1e-4)
    ranks = (logits > logits.gather(1, targets[:, None])).sum(-1)
    assert torch.equal(profile.target_rank[:, -1], ranks)


def test_generation_matches_hf_generate_and_seed_style_entropies(profiler, tokenizer, llama):
    prompt = PROMPTS[0]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    profile = profiler.profile_text(prompt, max_new_tokens=6)
    out = llama.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_hidden_states=True, return_dict_in_generate=True)
    generated = out.sequences[0, ids.shape[1]:].tolist()
    assert profile.token_ids.tolist() == generated[:profile.n_tokens]
    assert profile.metadata["mode"] == "generation"
    assert profile.metadata["prompt_token_ids"] == ids[0].tolist()
    # Seed-style reference: the hidden states of each decoding step, last position.
    lens = Lens.from_model(llama)
    for step in range(profile.n_tokens):
        states = out.hidden_states[step]
        for column, index in enumerate(profile.layer_indices):
            hidden = states[index][0, -1:]
            normed = index == N_LAYERS  # HF hands the last state over normed
            logits = lens_logits_float64(lens, hidden, normed=normed)
            expected = entropy_from_logits(logits, (1.0,))[0, 0]
            assert profile.entropy[step, column].item() == pytest.approx(expected.item(),
                                                                         abs=1e-4)


def test_batch_profiles_do_not_depend_on_batch_mates(profiler):
    batch = profiler.profile_batch(PROMPTS, max_new_tokens=5)
    assert [p.metadata["prompt"] for p in batch] == PROMPTS
    for prompt, profile in zip(PROMPTS, batch, strict=True):
        alone = profiler.profile_text(prompt, max_new_tokens=5)
        assert torch.equal(alone.token_ids, profile.token_ids)
        torch.testing.assert_close(alone.entropy, profile.entropy, rtol=0, atol=1e-4)


def test_small_token_budget_gives_the_same_profiles(llama, tokenizer):
    small = EntropyProfiler(llama, tokenizer=tokenizer, batch_tokens=16)
    large = EntropyProfiler(llama, tokenizer=tokenizer, batch_tokens=4096)
    for a, b in zip(small.profile_batch(PROMPTS, 0), large.profile_batch(PROMPTS, 0),
                    strict=True):
        torch.testing.assert_close(a.entropy, b.entropy, rtol=0, atol=1e-4)


def test_iter_profiles_yields_every_prompt_once(profiler):
    seen = sorted(i for i, _ in profiler.iter_profiles(PROMPTS * 3, 0, wave_tokens=10))
    assert seen == list(range(len(PROMPTS) * 3))


def test_profile_token_ids_equals_text_mode_of_the_same_ids(profiler, tokenizer):
    generated = profiler.profile_text(PROMPTS[0], max_new_tokens=4)
    prompt_ids = generated.metadata["prompt_token_ids"]
    ((_, again),) = list(profiler.profile_token_ids([(prompt_ids, generated.token_ids.tolist())]))
    torch.testing.assert_close(again.entropy, generated.entropy, rtol=0, atol=1e-5)
    assert again.metadata["generator"] == "given"


def test_layer_stride_keeps_the_last_state(llama, tokenizer):
    assert select_layers(4, 3) == [0, 3, 4]
    assert select_layers(4, 2) == [0, 2, 4]
    assert select_layers(4, 10) == [0, 4]
    strided = EntropyProfiler(llama, tokenizer=tokenizer, layer_stride=2)
    full = EntropyProfiler(llama, tokenizer=tokenizer)
    a = strided.profile_text(PROMPTS[1], 0)
    b = full.profile_text(PROMPTS[1], 0)
    assert a.layer_indices == [0, 2, 3]
    torch.testing.assert_close(a.entropy, b.entropy[:, [0, 2, 3]])


def test_states_are_returned_aligned_with_rows(profiler):
    profile, states = profiler.profile_text_with_states(PROMPTS[0], max_new_tokens=3)
    assert states.shape == (profile.n_layers, profile.n_tokens, 48)
    again = profiler.lens.entropy(states[-1], profiler.alphas)
    torch.testing.assert_close(again[:, 0], profile.entropy[:, -1], rtol=0, atol=1e-5)


def test_entropy_in_bits(llama, tokenizer):
    nats = EntropyProfiler(llama, tokenizer=tokenizer).profile_text(PROMPTS[1], 0)
    bits = EntropyProfiler(llama, tokenizer=tokenizer, base=2).profile_text(PROMPTS[1], 0)
    torch.testing.assert_close(bits.entropy, nats.entropy / math.log(2))


def test_sampling_is_reproducible_with_a_seed(profiler):
    a = profiler.profile_text(PROMPTS[0], 8, do_sample=True, temperature=1.5, seed=3)
    b = profiler.profile_text(PROMPTS[0], 8, do_sample=True, temperature=1.5, seed=3)
    assert torch.equal(a.token_ids, b.token_ids)


@pytest.mark.parametrize("kind", ["gpt2", "gemma2", "opt", "gpt_neox"])
def test_other_architectures_profile_end_to_end(kind, tokenizer):
    model = tiny_model(kind)
    profile = EntropyProfiler(model, tokenizer=tokenizer).profile_text(PROMPTS[3], 4)
    assert profile.n_layers == N_LAYERS + 1 and 1 <= profile.n_tokens <= 4
    assert torch.isfinite(profile.entropy).all()


# -- bad input ----------------------------------------------------------------------------

def test_empty_prompt(profiler):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        profiler.profile_batch(["fine", "   "], 2)


def test_prompt_longer_than_the_context_window(profiler):
    with pytest.raises(ValueError, match="context window is 128"):
        profiler.profile_text("x" * 200, 0)
    with pytest.raises(ValueError, match="context window"):
        profiler.profile_text("x" * 120, max_new_tokens=20)


def test_one_token_text(profiler):
    with pytest.raises(ValueError, match="at least two tokens"):
        profiler.profile_text("a", 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": -1.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"layer_stride": 0}, "layer_stride"), ({"layer_stride": 1.5}, "layer_stride"),
    ({"backend": "gpu"}, "backend"), ({"dtype": "float8"}, "dtype"),
    ({"batch_tokens": 0}, "batch_tokens"), ({"base": 1}, "base"),
])
def test_bad_settings(llama, tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EntropyProfiler(llama, tokenizer=tokenizer, **kwargs)


def test_missing_models(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        EntropyProfiler(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        EntropyProfiler(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelNotFoundError, match="cannot load model"):
        EntropyProfiler("no-such-org/no-such-model")


def test_quantized_loading_without_bitsandbytes(llama, tokenizer):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(ImportError, match=r"entropy-fast\[quantize\]"):
        EntropyProfiler("smollm2-135m", load_in_8bit=True)


def test_saved_folder_loads_by_path(llama, tokenizer, tmp_path):
    llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from_path = EntropyProfiler(str(tmp_path)).profile_text(PROMPTS[1], 0)
    from_object = EntropyProfiler(llama, tokenizer=tokenizer).profile_text(PROMPTS[1], 0)
    torch.testing.assert_close(from_path.entropy, from_object.entropy)


def test_vllm_generation_is_refused_for_quantized_profiling():
    with pytest.raises(ValueError, match="unquantized"):
        EntropyProfiler("smollm2-135m", load_in_4bit=True, generator="vllm")


@pytest.mark.parametrize("load", ["profiler", "tokenizer"])
def test_an_unknown_hub_id_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch, load):
    """Without HF_HUB_OFFLINE an unreachable hub cost ~50 s of retries before the error."""
    import transformers
    from huggingface_hub import constants

    from entropy_fast import models

    def no_hub_call(*args, **kwargs):
        raise AssertionError("from_pretrained was called: the hub's retries would follow")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_reachable", lambda url: False)
    for auto in (transformers.AutoConfig, transformers.AutoTokenizer,
                 transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto, "from_pretrained", no_hub_call)
    with pytest.raises(ModelNotFoundError, match=r"cannot be reached.*connect to the network"):
        if load == "profiler":
            EntropyProfiler("no-such-org/no-such-model")
        else:
            models.load_tokenizer_and_config("no-such-org/no-such-model")


def _lens_reference(model, hidden_states, rows: slice, layers):
    """float64 (top-10 ids, probs, KL to the last state) per profiled layer: the lens
    written out (HF's normed last state gives the model's own logits)."""
    lens = Lens.from_model(model)
    logp = [torch.log_softmax(lens_logits_float64(lens, hidden_states[i][0, rows],
                                                  normed=i == len(hidden_states) - 1), -1)
            for i in layers]
    final = torch.log_softmax(lens_logits_float64(lens, hidden_states[-1][0, rows],
                                                  normed=True), -1)
    ids = torch.stack([torch.sort(lp, dim=-1, descending=True, stable=True).indices[:, :10]
                       for lp in logp], 1)
    probs = torch.stack([lp.exp().gather(1, i) for lp, i in zip(logp, ids.unbind(1),
                                                                 strict=True)], 1)
    kl = torch.stack([(final.exp() * (final - lp)).sum(-1) for lp in logp], 1)
    return ids, probs, kl


@pytest.mark.parametrize("new_tokens", [0, 5])
def test_top_tokens_and_kl_to_final_against_float64(llama, tokenizer, new_tokens):
    """Layers without the last state (KL still refers to it), text and generation mode;
    bits scale the KL but never the probabilities."""
    layers = [0, 1, 3]
    profiler = EntropyProfiler(llama, tokenizer=tokenizer, top_tokens=10, kl_to_final=True,
                               layers=layers, base=2)
    profile = profiler.profile_text(PROMPTS[3], max_new_tokens=new_tokens)
    ids = tokenizer(PROMPTS[3])["input_ids"]
    full = ids if not new_tokens else ids + profile.token_ids.tolist()
    out = llama(input_ids=torch.tensor([full]), output_hidden_states=True)
    rows = slice(0, len(full) - 1) if not new_tokens else slice(len(ids) - 1, len(full) - 1)
    want_ids, want_probs, want_kl = _lens_reference(llama, out.hidden_states, rows, layers)
    assert profile.top_tokens.shape == (profile.n_tokens, len(layers), 10)
    assert (profile.top_tokens == want_ids).float().mean() > 0.99  # near-ties may swap
    torch.testing.assert_close(profile.top_probs.double(), want_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(profile.kl_to_final.double(), want_kl / math.log(2), rtol=0,
                               atol=1e-4)
    with_last = EntropyProfiler(llama, tokenizer=tokenizer, kl_to_final=True)
    last = with_last.profile_text(PROMPTS[3], max_new_tokens=new_tokens)
    assert (last.kl_to_final[:, -1] == 0).all() and last.top_tokens is None
