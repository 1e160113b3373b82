"""Run the code cells of one of entropy-profiler 0.2.1's notebooks; record what each prints.

Runs in the oracle venv (the real 0.2.1) and in ours alike, as a script:

    python tests/oracle_notebooks.py SPEC.json OUT.json

SPEC: {"notebook": path, "edits": [[old, new], ...], "dataset": [rows] or null,
"threads": int, "fix_lens_bugs": bool}. Each edit replaces text in every cell: the issue
allows changing only model ids, the dataset source, NUM_SEQUENCES and plt.show(). With
"dataset", `load_dataset(...)` returns those rows (MMLU-shaped dicts) instead of reading
the hub. OUT: [{"cell", "ok", "stdout", "error"}] per code cell, in order; a failing
cell is recorded and the next ones still run, as in a notebook.

"fix_lens_bugs" (for the real 0.2.1 only) replaces its lens step by one without its two
bugs (the last state, already normed by HF, normed again; Gemma-2 soft-capping ignored),
so that the printed values can be compared with the drop-in's, which has them fixed.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

import matplotlib

matplotlib.use("Agg")

import torch


def fix_lens_bugs() -> None:
    """Patch 0.2.1's EntropyProfiler: its lens without the two bugs, nothing else changed."""
    import torch.nn.functional as F

    from entropy_profiler import profiler as seed

    def entropy(self, hidden: torch.Tensor, normed: bool) -> torch.Tensor:
        if not normed:
            hidden = self._ln(hidden.to(self._ln.weight.dtype))
        logits = self._lm_head(hidden.to(self._lm_head.weight.dtype)).float()
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        probs = F.softmax(logits, dim=-1)
        if abs(self.alpha - 1.0) < 1e-6:
            return seed.shannon_entropy(probs)
        return seed.renyi_entropy(probs, self.alpha)

    def rows(self, states, positions) -> torch.Tensor:
        """(len(positions), L) entropies; states[l] is HF's hidden state l (L: normed)."""
        n_layers = len(states) - 1
        return torch.stack([torch.stack([
            entropy(self, states[layer][:, [p], :], layer == n_layers).squeeze()
            for layer in range(1, n_layers + 1)]) for p in positions])

    def from_generation(self, hidden_states) -> torch.Tensor:
        return torch.cat([rows(self, step, [-1]) for step in hidden_states])

    @torch.no_grad()
    def prompt_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids, output_hidden_states=True, return_dict=True).hidden_states
        return rows(self, states, range(input_ids.shape[1]))

    seed.EntropyProfiler._compute_entropy_from_generation = from_generation
    seed.EntropyProfiler._profile_prompt = prompt_rows


def code_cells(path: str, edits: list[list[str]]) -> list[tuple[int, str]]:
    """(index, edited source) of every code cell of the notebook at `path`."""
    with open(path) as f:
        cells = json.load(f)["cells"]
    out = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        for old, new in edits:
            source = source.replace(old, new)
        out.append((index, source))
    return out


def run(spec: dict) -> list[dict]:
    """Execute the notebook's code cells in one namespace; record each one's output."""
    torch.set_num_threads(spec.get("threads", 1))
    if spec.get("fix_lens_bugs"):
        fix_lens_bugs()
    rows = spec.get("dataset")
    namespace = {"__name__": "__main__", "LOCAL_DATASET": lambda *args, **kwargs: rows}
    results = []
    for index, source in code_cells(spec["notebook"], spec["edits"]):
        stdout = io.StringIO()
        error = ""
        with contextlib.redirect_stdout(stdout):
            try:
                exec(compile(source, f"<cell {index}>", "exec"), namespace)
            except Exception:
                error = traceback.format_exc(limit=-3)
        results.append({"cell": index, "ok": not error, "stdout": stdout.getvalue(),
                        "error": error})
        import matplotlib.pyplot as plt

        plt.close("all")
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(run(spec), f, indent=1)
