"""The package's layout: what importing costs, and which tree kernels/ and queries/ come from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python(code: str, cwd: Path, pythonpath: Path | None = None) -> str:
    """Run `code` in a fresh interpreter; its stdout, stripped."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("module", ["entropy_fast", "entropy_fast.cli", "entropy_fast.store",
                                    "entropy_fast.store.sql", "entropy_fast.store.check",
                                    "entropy_fast.store.writer", "entropy_fast.settings",
                                    "entropy_fast.distributed"])
def test_light_modules_do_not_import_torch(module, tmp_path):
    heavy = python(f"import sys, {module}; print(sorted(m for m in ('torch', 'scipy', "
                   "'matplotlib', 'transformers', 'ray') if m in sys.modules))", tmp_path)
    assert heavy == "[]"


def test_public_names_load_on_first_use(tmp_path):
    out = python("import sys, entropy_fast as ef; before = 'torch' in sys.modules; "
                 "ef.EntropyProfile; print(before, 'torch' in sys.modules, "
                 "set(ef.__all__) <= set(dir(ef)))", tmp_path)
    assert out == "False True True"


def test_a_clone_imports_its_own_kernels_and_queries(tmp_path):
    """A second checkout on PYTHONPATH must not import the installed tree's kernel or SQL."""
    clone = tmp_path / "clone"
    for part in ("entropy_fast", "kernels", "queries"):
        shutil.copytree(ROOT / part, clone / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    marker = "-- this clone's own SQL"
    (clone / "queries" / "mean_profile.sql").write_text(
        (ROOT / "queries" / "mean_profile.sql").read_text() + marker + "\n")
    out = python("import entropy_fast.kernels as k, entropy_fast.queries as q; "
                 "from importlib.resources import files; "
                 "print(k.__path__[0]); print(q.__path__[0]); "
                 "print(files('entropy_fast.queries').joinpath('mean_profile.sql')"
                 ".read_text().splitlines()[-1])", clone, pythonpath=clone)
    kernels, queries, last_line = out.splitlines()
    assert Path(kernels).resolve() == (clone / "kernels").resolve()
    assert Path(queries).resolve() == (clone / "queries").resolve()
    assert last_line == marker


def test_this_checkout_imports_its_own_tree():
    import entropy_fast
    import entropy_fast.kernels
    import entropy_fast.queries

    package = Path(entropy_fast.__file__).resolve().parent
    assert Path(entropy_fast.kernels.__path__[0]).resolve() == (package / "kernels").resolve()
    assert Path(entropy_fast.queries.__path__[0]).resolve() == (package / "queries").resolve()


def test_no_top_level_folder_shadows_an_installed_package():
    """Python started in the checkout has its root on sys.path: a top-level folder with an
    __init__.py there (kernels/, queries/) would hide a distribution of that name, as
    kernels/ once hid the `kernels` package that transformers imports at model load."""
    own = {"entropy_fast", "entropy_profiler", "tests"}
    regular = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert regular <= own, f"top-level packages that can shadow others: {regular - own}"


def test_transformers_loads_a_model_from_the_repository_root():
    """As `python -m pytest`, a REPL or `python -c` in the checkout do: the root first on
    sys.path, then transformers' hub-kernels integration and a model load."""
    out = python("import sys; assert sys.path[0] == ''; "
                 "import transformers.integrations.hub_kernels, kernels, transformers as t; "
                 "cfg = t.AutoConfig.for_model('llama', vocab_size=32, hidden_size=16, "
                 "intermediate_size=32, num_hidden_layers=1, num_attention_heads=2); "
                 "m = t.AutoModelForCausalLM.from_config(cfg); "
                 "import entropy_fast.kernels.lens_entropy, entropy_fast.queries; "
                 "print(kernels.__file__.startswith(sys.prefix), type(m).__name__)", ROOT)
    assert out == "True LlamaForCausalLM"
