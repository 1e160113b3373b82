"""The README's SQL examples, run as written on a store with two Rényi orders, give the
numbers numpy computes from the profiles themselves (one order, layers in order)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from entropy_fast.cli import main
from entropy_fast.pipeline import profile_corpus
from entropy_fast.store import Store
from entropy_fast.store.codec import read_profiles
from entropy_fast.store.sql import ProfileStore
from tests.tiny_models import tiny_model, tiny_tokenizer

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
TEXTS = ["The capital of France is", "def add(a, b):", "Once upon a time there"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    folder = root / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    profile_corpus(str(folder), TEXTS, root / "runs", alpha=(1.0, 2.0), max_new_tokens=0,
                   names=["smollm2-135m"])
    return root / "runs"


def expected_means(store: Path) -> list[float]:
    """Mean Shannon entropy per layer over every token, from the stored profiles."""
    profiles = [p.entropies[1.0].double().numpy() for _, p in read_profiles(Store(store))]
    return list(np.concatenate(profiles).mean(axis=0))


def test_the_readme_cli_query_gives_shannon_means_in_layer_order(store, capsys):
    line = next(line for line in README.splitlines()
                if line.startswith("entropy-fast query") and "SELECT" in line)
    argv = shlex.split(line.replace("runs/", str(store) + "/"))[1:]
    assert main([*argv, "--format", "csv"]) == 0
    rows = [r.split(",") for r in capsys.readouterr().out.strip().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == list(range(len(rows)))
    np.testing.assert_allclose([float(r[1]) for r in rows], expected_means(store), rtol=1e-6)


def test_the_readme_python_sql_gives_shannon_means_in_layer_order(store):
    block = README[README.index("with ProfileStore(\"runs/\") as db:"):]
    sql = "".join(re.findall(r'"([^"]*)"', block[block.index("db.sql("):
                                                 block.index(").to_pylist()")]))
    with ProfileStore(store) as db:
        rows = db.sql(sql).to_pylist()
    assert [r["layer"] for r in rows] == list(range(len(rows)))
    np.testing.assert_allclose([r["mean"] for r in rows], expected_means(store), rtol=1e-6)
