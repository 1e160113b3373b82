"""The entropy-fast CLI, in-process through main(argv), and resume after a real SIGKILL."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest
import torch

from entropy_fast.cli import COMMANDS, main
from entropy_fast.store import Store
from entropy_fast.store.check import check_store
from entropy_fast.store.codec import read_profiles
from entropy_fast.store.sql import ProfileStore
from tests.cli_runner import run_cli
from tests.test_viz import title_inside_figure
from tests.tiny_models import forbid_hf_weights

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time there",
           "1, 2, 3, 4,", "Why is the sky blue?"]
PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def models(saved_models) -> dict[str, str]:
    return saved_models


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def test_profile_store_and_every_command(models, corpus, tmp_path, capsys):
    store, plot = str(tmp_path / "store"), tmp_path / "profile.png"
    argv = ["profile", models["llama"], models["gpt2"], "--prompts", corpus, "--out", store,
            "--max-new-tokens", "3", "--alpha", "1", "--alpha", "2", "--plot", str(plot),
            "--no-progress"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert out.count("| 5 prompts, ") == 2 and "alpha=1 (nats) | 4 layers (" in out
    assert "layer    mean     std" in out
    assert plot.read_bytes()[:4] == PNG
    code, out, err = run_cli(capsys, *argv)  # complete: nothing redone
    assert code == 0 and err.count("nothing to do") == 2

    with ProfileStore(store) as db:
        rows = db.sql("SELECT model, count(DISTINCT prompt_id) AS n FROM entropy "
                      "GROUP BY ALL ORDER BY model").to_pylist()
    assert [r["n"] for r in rows] == [5, 5]
    stored = dict(read_profiles(Store(store), models["llama"]))
    from entropy_fast.profiler import EntropyProfiler

    direct = EntropyProfiler(models["llama"], alpha=(1.0, 2.0)).profile_text(PROMPTS[2], 3)
    torch.testing.assert_close(stored[2].entropies[2.0], direct.entropies[2.0],
                               atol=1e-4, rtol=1e-4)
    assert stored[2].token_ids.tolist() == direct.token_ids.tolist()

    code, out, _ = run_cli(capsys, "info", store)
    assert code == 0 and out.count("complete") == 2 and "5/5" in out
    code, out, _ = run_cli(capsys, "check", store)
    assert code == 0 and out.strip().endswith("OK")
    code, out, _ = run_cli(capsys, "query", store, "mean_profile", "--param", "alpha=2",
                           "--format", "json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 8 and {r["alpha"] for r in rows} == {2.0}
    code, out, _ = run_cli(capsys, "query", store, "SELECT count(*) AS n FROM entropy "
                           "WHERE layer = $layer", "--param", "layer=0", "--format", "csv")
    assert code == 0 and out.splitlines()[0] == "n"
    target = tmp_path / "jsd.parquet"
    code, _, _ = run_cli(capsys, "query", store, "layer_jsd", "--param",
                         f"model_a={models['llama']}", "--param", f"model_b={models['gpt2']}",
                         "--format", "parquet", "--output", str(target))
    assert code == 0 and pq.read_table(target).num_rows == 4
    code, out, _ = run_cli(capsys, "compare", store, "--metric", "wasserstein", "--plot",
                           str(tmp_path / "compare.png"))
    assert code == 0 and "wasserstein distance" in out and out.count("0.0000") == 2
    assert (tmp_path / "compare.png").read_bytes()[:4] == PNG
    code, out, _ = run_cli(capsys, "queries")
    assert code == 0 and "layer_wasserstein:" in out and "model_a (VARCHAR, required)" in out


def test_profile_without_a_store(models, corpus, tmp_path, capsys):
    code, out, err = run_cli(capsys, "profile", models["gpt2"], "--prompts", corpus,
                             "--max-new-tokens", "0", "--no-plot", "--layer-stride", "2")
    assert code == 0, err
    assert "(text mode)" in out and "| 3 layers (" in out and "store:" not in out


@pytest.mark.parametrize("command", ["profile", "query", "compare", "info", "check",
                                     "queries"])
def test_help(command, capsys):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "usage: entropy-fast" in out


def user_errors(models, tmp_path) -> list[tuple[list[str], str]]:
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    Store(tmp_path / "store", create=True)
    llama = models["llama"]
    return [
        (["profile", llama, "--prompts", str(tmp_path / "none.txt")], "corpus file not found"),
        (["profile", llama, "--prompts", str(tmp_path / "empty.txt")], "has no prompts"),
        (["profile", llama, "--prompts", str(tmp_path / "bad.jsonl")], "line 2: not valid JSON"),
        (["profile", str(tmp_path / "no-model"), "--max-new-tokens", "0"], "not found"),
        (["profile", llama, "--shard", "3/2"], "--shard 3/2"),
        (["profile", llama, "--alpha", "-1"], "alpha"),
        (["profile", llama, "--out", str(tmp_path / "plain")], "not an entropy-fast store"),
        (["query", str(tmp_path / "plain"), "mean_profile"], "not an entropy-fast store"),
        (["query", str(tmp_path / "store"), "no_such_query"], "unknown query"),
        (["query", str(tmp_path / "store"), "mean_profile", "--param", "x=1"],
         "no parameter x; its parameters: model, run_id, alpha"),  # not --run-id, --alpha
        (["query", str(tmp_path / "store"), "layer_jsd", "--param", "model_b=m"],
         "needs model_a; pass model_a=... (on the command line: --param model_a=...)"),
        (["query", str(tmp_path / "store"), "mean_profile", "--param", "model=m"],
         "model 'm' (parameter model) is not in the store; models in the store: none"),
        (["query", str(tmp_path / "store"), "mean_profile", "--param", "alpha=high"],
         "alpha must be DOUBLE"),
        (["query", str(tmp_path / "store"), "SELECT * FROM nowhere"], "nowhere"),
        (["query", str(tmp_path / "store"), "mean_profile", "--format", "parquet"],
         "needs --output"),
        (["info", str(tmp_path / "nothing")], "does not exist"),
        (["check", str(tmp_path / "plain")], "not an entropy-fast store"),
        (["compare", str(tmp_path / "store")], "the store has no profile run"),
    ]


def test_user_errors_are_one_line(models, tmp_path, capsys):
    for argv, message in user_errors(models, tmp_path):
        extra = ["--no-plot"] if argv[0] == "profile" else []
        code, _, err = run_cli(capsys, *argv, *extra)
        assert code != 0, argv
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert message in err, (argv, err)
    assert not any((tmp_path / "plain").glob("*.json"))  # nothing written into a non-store


def test_vllm_generator_without_vllm_is_a_clear_error(models, corpus, capsys):
    from entropy_fast.vllm_generation import vllm_available

    if vllm_available():
        pytest.skip("vllm is installed here")
    code, _, err = run_cli(capsys, "profile", models["llama"], "--prompts", corpus,
                           "--generator", "vllm")
    assert code == 1 and "needs vLLM" in err and len(err.strip().splitlines()) == 1


def test_resume_after_sigkill(models, tmp_path, capsys):
    """A run killed with SIGKILL mid-way resumes without duplicates, gaps or redone work."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(f"{PROMPTS[i % 5]} number {i}" for i in range(80)))
    store = tmp_path / "store"
    argv = ["profile", models["llama"], "--prompts", str(corpus), "--out", str(store),
            "--max-new-tokens", "0", "--batch-tokens", "400", "--part-rows", "1",
            "--flush-seconds", "0", "--no-plot", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "entropy_fast.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(store.glob("manifest/*/*.json"))) < 5 and proc.poll() is None:
        assert time.monotonic() < deadline, "no part committed in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = {e.entropy_file: (store / e.entropy_file).stat().st_mtime_ns
              for e in Store(store).manifest()}
    done_before = sum(e.n_prompts for e in Store(store).manifest())
    assert 5 <= done_before < 80

    code, _, err = run_cli(capsys, *argv)  # the same command again, in-process
    assert code == 0, err
    assert f"{done_before} of 80 prompts already committed" in err
    entries = Store(store).manifest()
    assert all((store / f).stat().st_mtime_ns == t for f, t in before.items())  # not redone
    assert sorted(i for e in entries for i in e.prompt_ids) == list(range(80))
    assert check_store(store).problems == []
    assert Store(store).runs()[0].status == "complete"


def test_main_job_defaults():
    """`entropy-fast profile` alone: the built-in model over the bundled sample corpus."""
    from entropy_fast.cli import build_parser
    from entropy_fast.models import DEFAULT_MODEL

    args = build_parser().parse_args(["profile"])
    assert args.models == [DEFAULT_MODEL] and args.prompts is None
    assert args.plot == "entropy_profile.png" and args.out is None and args.alphas is None


@pytest.mark.slow
def test_main_job_with_the_real_model(tmp_path, capsys):
    """The README's main job on the real SmolLM2, on three prompts to stay short."""
    corpus = tmp_path / "three.txt"
    corpus.write_text("\n".join(PROMPTS[:3]))
    plot = tmp_path / "main.png"
    code, out, err = run_cli(capsys, "profile", "--prompts", str(corpus), "--max-new-tokens",
                             "4", "--plot", str(plot), "--no-progress")
    assert code == 0, err
    assert "smollm2-135m | run " in out and "| 31 layers (" in out
    assert plot.read_bytes()[:4] == PNG


def _snapshot(root) -> dict[str, tuple[int, int]]:
    """Every file of a store (locks and records included): size and mtime."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_unfinished_generation_stage_leaves_the_store_untouched(models, corpus, tmp_path,
                                                                monkeypatch, capsys):
    """`profile` over an incomplete generation stage stops before it loads or writes anything."""
    store = tmp_path / "store"
    common = ["--prompts", corpus, "--out", str(store), "--no-progress"]
    code, _, err = run_cli(capsys, "profile", models["llama"], *common, "--max-new-tokens",
                           "0", "--no-plot")  # an earlier, committed run
    assert code == 0, err
    generation = [*common, "--max-new-tokens", "2"]
    code, _, err = run_cli(capsys, "generate", models["llama"], *generation, "--shard", "0/2")
    assert code == 0, err
    before, (committed,) = _snapshot(store), Store(store).runs()
    _, info_before, _ = run_cli(capsys, "info", str(store))

    from entropy_fast import profiler

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a run that cannot start")

    monkeypatch.setattr(profiler, "EntropyProfiler", no_model)
    # gpt2 could run, but it comes first: no run starts when any of them cannot.
    code, _, err = run_cli(capsys, "profile", models["gpt2"], models["llama"], *generation,
                           "--no-plot")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "lacks 2 of the prompts to profile" in err
    assert "run `entropy-fast generate` again" in err and "to finish it" in err
    assert _snapshot(store) == before  # no record, lock, manifest entry or part written
    assert [r.to_json() for r in Store(store).runs()] == [committed.to_json()]
    _, info_after, _ = run_cli(capsys, "info", str(store))
    assert info_after == info_before and "running" not in info_after
    assert "failed" not in info_after

    monkeypatch.undo()  # finish the stage as the message says; then the run starts
    code, _, err = run_cli(capsys, "generate", models["llama"], *generation, "--shard", "1/2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "profile", models["llama"], *generation, "--no-plot")
    assert code == 0, err
    assert "profiling the continuations of generation" in err
    assert sorted(r.status for r in Store(store).runs()) == ["complete", "complete"]


class FakeEngine:
    """Stands in for `VllmGenerator` where vLLM is not installed: fixed continuations."""

    name = "vllm"
    made: ClassVar[list[tuple[str, str, dict]]] = []

    def __init__(self, model: str, dtype: str = "auto", **options) -> None:
        FakeEngine.made.append((model, dtype, options))
        self.closed = False

    def generate(self, prompts, sampling):
        return [[5 + len(p) % 7, 6][: sampling.max_new_tokens] for p in prompts]

    def close(self) -> None:
        self.closed = True


def test_generate_with_vllm_loads_no_hf_weights(models, corpus, tmp_path, monkeypatch,
                                                 capsys):
    """`generate --generator vllm`: tokenizer and config only; the engine has the weights."""
    from transformers import AutoTokenizer

    from entropy_fast import vllm_generation

    monkeypatch.setattr(vllm_generation, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_generation, "VllmGenerator", FakeEngine)
    FakeEngine.made = []
    store = str(tmp_path / "store")
    common = [models["llama"], "--prompts", corpus, "--max-new-tokens", "2", "--generator",
              "vllm", "--dtype", "float32", "--out", store, "--no-progress"]
    with monkeypatch.context() as patch:
        forbid_hf_weights(patch)
        code, _, err = run_cli(capsys, "generate", *common)
    assert code == 0, err
    assert FakeEngine.made == [(models["llama"], "float32", {})]  # no GPU share off-CUDA
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    with ProfileStore(store) as db:
        rows = db.sql("SELECT text, prompt_token_ids, continuation_token_ids, generator "
                      "FROM continuations ORDER BY prompt_id").to_pylist()
    assert [r["prompt_token_ids"] for r in rows] == [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = [[5 + len(r["prompt_token_ids"]) % 7, 6] for r in rows]
    assert [r["continuation_token_ids"] for r in rows] == expected
    assert {r["generator"] for r in rows} == {"vllm"}

    # profile with the same settings profiles those ids with the HF model; no engine starts
    code, _, err = run_cli(capsys, "profile", *common, "--no-plot")
    assert code == 0, err
    assert "profiling the continuations of generation" in err and len(FakeEngine.made) == 1
    profiles = dict(read_profiles(Store(store), models["llama"]))
    assert [profiles[i].token_ids.tolist() for i in range(len(PROMPTS))] == expected


def test_vllm_alone_on_the_gpu_takes_most_of_it(models, monkeypatch):
    from entropy_fast import vllm_generation

    monkeypatch.setattr(vllm_generation, "VllmGenerator", FakeEngine)
    monkeypatch.setattr(vllm_generation, "_cuda_available", lambda: True)
    monkeypatch.setattr(vllm_generation, "_share_of_free_gpu_memory", lambda share: share / 2)
    FakeEngine.made = []
    forbid_hf_weights(monkeypatch)
    with vllm_generation.VllmGenerationModel(models["gpt2"], "bfloat16") as loaded:
        engine = loaded.generator
        assert loaded.context_length == loaded.config.n_positions
        assert loaded.tokenizer("ab")["input_ids"]
    assert engine.closed and loaded.generator is None
    assert FakeEngine.made == [(models["gpt2"], "bfloat16", {"gpu_memory_utilization": 0.45})]
    vllm_generation.VllmGenerationModel(models["gpt2"], "float32",
                                        gpu_memory_utilization=0.3).close()
    assert FakeEngine.made[-1][2] == {"gpu_memory_utilization": 0.3}  # the caller's wins


@pytest.fixture(scope="module")
def two_models(models, tmp_path_factory) -> str:
    """A store with a text-mode run of each tiny model (made once: tests copy it to damage)."""
    root = tmp_path_factory.mktemp("two-models")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    store = str(root / "store")
    assert main(["profile", models["llama"], models["gpt2"], "--prompts",
                 str(root / "prompts.txt"), "--out", store, "--max-new-tokens", "0",
                 "--no-plot", "--no-progress"]) == 0
    return store


def test_a_damaged_store_says_so_in_one_clean_line(two_models, models, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(two_models, store)
    entry = next(e for e in Store(store).manifest() if e.model == models["llama"])
    with open(store / entry.entropy_file, "ab") as part:
        part.write(b"garbage")
    for argv in (["query", str(store), "SELECT DISTINCT model FROM entropy"],
                 ["query", str(store), "mean_profile"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 0 and len(err.strip().splitlines()) == 1, (argv, err)
        assert f"{entry.run_id} ({models['llama']})" in err and "check --repair" in err
        assert "Warning" not in err and ".py" not in err
    # a Python user who set up no logging sees the same line (logging's last resort)
    script = f"from entropy_fast.store.sql import ProfileStore; ProfileStore({str(store)!r})"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, check=True)
    assert done.stderr.strip().splitlines() == [err.strip()]


def test_query_names_a_model_or_run_the_store_lacks(two_models, models, capsys):
    runs = sorted((r.run_id, r.model) for r in Store(two_models).runs())
    for param, listed in ((f"model={models['llama']}x", ", ".join(sorted(m for _, m in runs))),
                          ("run_id=nope", ", ".join(f"{r} ({m})" for r, m in runs))):
        code, out, err = run_cli(capsys, "query", two_models, "mean_profile", "--param", param)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
        assert "is not in the store" in err and err.strip().endswith(listed), err
    code, out, _ = run_cli(capsys, "query", two_models, "mean_profile", "--param",
                           f"model={models['llama']}")
    assert code == 0 and "(no rows)" not in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_each_default_once(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    for line in out.lower().splitlines():
        assert line.count("default") <= 1, line
        assert not re.search(r"\(default: (none|false|\[\])\)", line), line


def test_every_plot_keeps_its_title_and_each_model_its_colour(two_models, models, tmp_path,
                                                              capsys, monkeypatch):
    """compare draws both models, profile one of them: the same colour, whole titles."""
    from entropy_fast import viz

    drawn: list[Any] = []

    def save(figure: Any, path: Any) -> Any:
        drawn.append(figure)
        return save_figure(figure, path)

    save_figure = viz.save_figure
    monkeypatch.setattr(viz, "save_figure", save)
    code, _, err = run_cli(capsys, "compare", two_models, "--plot", str(tmp_path / "c.png"))
    assert code == 0, err
    corpus = str(Path(two_models).parent / "prompts.txt")  # the run is there: nothing to do
    code, _, err = run_cli(capsys, "profile", models["llama"], "--prompts", corpus, "--out",
                           two_models, "--max-new-tokens", "0", "--no-progress", "--plot",
                           str(tmp_path / "p.png"))
    assert code == 0, err
    colors = [{line.get_label().split(" (")[0]: line.get_color()
               for line in figure.axes[0].get_lines()} for figure in drawn]
    assert len(colors[0]) == 2 and colors[1] == {models["llama"]: colors[0][models["llama"]]}
    assert all(title_inside_figure(figure) for figure in drawn)
