"""Size of two of 0.2.1's lens bugs that the oracle run cannot show on a real model here.

docs/migrating-from-0.2.1.md lists each fix with its size. The last-column fix is measured
with the real 0.2.1 (bench/bench_compat.py); these two are measured against float64 lenses
written the obvious way, on the same states, one with the bug put back:

- Gemma-2 soft-capping: no real Gemma-2 loads offline here, so the tests' tiny random
  Gemma-2 (final_logit_softcapping 2.0, a scale a real Gemma-2 never reaches: 30.0) and,
  for a realistic scale, SmolLM2-135M's own lens logits with Gemma-2's cap of 30 applied
  or not (the cap only matters where logits approach it).
- Half precision: 0.2.1 multiplies the normed state by the head in the model's dtype, so
  the logits are rounded to float16 before its float32 softmax. SmolLM2-135M in float16
  (the 0.2.1 default dtype), the head GEMM in float16 against the same GEMM in float64.

    python bench/bench_lens_fixes.py [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from entropy_fast.lens import Lens  # noqa: E402
from entropy_fast.models import model_source  # noqa: E402
from tests import oracle  # noqa: E402
from tests.reference import entropy_from_logits  # noqa: E402  (float64, written plainly)

GEMMA2_CAP = 30.0  # final_logit_softcapping of the released Gemma-2 checkpoints


def shannon(logits: torch.Tensor) -> torch.Tensor:
    return entropy_from_logits(logits.double(), [1.0])[..., 0]


def summary(error: torch.Tensor) -> dict:
    error = error.abs()
    return {"mean_abs": float(error.mean()), "max_abs": float(error.max()),
            "rows": int(error.numel())}


def gemma_tiny(prompts: list[str]) -> dict:
    """0.2.1's lens (no cap) against the capped float64 lens, every block but the last."""
    with tempfile.TemporaryDirectory() as cache:
        lens = oracle.FloatLens(str(oracle.tiny_model_folder("gemma2", Path(cache))))
        errors = []
        for text in prompts:
            ids = lens.tokenizer(text)["input_ids"]
            right, buggy = lens.blocks(ids, list(range(len(ids))))
            errors.append((right - buggy)[:, :-1].flatten())
        return {"softcap": lens.softcap, **summary(torch.cat(errors))}


@torch.no_grad()
def smollm2_states(prompts: list[str], dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_source("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    lens = Lens.from_model(model)
    rows = []
    for text in prompts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        states = model(ids, output_hidden_states=True).hidden_states
        rows.append(torch.cat([h[0] for h in states[1:-1]]))  # pre-norm block outputs
    return torch.cat(rows), lens


@torch.no_grad()
def smollm2_fixes(prompts: list[str]) -> dict:
    states, lens = smollm2_states(prompts, torch.float32)
    normed = lens.norm(states).double()
    logits = normed @ lens.head.weight.double().T
    capped = torch.tanh(logits / GEMMA2_CAP) * GEMMA2_CAP
    half_states, half_lens = smollm2_states(prompts, torch.float16)
    half_normed = half_lens.norm(half_states)
    half_logits = (half_normed @ half_lens.head.weight.T).double()  # 0.2.1: fp16 GEMM
    exact_half = half_normed.double() @ half_lens.head.weight.double().T
    return {"cap_30_on_smollm2_logits": summary(shannon(capped) - shannon(logits)),
            "max_abs_logit": float(logits.abs().max()),
            "float16_head_gemm": summary(shannon(half_logits) - shannon(exact_half))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_lens_fixes.json"))
    args = parser.parse_args()
    lines = (ROOT / "entropy_fast" / "data" / "sample_prompts.txt").read_text().splitlines()
    prompts = [line.strip() for line in lines if line.strip()][:args.prompts]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    result = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "prompts": len(prompts),
              "gemma2_tiny_softcap": gemma_tiny(prompts), **smollm2_fixes(prompts)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
