"""The two notebooks of the entropy-profiler 0.2.1 sdist, through the real 0.2.1 and ours.

Only what the issue allows is changed: model ids (tiny random GPT-2 and Llama, the real
SmolLM2), the dataset source (a local MMLU-shaped sample instead of the hub), NUM_SEQUENCES
and plt.show(). Every cell that runs on 0.2.1 must run on ours, and what each cell prints
must agree. The real 0.2.1 runs with its two lens bugs fixed (tests/oracle_notebooks.py),
since its last column, normed twice, changes what the notebooks print (by how much:
docs/migrating-from-0.2.1.md); tests/test_oracle.py checks the unpatched library.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests import oracle

pytest.importorskip("seaborn", reason="the notebooks import seaborn (and pandas): "
                    "pip install seaborn")
SCRIPT = Path(__file__).with_name("oracle_notebooks.py")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _same_numbers(ours: str, theirs: str) -> bool:
    """Equal text, and numbers equal up to two units of their last printed digit."""
    if NUMBER.sub("#", ours) != NUMBER.sub("#", theirs):
        return False
    for mine, seed in zip(NUMBER.findall(ours), NUMBER.findall(theirs), strict=True):
        decimals = len(seed.split(".")[1]) if "." in seed and "e" not in seed else 0
        if abs(float(mine) - float(seed)) > 2 * 10.0 ** -decimals + 1e-6 * abs(float(seed)):
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model_comparison", "seq_tok_analysis"])
def test_notebook_runs_and_prints_what_0_2_1_prints(request, tmp_path, name):
    python = oracle.oracle_python()
    cache = oracle.cache_dir(request.config)
    paths = oracle.notebook_models(cache)
    notebook = oracle.sdist_notebook(python, name)
    spec = oracle.notebook_spec(notebook, paths)
    theirs = json.loads(oracle.run_cached(python, SCRIPT, {**spec, "fix_lens_bugs": True},
                                          cache, [*paths.values(), notebook],
                                          suffix=".json").read_text())
    oracle.run_script(Path(sys.executable), SCRIPT, spec, tmp_path / "ours.json")
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert [c["cell"] for c in ours] == [c["cell"] for c in theirs]
    assert all(c["ok"] for c in theirs), f"a cell fails on 0.2.1 too, check the setup: {theirs}"
    for mine, seed in zip(ours, theirs, strict=True):
        if seed["ok"]:
            assert mine["ok"], f"cell {mine['cell']} runs on 0.2.1 but fails here:\n{mine['error']}"
        assert _same_numbers(mine["stdout"], seed["stdout"]), (
            f"cell {mine['cell']} prints\n{mine['stdout']}\nwhere 0.2.1 prints\n{seed['stdout']}")
