"""The real entropy-profiler 0.2.1 as the test oracle: where it lives, and its cached results.

0.2.1 shares the import name `entropy_profiler` with our drop-in, so it lives in a virtual
environment of its own (`.venv-oracle/` at the repository root, built by .ci/oracle.sh, or
the python named by $ENTROPY_PROFILER_ORACLE). Scripts run there as subprocesses and hand
their results back in a file. Results are cached under $ENTROPY_FAST_ORACLE_CACHE (else
pytest's cache folder), keyed by the installed wheel's RECORD (file hashes), the torch and
transformers versions beside it, the script, the spec and the model files, so a new
release, a changed scenario or other weights recompute them. Without the venv the tests
skip, unless $ENTROPY_FAST_REQUIRE_ORACLE is set (CI), where a missing oracle fails.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tests.reference import entropy_from_logits

REPO = Path(__file__).resolve().parents[1]
ORACLE_PYTHON_ENV = "ENTROPY_PROFILER_ORACLE"
CACHE_ENV = "ENTROPY_FAST_ORACLE_CACHE"
REQUIRE_ENV = "ENTROPY_FAST_REQUIRE_ORACLE"
ORACLE_VERSION = "0.2.1"
DATASET = Path(__file__).with_name("data") / "mmlu_abstract_algebra_sample.json"


def oracle_python() -> Path:
    """The python of the oracle venv; skips (or fails under REQUIRE) when it is missing."""
    path = Path(os.environ.get(ORACLE_PYTHON_ENV) or REPO / ".venv-oracle" / "bin" / "python")
    problem = None
    if not path.exists():
        problem = f"no oracle venv at {path}"
    elif not _dist_info(path, "entropy_profiler"):
        problem = f"{path} has no entropy-profiler installed"
    elif not _dist_info(path, "entropy_profiler").name.startswith(
            f"entropy_profiler-{ORACLE_VERSION}."):
        problem = f"{path} has {_dist_info(path, 'entropy_profiler').name}, not {ORACLE_VERSION}"
    if problem is None:
        return path
    message = (f"{problem}: build it with `bash .ci/oracle.sh` (a venv with the real "
               f"entropy-profiler=={ORACLE_VERSION}) or point ${ORACLE_PYTHON_ENV} at one")
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(message)
    pytest.skip(message)


def sdist_notebook(python: Path, name: str) -> Path:
    """A notebook of the 0.2.1 sdist, which .ci/oracle.sh unpacks into the oracle venv."""
    path = python.absolute().parents[1] / "sdist" / "notebooks" / f"{name}.ipynb"
    if not path.exists():
        message = f"no {path}: run `bash .ci/oracle.sh` (it unpacks the 0.2.1 sdist there)"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _dist_info(python: Path, package: str) -> Path | None:
    """The .dist-info folder of `package` in the venv of `python` (<venv>/bin/python)."""
    venv = python.absolute().parents[1]
    found = sorted(venv.glob(f"lib/python3*/site-packages/{package}-*.dist-info"))
    return found[-1] if found else None


def fingerprint(python: Path) -> str:
    """Hash of the installed 0.2.1 wheel (its RECORD) and of the torch/transformers versions."""
    digest = hashlib.sha256((_dist_info(python, "entropy_profiler") / "RECORD").read_bytes())
    for package in ("torch", "transformers"):
        info = _dist_info(python, package)
        digest.update((info.name if info else f"no {package}").encode())
    return digest.hexdigest()


def file_digest(path: Path, digest=None):
    """sha256 over the files of a folder (names and bytes), or of one file."""
    digest = digest or hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest


def cache_dir(config) -> Path:
    """$ENTROPY_FAST_ORACLE_CACHE, else pytest's cache folder (never the user's ~/.cache)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        path = Path(explicit)
    elif getattr(config, "cache", None) is not None:
        path = Path(config.cache.mkdir("entropy-profiler-oracle"))
    else:
        path = Path(tempfile.gettempdir()) / "entropy-profiler-oracle"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_cached(python: Path, script: Path, spec: dict, cache: Path, inputs: list[Path],
               suffix: str = ".pt", timeout: float = 1200) -> Path:
    """Run `python script spec.json OUT` once per key; return OUT (cached, read-only).

    The key covers the oracle install, the script, the spec and the `inputs` (model
    folders). A file lock keeps two pytest workers from computing the same entry twice.
    """
    digest = hashlib.sha256(fingerprint(python).encode())
    file_digest(script, digest)
    digest.update(json.dumps(spec, sort_keys=True).encode())
    for path in inputs:
        file_digest(path, digest)
    key = digest.hexdigest()[:24]
    target = cache / f"{script.stem}-{key}{suffix}"
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            run_script(python, script, spec, target, timeout)
    return target


def run_script(python: Path, script: Path, spec: dict, target: Path,
               timeout: float = 1200) -> None:
    """`python script spec.json OUT` in a scratch folder, OUT then moved to `target`."""
    with tempfile.TemporaryDirectory() as work:
        spec_file, out = Path(work) / "spec.json", Path(work) / f"out{target.suffix}"
        spec_file.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false")
        done = subprocess.run([str(python), str(script), str(spec_file), str(out)], cwd=work,
                              env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{python} {script.name} failed:\n{done.stderr[-4000:]}")
        shutil.move(out, target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)


def tiny_model_folder(kind: str, cache: Path, **overrides) -> Path:
    """A saved tiny random `kind` model (tests/tiny_models) with random final-norm weights.

    `overrides` set config fields (tiny_model's).

    At its initial weights (1, bias 0) a norm is idempotent, which would hide 0.2.1's
    double norm of the last state; random weights make every norm matter. The folder is
    named by its content, so equal weights give the same path (and oracle cache key).
    """
    from tests.tiny_models import tiny_model, tiny_tokenizer

    model = tiny_model(kind, **overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                noise = torch.rand(param.shape, generator=generator)
                param.copy_(noise * 0.3 - 0.15 if name.endswith("bias") else noise + 0.5)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=cache))
    model.save_pretrained(staging)
    tiny_tokenizer().save_pretrained(staging)
    folder = cache / "models" / f"{kind}-{file_digest(staging).hexdigest()[:16]}"
    folder.parent.mkdir(exist_ok=True)
    try:
        staging.rename(folder)
    except OSError:  # made before (or by the other pytest worker): keep that one
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def notebook_models(cache: Path) -> dict[str, Path]:
    """Model folders for the notebooks: tiny GPT-2 and Llama (with a context long enough for
    MMLU prompts, ~300 characters and one token each), and the real SmolLM2."""
    from entropy_fast.models import model_source

    return {"gpt2": tiny_model_folder("gpt2", cache, n_positions=1024),
            "llama": tiny_model_folder("llama", cache, max_position_embeddings=1024),
            "smollm2": Path(model_source("smollm2-135m"))}


def notebook_spec(notebook: Path, paths: dict[str, Path]) -> dict:
    """tests/oracle_notebooks.py's spec: the issue's allowed edits and the local dataset."""
    return {"notebook": str(notebook), "edits": _notebook_edits(notebook.stem, paths),
            "threads": 1, "dataset": json.loads(DATASET.read_text())}


def _notebook_edits(name: str, paths: dict[str, Path]) -> list[list[str]]:
    show = ["plt.show()", 'plt.close("all")']
    if name == "seq_tok_analysis":
        return [["facebook/layerskip-llama3.2-1B", str(paths["smollm2"])], show]
    return [["from datasets import load_dataset", "load_dataset = LOCAL_DATASET"],
            ["Qwen/Qwen1.5-MoE-A2.7B", str(paths["gpt2"])],
            ["meta-llama/Llama-3.2-1B-Instruct", str(paths["llama"])],
            ["facebook/layerskip-llama3.2-1B", str(paths["smollm2"])],
            ["NUM_SEQUENCES = 250", "NUM_SEQUENCES = 4"], show]



class FloatLens:
    """float64 lens entropies of one model folder, from HF's hidden states.

    `blocks(ids, positions, alpha)` gives two (len(positions) x L) matrices. In the first,
    column b is block b's output sent through the final norm and the head (the last one,
    which HF hands over already normed, through the head alone) with soft-capping, as a
    correct lens does. The second puts 0.2.1's two bugs back: no soft-capping, and the last
    state normed again.
    """

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from entropy_fast.lens import Lens

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        lens = Lens.from_model(self.model)
        self.softcap = lens.softcap
        self.norm = copy.deepcopy(lens.norm).double()
        self.head = lens.head.weight.detach().double()
        self.bias = None if lens.head.bias is None else lens.head.bias.detach().double()
        self._cache: dict = {}

    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.head.T if self.bias is None else rows @ self.head.T + self.bias

    @torch.no_grad()
    def blocks(self, ids: list[int], positions: list[int],
               alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(ids), tuple(positions), alpha)
        if key not in self._cache:
            states = self.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            rows = torch.stack([h[0, positions] for h in states[1:]]).double()  # (L x n x d)
            inner = self._logits(self.norm(rows[:-1]))
            last, last_normed_twice = self._logits(rows[-1:]), self._logits(self.norm(rows[-1:]))
            capped = inner, last
            if self.softcap:
                capped = [torch.tanh(x / self.softcap) * self.softcap for x in capped]

            def entropies(*parts: torch.Tensor) -> torch.Tensor:
                return entropy_from_logits(torch.cat(parts), [alpha])[..., 0].T

            self._cache[key] = entropies(*capped), entropies(inner, last_normed_twice)
        return self._cache[key]


@lru_cache(maxsize=4)
def float_lens(path: str) -> FloatLens:
    """The FloatLens of a model folder, built once per process."""
    return FloatLens(path)
