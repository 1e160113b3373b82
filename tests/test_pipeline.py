"""The library pipeline (profile_corpus / generate_corpus) and what a user meets around it:
resumable sharded runs from Python, over-long prompts, model identity, units, progress,
and errors that name flags in the CLI."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from entropy_fast.cli import main
from entropy_fast.corpus import Corpus
from entropy_fast.errors import ConfigError
from entropy_fast.models import ModelNotFoundError, identify
from entropy_fast.pipeline import generate_corpus, profile_corpus
from entropy_fast.settings import LensSettings, SamplingSettings
from entropy_fast.store import Store
from entropy_fast.store.check import check_store
from entropy_fast.store.codec import read_profiles
from entropy_fast.store.sql import ProfileStore
from tests.reference import entropy_from_logits
from tests.tiny_models import MAX_POSITIONS, tiny_model, tiny_tokenizer

TEXTS = ["The capital of France is", "def add(a, b):", "Once upon a time there",
         "1, 2, 3, 4,", "Why is the sky blue?", "Water boils at"]


@pytest.fixture(scope="module")
def folder(saved_models) -> Path:
    return Path(saved_models["llama"])


def test_a_sharded_two_model_run_from_python_resumes_and_is_exact(folder, tmp_path):
    gpt2 = tmp_path / "tiny-gpt2"
    tiny_model("gpt2", seed=1).save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    store = tmp_path / "store"
    options = dict(alpha=(1.0, 2.0), max_new_tokens=0, flush_seconds=0)
    seen = []
    for shard in (0, 1):
        results = profile_corpus([str(folder), str(gpt2)], TEXTS, store, shard=(shard, 2),
                                 on_progress=lambda *a: seen.append(a), **options)
        assert [r.prompts for r in results] == [3, 3] and all(r.tokens for r in results)
    again = profile_corpus([str(folder), str(gpt2)], TEXTS, store, shard=(0, 2), **options)
    assert [(r.prompts, r.done_before) for r in again] == [(0, 3), (0, 3)]
    assert seen and seen[-1][1:] == (3, seen[-1][2], 3)
    # Each run reports (0 prompts, 0 tokens) before its first batch: a bar's clock starts
    # with the run (2 shards x 2 models), not after one batch (absurd rates).
    assert [event[1:] for event in seen if event[1] == 0] == [(0, 0, 3)] * 4
    assert check_store(store).problems == []
    # Independent reference: HF's own logits at the last layer, float64 entropies.
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    profiles = dict(read_profiles(Store(store), str(folder.resolve())))
    assert sorted(profiles) == list(range(len(TEXTS)))
    for prompt_id, text in enumerate(TEXTS):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        expected = entropy_from_logits(model(input_ids=ids).logits[0, :-1], (1.0, 2.0))
        got = torch.stack([profiles[prompt_id].entropies[a][:, -1] for a in (1.0, 2.0)], 1)
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


def test_base_and_sampling_settings_round_trip_through_the_store(folder, tmp_path):
    store = tmp_path / "store"
    lens, sampling = LensSettings(base=2.0), SamplingSettings(3, do_sample=True, top_k=5,
                                                               seed=7, temperature=0.8)
    (bits,) = profile_corpus(str(folder), TEXTS[:2], store, lens=lens, sampling=sampling)
    (nats,) = profile_corpus(str(folder), TEXTS[:2], store, sampling=sampling)
    record = Store(store).run(bits.info.run_id)
    assert record.lens.base == 2.0 and record.sampling == sampling
    in_bits = dict(read_profiles(Store(store), run_id=bits.info.run_id))
    in_nats = dict(read_profiles(Store(store), run_id=nats.info.run_id))
    assert in_bits[0].metadata["base"] == 2.0 and in_bits[0].metadata["top_k"] == 5
    torch.testing.assert_close(in_bits[0].entropy * math.log(2), in_nats[0].entropy)
    with ProfileStore(store) as db:
        row = db.sql("SELECT base, top_k, seed, temperature FROM runs WHERE run_id = $r",
                     {"r": bits.info.run_id}).to_pylist()[0]
    assert row == {"base": 2.0, "top_k": 5, "seed": 7, "temperature": 0.8}


def test_every_settings_field_is_a_runs_column(folder, tmp_path):
    store = tmp_path / "store"
    profile_corpus(str(folder), TEXTS[:1], store, max_new_tokens=0)
    with ProfileStore(store) as db:
        columns = set(db.sql("SELECT * FROM runs").column_names)
    for cls in (LensSettings, SamplingSettings):
        assert set(cls.field_names()) <= columns


@pytest.mark.parametrize("policy, rows", [("skip", None), ("truncate_left", -1),
                                          ("truncate_right", 0)])
def test_over_long_prompts_are_skipped_or_truncated(folder, tmp_path, policy, rows):
    long = "x" * (MAX_POSITIONS + 40)
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("\n".join([TEXTS[0], long, TEXTS[1]]))
    (result,) = profile_corpus(str(folder), corpus_file, tmp_path / "s", max_new_tokens=0,
                               long_prompts=policy)
    profiles = dict(read_profiles(Store(tmp_path / "s")))
    if rows is None:
        assert result.skipped == (1,) and sorted(profiles) == [0, 2]
    else:
        assert sorted(profiles) == [0, 1, 2] and profiles[1].n_tokens == MAX_POSITIONS - 1
        ids = tiny_tokenizer()(long)["input_ids"]
        kept = ids[-MAX_POSITIONS:] if rows == -1 else ids[:MAX_POSITIONS]
        assert profiles[1].metadata["prompt_token_ids"] == kept


def test_an_over_long_prompt_fails_before_any_work_naming_its_line(folder, tmp_path, capsys):
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("\n".join([TEXTS[0], "", "y" * 300]))
    with pytest.raises(ConfigError, match=r"c\.txt line 3 .* 300 tokens.* window of 128"):
        profile_corpus(str(folder), corpus_file, tmp_path / "s", max_new_tokens=0)
    assert not (tmp_path / "s" / "runs").exists()  # nothing registered, no model loaded
    code = main(["profile", str(folder), "--prompts", str(corpus_file), "--max-new-tokens",
                 "0", "--no-plot"])
    err = capsys.readouterr().err
    assert code == 1 and "--long-prompts skip" in err and "line 3" in err


def test_chat_template_without_one_fails_before_any_work_saying_what_to_do(folder, tmp_path,
                                                                          capsys):
    """The tiny tokenizer has no chat template: refused before a run is registered, from
    Python (the profiler too) and the CLI (naming the flag)."""
    with pytest.raises(ConfigError, match=r"has no chat template.*drop chat_template"):
        profile_corpus(str(folder), TEXTS, tmp_path / "s", max_new_tokens=0,
                       chat_template=True)
    assert not (tmp_path / "s" / "runs").exists()
    with pytest.raises(ConfigError, match="has no chat template"):
        generate_corpus(str(folder), TEXTS, tmp_path / "g", max_new_tokens=2,
                        chat_template=True)
    assert not (tmp_path / "g" / "generations").exists()
    from entropy_fast.profiler import EntropyProfiler

    with pytest.raises(ConfigError, match="has no chat template"):
        EntropyProfiler(str(folder)).profile_text(TEXTS[0], chat_template=True)
    code = main(["profile", str(folder), "--chat-template", "--max-new-tokens", "0",
                 "--no-plot"])
    err = capsys.readouterr().err
    assert code == 1 and "no chat template" in err and "drop --chat-template" in err


def test_a_setting_added_later_keeps_the_run_ids_of_runs_without_it():
    """chat_template enters a run's identity only when set: stores made before it existed
    find their runs again."""
    assert "chat_template" not in SamplingSettings(max_new_tokens=0).identity()
    assert SamplingSettings(max_new_tokens=0, chat_template=True).identity()[
        "chat_template"] is True


def test_a_local_model_is_one_model_however_its_path_is_written(folder, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(folder.parent)
    spellings = [str(folder), f"./{folder.name}", folder.name, f"{folder.parent}/../"
                 f"{folder.parent.name}/{folder.name}"]
    assert {identify(s).label for s in spellings} == {str(folder.resolve())}
    store = tmp_path / "s"
    for spelling in spellings:
        profile_corpus(spelling, TEXTS[:2], store, max_new_tokens=0)
    assert len(Store(store).runs()) == 1
    (named,) = profile_corpus(spelling, TEXTS[:2], store, max_new_tokens=0, names=["tiny"])
    assert named.info.model == "tiny" and len(Store(store).runs()) == 2


def test_a_mistyped_model_name_fails_fast_with_a_suggestion(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="did you mean 'smollm2-135m'"):
        profile_corpus("smollm2-153m", TEXTS[:1], tmp_path / "s")
    assert time.monotonic() - started < 10


def test_generation_stage_then_profile_from_python(folder, tmp_path):
    store = tmp_path / "s"
    (generated,) = generate_corpus(str(folder), TEXTS, store, max_new_tokens=3)
    assert generated.prompts == len(TEXTS) and generated.tokens > 0
    (profiled,) = profile_corpus(str(folder), TEXTS, store, max_new_tokens=3)
    assert profiled.generation == generated.info.run_id and profiled.prompts == len(TEXTS)
    with pytest.raises(ConfigError, match="max_new_tokens >= 1"):
        generate_corpus(str(folder), TEXTS, store, max_new_tokens=0)


@pytest.mark.parametrize("seconds_per_prompt", [0.001, 0.05, 0.7, 3.0])
def test_waves_commit_at_least_every_flush_seconds(monkeypatch, seconds_per_prompt):
    """Waves are sized to half of flush_seconds and commit when half has passed, so a kill
    loses at most flush_seconds of work, whatever a prompt costs (deterministic clock)."""
    from entropy_fast import pipeline

    clock = [0.0]
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: clock[0])

    class Profiler:  # costs seconds_per_prompt of the fake clock per prompt
        def prompt_id_batches(self, ids, sampling, indices, on_progress):
            for index in indices:  # a batch of one prompt
                clock[0] += seconds_per_prompt
                on_progress(1, 3)
                yield SimpleNamespace(sequences=[SimpleNamespace(index=index)])

    commits: list[float] = []

    work = {i: [1, 2, 3] for i in range(400)}
    waves = pipeline._profile_waves(Profiler(), work, SamplingSettings(0), 10.0,
                                    lambda: commits.append(clock[0]), lambda *counts: None)
    done = [i for _, (i,) in waves]
    assert done == list(work)
    # uncommitted work at any moment: between commits, and before the final one at close
    marks = [0.0, *commits, clock[0]]
    gaps = [b - a for a, b in pairwise(marks)]
    slack = seconds_per_prompt  # a single prompt cannot be split
    assert max(gaps) <= 10.0 + slack, gaps


def test_cli_errors_name_flags_and_help_shows_defaults(folder, capsys):
    assert main(["profile", str(folder), "--layer-stride", "0", "--no-plot"]) == 1
    assert "--layer-stride must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["profile", str(folder), "--max-new-tokens", "-5", "--no-plot"]) == 1
    assert "--max-new-tokens must be an integer >= 0, got -5" in capsys.readouterr().err
    assert main(["profile", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # as one line, however wrapped
    for flag in ("--top-k", "--temperature", "--base", "--top-token", "--long-prompts",
                 "--name", "--batch-tokens"):
        assert flag in help_text, flag
    assert "(default: 32)" in help_text and "(default: 8192)" in help_text


def test_a_read_only_store_is_one_line(folder, tmp_path, capsys):
    store = tmp_path / "ro"
    Store(store, create=True)
    os.chmod(store, 0o555)
    try:
        if os.access(store, os.W_OK):
            pytest.skip("running as a user who can write anyway (root)")
        code = main(["profile", str(folder), "--out", str(store), "--max-new-tokens", "0",
                     "--no-plot"])
        err = capsys.readouterr().err
        assert code == 1 and "cannot write into the store" in err and ".tmp" not in err
    finally:
        os.chmod(store, 0o755)


def test_a_locked_run_is_refused_before_the_model_loads(folder, tmp_path, monkeypatch,
                                                        capsys):
    from tests.tiny_models import forbid_hf_weights

    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("\n".join(TEXTS))
    store = tmp_path / "s"
    (result,) = profile_corpus(str(folder), corpus_file, store, max_new_tokens=0,
                               shard=(0, 2))
    holder = Store(store).writer(replace(result.info, shard=1))  # another process's writer
    try:
        forbid_hf_weights(monkeypatch)
        code = main(["profile", str(folder), "--prompts", str(corpus_file), "--out",
                     str(store), "--max-new-tokens", "0", "--shard", "1/2", "--no-plot"])
        err = capsys.readouterr().err
        assert code == 1 and "another process" in err and "weights were loaded" not in err
    finally:
        holder.close()


def test_plot_path_gets_its_png_suffix_and_is_printed(folder, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", str(folder), "--max-new-tokens", "0", "--prompts",
                 _write(tmp_path, TEXTS[:2]), "--plot", "xplot", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "plot: xplot.png" in out and (tmp_path / "xplot.png").read_bytes()[:4] == b"\x89PNG"


def _write(tmp_path, texts) -> str:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts))
    return str(path)


def test_compare_notes_runs_made_differently_and_refuses_stores_without_complete_runs(
        folder, tmp_path, capsys):
    store = tmp_path / "s"
    profile_corpus(str(folder), TEXTS[:3], store, max_new_tokens=0, names=["a"])
    profile_corpus(str(folder), TEXTS[:3], store, max_new_tokens=2, names=["b"])
    assert main(["compare", str(store), "--no-plot"]) == 0
    assert "note: these entries differ in mode:" in capsys.readouterr().err
    failed = tmp_path / "failed"
    Store(failed, create=True)
    writer = Store(failed).writer(_record(folder))
    writer.close("RuntimeError: boom")
    assert main(["compare", str(failed), "--no-plot"]) == 1
    assert "only complete runs" in capsys.readouterr().err


def _record(folder):
    from entropy_fast.store import RunInfo

    corpus = Corpus.from_texts(TEXTS)
    return RunInfo(model="x", corpus=corpus.path, corpus_sha256=corpus.fingerprint,
                   n_prompts=len(corpus), lens=LensSettings(),
                   sampling=SamplingSettings(0), dtype="float32", generator="hf")


def test_pandas_output_without_pandas_is_a_clear_error(folder, tmp_path):
    import importlib.util

    from entropy_fast.errors import MissingDependencyError

    profile_corpus(str(folder), TEXTS[:1], tmp_path / "s", max_new_tokens=0)
    with ProfileStore(tmp_path / "s") as db:
        if importlib.util.find_spec("pandas") is not None:
            assert len(db.sql("SELECT 1 AS x", output="pandas")) == 1
        else:
            with pytest.raises(MissingDependencyError, match="pip install pandas"):
                db.sql("SELECT 1 AS x", output="pandas")


def test_an_unwritable_store_is_one_line_even_for_root(folder, tmp_path, monkeypatch, capsys):
    """What a read-only --out gives a normal user, simulated where root could write."""
    from entropy_fast.store import writer

    real_open = os.open

    def refuse(path, flags, *args):
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    Store(tmp_path / "ro", create=True)
    monkeypatch.setattr(writer.os, "open", refuse)
    code = main(["profile", str(folder), "--out", str(tmp_path / "ro"), "--max-new-tokens",
                 "0", "--no-plot"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot write into the store" in err and ".tmp" not in err
    assert len(err.strip().splitlines()) == 1


def test_ctrl_c_says_what_was_kept(folder, tmp_path, monkeypatch, capsys):
    from entropy_fast import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_write_batches", interrupted)
    argv = ["profile", str(folder), "--max-new-tokens", "0", "--no-plot"]
    assert main(argv) == 130
    assert "nothing was kept (no --out STORE)" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "s")]) == 130
    assert "every committed part is kept" in capsys.readouterr().err
    assert Store(tmp_path / "s").runs()[0].status == "interrupted"


def test_summary_and_plot_say_how_they_average(folder, tmp_path, capsys):
    assert main(["profile", str(folder), "--max-new-tokens", "0", "--prompts",
                 _write(tmp_path, TEXTS[:3]), "--plot", str(tmp_path / "p.png"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "each token weighs the same" in out and "0 = embeddings, 3 = last block" in out


def test_a_nearly_constant_profile_is_plotted_at_its_level():
    from entropy_fast.viz import plot_mean_curves

    figure = plot_mean_curves({"flat": ([0, 1, 2], [7.50001, 7.50002, 7.50003], [0, 0, 0])})
    figure.canvas.draw()
    axis = figure.axes[0].yaxis
    assert axis.get_major_formatter().get_offset() == ""
    assert all(7.4 < float(t.get_text().replace("−", "-")) < 7.6
               for t in axis.get_ticklabels() if t.get_text())


@pytest.mark.parametrize("stage", ["profile", "generation"])
def test_a_run_killed_after_its_last_commit_is_recorded_complete_by_the_rerun(
        folder, tmp_path, stage, caplog):
    """A kill between the last commit and the final record leaves the record "running"
    (registration writes it so); the rerun has nothing to profile but must finish it."""
    import json

    from entropy_fast.store import GENERATION, PROFILE

    store, kind = tmp_path / "store", PROFILE if stage == "profile" else GENERATION
    run = generate_corpus if stage == "generation" else profile_corpus
    (done,) = run(str(folder), TEXTS[:3], store, max_new_tokens=2)
    info = done.info
    path = Store(store).record_path(kind, info.run_id, info.shard_key)
    record = json.loads(path.read_text())
    assert record["status"] == "complete"
    path.write_text(json.dumps({**record, "status": "running"}))
    with caplog.at_level("INFO", logger="entropy_fast"):
        (again,) = run(str(folder), TEXTS[:3], store, max_new_tokens=2)
    assert (again.prompts, again.done_before) == (0, 3)
    assert Store(store).record(kind, info.run_id, info.shard_key).status == "complete"
    assert "recorded it complete" in caplog.text
    assert check_store(store).problems == []
