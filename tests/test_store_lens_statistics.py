"""Top tokens, KL to the final layer and the vocabulary in the store: written by a store run,
read back by DuckDB (views, named queries) and by the codec, resumed, and checked.

The numbers the profiler computes are checked against float64 in tests/test_profiler.py;
here DuckDB's view of the files must equal the profiler's own profiles of the same prompts
(up to the fp32 rounding of other batch shapes: 1e-5), and the vocabulary the tokenizer's
own decoding. Read back by the codec, the stored values must be bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from entropy_fast.pipeline import profile_corpus
from entropy_fast.profiler import EntropyProfiler
from entropy_fast.store import Store
from entropy_fast.store.check import check_store
from entropy_fast.store.codec import read_profiles
from entropy_fast.store.sql import ProfileStore
from tests.tiny_models import tiny_tokenizer

TEXTS = ["The capital of France is", "def add(a, b):", "Once upon a time there",
         "1, 2, 3, 4,"]
K = 3


@pytest.fixture(scope="module")
def run(saved_models, tmp_path_factory) -> tuple[Path, dict]:
    """A store with one text run (top tokens and KL, two alphas, bits), and the same
    prompts profiled in memory."""
    folder = saved_models["llama"]
    store = tmp_path_factory.mktemp("lens-store") / "store"
    options = dict(alpha=(1.0, 2.0), top_tokens=K, kl_to_final=True, base=2)
    profile_corpus(folder, TEXTS, store, max_new_tokens=0, part_rows=200, flush_seconds=0,
                   **options)
    profiler = EntropyProfiler(folder, **options)
    profiles = dict(enumerate(profiler.profile_batch(TEXTS, max_new_tokens=0).profiles))
    return store, profiles


def test_top_tokens_view_holds_the_profiles_top_tokens(run):
    store, profiles = run
    with ProfileStore(store) as db:
        rows = db.sql("SELECT prompt_id, pos, layer, rank, token_id, prob FROM top_tokens "
                      "ORDER BY prompt_id, pos, layer, rank", output="numpy")
    for prompt_id, profile in profiles.items():
        mine = rows["prompt_id"] == prompt_id
        n, layers, k = profile.top_tokens.shape
        assert k == K and mine.sum() == n * layers * k
        assert np.array_equal(rows["token_id"][mine].reshape(n, layers, k),
                              profile.top_tokens.numpy())
        np.testing.assert_allclose(rows["prob"][mine].reshape(n, layers, k),
                                   profile.top_probs.numpy(), rtol=0, atol=1e-5)
        assert np.array_equal(rows["layer"][mine].reshape(n, layers, k)[0, :, 0],
                              profile.layer_indices)


def test_kl_column_and_named_query(run):
    store, profiles = run
    with ProfileStore(store) as db:
        kl = db.sql("SELECT prompt_id, pos, layer, kl_to_final FROM entropy WHERE alpha = 1 "
                    "ORDER BY prompt_id, pos, layer", output="numpy")
        per_layer = db.query("kl_to_final", output="numpy")
    stacked = np.concatenate([p.kl_to_final.numpy() for p in profiles.values()])
    np.testing.assert_allclose(kl["kl_to_final"], stacked.reshape(-1), rtol=0, atol=1e-5)
    by_layer = kl["kl_to_final"].astype(np.float64).reshape(-1, len(profiles[0].layer_indices))
    np.testing.assert_allclose(per_layer["mean_kl"], by_layer.mean(0), rtol=1e-9)
    assert per_layer["mean_kl"][-1] == 0.0  # the last layer is the final distribution
    assert list(per_layer["layer"]) == profiles[0].layer_indices


def test_vocab_view_and_top_tokens_query_show_text(run):
    store, profiles = run
    tokenizer = tiny_tokenizer()
    with ProfileStore(store) as db:
        vocab = db.sql("SELECT token_id, text FROM vocab ORDER BY token_id").to_pylist()
        table = db.query("top_tokens", prompt_id=2, max_rank=1).to_pylist()
    assert [v["text"] for v in vocab] == [tokenizer.decode([i]) for i in range(len(vocab))]
    profile = profiles[2]
    assert len(table) == profile.n_tokens * profile.n_layers
    first = table[0]
    assert first["token_id"] == int(profile.top_tokens[0, 0, 0])
    assert first["text"] == tokenizer.decode([first["token_id"]])
    assert first["next_token"] == tokenizer.decode([int(profile.token_ids[0])])


def test_profiles_read_back_with_their_statistics(run):
    store, _ = run
    back = dict(read_profiles(Store(store)))
    with ProfileStore(store) as db:
        top = db.sql("SELECT token_id, prob FROM top_tokens ORDER BY prompt_id, pos, layer, "
                     "rank", output="numpy")
        kl = db.sql("SELECT kl_to_final FROM entropy WHERE alpha = 1 ORDER BY prompt_id, pos, "
                    "layer", output="numpy")
    profiles = [back[i] for i in sorted(back)]
    assert np.array_equal(np.concatenate([p.top_tokens.numpy().reshape(-1) for p in profiles]),
                          top["token_id"])
    assert np.array_equal(np.concatenate([p.top_probs.numpy().reshape(-1) for p in profiles]),
                          top["prob"])
    assert np.array_equal(np.concatenate([p.kl_to_final.numpy().reshape(-1)
                                          for p in profiles]), kl["kl_to_final"])


def test_store_checks_clean_and_a_rerun_has_nothing_to_do(run, saved_models):
    store, _ = run
    assert not check_store(store).problems
    again = profile_corpus(saved_models["llama"], TEXTS, store, max_new_tokens=0,
                           alpha=(1.0, 2.0), top_tokens=K, kl_to_final=True, base=2)
    assert again[0].prompts == 0


def test_runs_without_the_new_statistics_keep_their_ids():
    """top_tokens and kl_to_final joined the identity after stores existed: at their
    defaults they are left out of it, so those stores' runs keep their ids (and resume)."""
    from entropy_fast.settings import LensSettings

    assert LensSettings().identity() == {"alphas": ["1.0"], "layer_stride": 1, "base": None,
                                         "top_token": False, "target_stats": False}
    assert LensSettings(top_tokens=5).identity()["top_tokens"] == 5


def test_cli_profile_prints_kl_and_show_prints_and_plots_top_tokens(saved_models, tmp_path,
                                                                    capsys):
    from PIL import Image

    from tests.cli_runner import run_cli

    (tmp_path / "prompts.txt").write_text("\n".join(TEXTS) + "\n")
    store = str(tmp_path / "store")
    code, out, _ = run_cli(capsys, "profile", saved_models["llama"], "--prompts",
                           str(tmp_path / "prompts.txt"), "--out", store, "--max-new-tokens",
                           "0", "--top-tokens", "5", "--kl-to-final", "--no-plot",
                           "--no-progress")
    assert code == 0
    header = next(line for line in out.splitlines() if line.lstrip().startswith("layer"))
    assert header.split()[-1] == "kl_to_final"
    code, out, _ = run_cli(capsys, "show", store, "--prompt", "1", "--rank", "2", "--plot",
                           str(tmp_path / "lens.png"))
    assert code == 0
    with ProfileStore(store) as db:
        want = db.query("top_tokens", prompt_id=1, max_rank=2).to_pylist()
    lines = [line for line in out.splitlines()[1:] if line.strip() and "plot:" not in line]
    assert len(lines) == len(want) + 1  # the column header, then one line per row
    assert want[0]["text"].strip() in lines[1]
    assert Image.open(tmp_path / "lens.png").size[0] > 500
    code, _, err = run_cli(capsys, "show", store, "--prompt", "99")
    assert code != 0 and "no prompt 99" in err
