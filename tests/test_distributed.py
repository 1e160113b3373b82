"""The Ray engine's driver without a cluster: refusals before any work, and work units.

The runs on a real Ray cluster are in tests/test_ray.py.
"""

from __future__ import annotations

import errno
import importlib.util

import pytest

from entropy_fast.cli import main
from entropy_fast.distributed import UNITS_PER_WORKER, RayEngine, _placement, _units
from entropy_fast.errors import ConfigError
from entropy_fast.settings import ModelSettings, SamplingSettings
from entropy_fast.store import Store


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("one prompt\nanother prompt\n")
    return str(path)


def test_without_ray_one_line_names_the_extra(corpus, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    code, err = run_cli(capsys, "profile", "smollm2-135m", "--prompts", corpus, "--out",
                        str(tmp_path / "store"), "--ray", "--no-plot")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "needs the 'ray' package" in err and "pip install 'entropy-fast[ray]'" in err
    assert not (tmp_path / "store").exists()  # refused before anything was written


def test_ray_options_need_ray(corpus, capsys):
    code, err = run_cli(capsys, "profile", "--prompts", corpus, "--workers", "2")
    assert code == 1 and "--ray-address and --workers go with --ray" in err


def test_a_store_without_locks_is_refused_before_a_cluster_starts(corpus, tmp_path,
                                                                  monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    from tests.tiny_models import tiny_model, tiny_tokenizer

    folder = tmp_path / "llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    capsys.readouterr()
    code, err = run_cli(capsys, "profile", str(folder), "--prompts", corpus, "--out",
                        str(tmp_path / "store"), "--max-new-tokens", "0", "--ray",
                        "--no-plot")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "does not support file locks" in err
    assert not ray.is_initialized()
    assert Store(tmp_path / "store").runs() == []


def test_loaded_models_are_refused(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from entropy_fast.pipeline import profile_corpus
    from entropy_fast.profiler import EntropyProfiler
    from tests.tiny_models import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    model.config.name_or_path = "tiny"
    with pytest.raises(ConfigError, match="not a bare model object"):
        profile_corpus(model, ["a text", "another"], tmp_path / "store", max_new_tokens=0,
                       engine="ray")
    profiler = EntropyProfiler(model, tokenizer=tiny_tokenizer())
    with pytest.raises(ConfigError, match="not as a loaded object"):
        profile_corpus(profiler, ["a text", "another"], tmp_path / "store", max_new_tokens=0,
                       engine="ray")
    assert not (tmp_path / "store" / "runs").exists()


def test_engine_options_are_checked():
    with pytest.raises(ConfigError, match="workers must be an integer >= 1"):
        RayEngine(workers=0)
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        RayEngine(cpus_per_worker=0)


def prompts(lengths: list[int]) -> list[dict]:
    return [{"prompt_id": i, "text": "", "source_line": i + 1, "token_ids": [5] * n,
             "continuation": None} for i, n in enumerate(lengths)]


def test_units_are_consecutive_balanced_and_bounded():
    text = SamplingSettings(max_new_tokens=0)
    lengths = [3 + (i * 7) % 40 for i in range(500)]
    units = _units(prompts(lengths), text, max_tokens=10**9, workers=3)
    assert [p["prompt_id"] for u in units for p in u] == list(range(500))
    assert len(units) >= UNITS_PER_WORKER * 3 - 1
    sizes = [sum(len(p["token_ids"]) - 1 for p in u) for u in units]
    assert max(sizes[:-1]) - min(sizes[:-1]) < 40  # balanced in tokens, not in prompts
    bounded = _units(prompts(lengths), text, max_tokens=30, workers=1)
    assert all(sum(len(p["token_ids"]) - 1 for p in u) < 30 + 40 for u in bounded)
    one_each = _units(prompts([4, 4, 4]), text, max_tokens=1, workers=1)
    assert [len(u) for u in one_each] == [1, 1, 1]
    generating = _units(prompts([4] * 10), SamplingSettings(max_new_tokens=8), max_tokens=16,
                        workers=1)
    assert [len(u) for u in generating] == [2] * 5  # sized by the tokens to generate


def test_a_vllm_stage_shares_each_gpu_with_its_lens_actor_and_needs_cpus_for_both():
    """Runs that generate with vLLM place one engine beside each lens actor: half a GPU
    each on a GPU cluster, and CPUs for both on a CPU cluster (refused when short)."""
    gpu_cluster = {"GPU": 4.0, "CPU": 32.0}
    lens_only = _placement(RayEngine(), ModelSettings(), gpu_cluster, stages=1)
    with_engines = _placement(RayEngine(), ModelSettings(), gpu_cluster, stages=2)
    assert (lens_only.workers, lens_only.gpus) == (4, 1.0)
    assert (with_engines.workers, with_engines.gpus) == (4, 0.5)
    assert with_engines.settings.device == "cuda"
    cpu_cluster = {"CPU": 3.0}
    assert _placement(RayEngine(workers=3), ModelSettings(), cpu_cluster, stages=1).gpus == 0
    with pytest.raises(ConfigError, match=r"and as many vLLM engines.*3 CPUs"):
        _placement(RayEngine(workers=2), ModelSettings(), cpu_cluster, stages=2)


def test_a_run_that_reuses_stored_continuations_gives_its_lens_actors_whole_gpus(
        tmp_path, monkeypatch):
    """In a job whose settings generate with vLLM, only the runs that start engines share
    each GPU: a run that profiles a stored generation stage has no engine beside its lens
    actors, which then take a GPU each (half a GPU would let Ray pack two on one)."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    import entropy_fast.distributed as distributed
    import entropy_fast.runs as runs

    @contextmanager
    def gpu_cluster(engine, actors_per_worker):
        assert actors_per_worker == 2  # the cluster is sized for the runs with engines
        yield {"GPU": 2.0, "CPU": 16.0}

    sampling = SamplingSettings(max_new_tokens=4)
    fresh = SimpleNamespace(sampling=sampling, generator="vllm")
    stored = SimpleNamespace(run_id="g")
    monkeypatch.setattr(distributed, "ray_cluster", gpu_cluster)
    monkeypatch.setattr(runs, "plan_profile_runs", lambda *a, **k: [
        (fresh, "m1", None), (fresh, "m2", stored)])
    placed = []
    monkeypatch.setattr(distributed, "_profile_run",
                        lambda placement, *a: placed.append(placement.gpus))
    distributed.profile_on_ray(RayEngine(), ["m1", "m2"], None, Store(tmp_path, create=True),
                               None, sampling, ModelSettings(generator="vllm"), shard=(0, 1),
                               run_id=None, names=None, long_prompts="fail", part_rows=1)
    assert placed == [0.5, 1.0]
