"""The lens kernels compiled for an H100 (sm_90) ahead of time, with no GPU.

The interpreter runs the kernels' Python, not their GPU code: these tests compile the
default configurations with Triton's bundled ptxas, as a launch on an H100 would
specialize them, and read the machine code (kernels/resources.py). They catch GPU-only
compile errors, shared memory beyond the card's 227 KiB, and register spills in the hot
loop, before any GPU run.
"""

import json
import os
import subprocess
import sys

import pytest

from entropy_fast.kernels.resources import cuda_tool

pytestmark = pytest.mark.skipif(cuda_tool("ptxas") is None or cuda_tool("cuobjdump") is None,
                                reason="this Triton install bundles no ptxas/cuobjdump")

SHARED_LIMIT = 227 * 1024  # H100/H200 shared memory per block
EVERYTHING = "orders=(0.5, 0.999, 1.001, 2.0), with_argmax=True, has_targets=True"
HEAVY = "n_orders=4, with_argmax=True, has_targets=True"
BF16, FP32 = "torch.device('cuda'), torch.bfloat16", "torch.device('cuda'), torch.float32"
CASES = {  # name: a call of entropy_fast.kernels.resources
    "gpt2 Shannon": f"lens_kernel_resources(default_config({BF16}), d=768, vocab=50257)",
    "llama8b Shannon": f"lens_kernel_resources(default_config({BF16}), d=4096, vocab=128256)",
    "llama1b fp16 Shannon + 2": ("lens_kernel_resources(default_config(torch.device('cuda'), "
                                 "torch.float16, n_orders=2), dtype=torch.float16, d=2048, "
                                 "vocab=128256, orders=(0.5, 2.0))"),
    "llama8b everything": (f"lens_kernel_resources(default_config({BF16}, {HEAVY}), d=4096, "
                           f"vocab=128256, {EVERYTHING})"),
    "llama8b everything 128x256": (f"lens_kernel_resources(KernelConfig(), d=4096, "
                                   f"vocab=128256, {EVERYTHING})"),
    "gpt2 TMA Shannon": ("lens_kernel_resources(KernelConfig(tma=True), d=768, vocab=50257)"),
    "gpt2 TMA flat Shannon": ("lens_kernel_resources(KernelConfig(tma=True, flat=True), d=768, "
                              "vocab=50257)"),
    "llama8b TMA 128x128 everything": ("lens_kernel_resources(KernelConfig(block_v=128, tma=True), "
                                       f"d=4096, vocab=128256, {EVERYTHING})"),
    "gpt2 fp32": (f"lens_kernel_resources(default_config({FP32}), dtype=torch.float32, "
                  "d=768, vocab=50257, has_softcap=True, has_bias=True)"),
    "llama8b top-10": (f"lens_kernel_resources(default_config({BF16}, top_k=10), d=4096, "
                       "vocab=128256, top_k=10)"),
    "llama8b KL": "expected_head_resources(d=4096, vocab=128256)",
    "gpt2 fp32 KL": "expected_head_resources(dtype=torch.float32, d=768, vocab=50257)",
    "prologue rmsnorm": "prologue_resources(d=4096, norm='rmsnorm')",
    "prologue layernorm": "prologue_resources(d=768, norm='layernorm')",
}


@pytest.fixture(scope="module")
def compiled():
    """Every case compiled in one fresh process: @triton.jit functions made under the
    interpreter (which the test session uses) cannot be compiled for a GPU."""
    lines = ["import dataclasses, json, torch",
             "from entropy_fast.kernels.lens_entropy import KernelConfig, default_config",
             "from entropy_fast.kernels.resources import expected_head_resources, "
             "lens_kernel_resources, prologue_resources",
             f"calls = {json.dumps(CASES)}",
             "print(json.dumps({k: dataclasses.asdict(eval(v)) for k, v in calls.items()}))"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", "\n".join(lines)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_case_compiles_within_shared_memory(compiled):
    assert set(compiled) == set(CASES)
    for name, used in compiled.items():
        assert 0 < used["shared_bytes"] <= SHARED_LIMIT, name


def test_tma_configurations_really_load_through_the_copy_engine(compiled):
    for name, used in compiled.items():
        assert (used["tma_loads"] > 0) == ("TMA" in name), name


def test_hot_loop_never_spills(compiled):
    for name in ("gpt2 Shannon", "llama8b Shannon", "llama1b fp16 Shannon + 2",
                 "llama8b everything", "gpt2 TMA Shannon", "llama8b TMA 128x128 everything",
                 "llama8b top-10", "llama8b KL", "gpt2 fp32 KL"):
        assert compiled[name]["hot_loop_spills"] == 0, name


def test_default_tiles_keep_common_statistics_in_registers(compiled):
    for name in ("gpt2 Shannon", "llama8b Shannon", "llama1b fp16 Shannon + 2",
                 "gpt2 TMA Shannon", "gpt2 TMA flat Shannon", "prologue rmsnorm",
                 "prologue layernorm"):
        assert compiled[name]["stack_bytes"] == 0, name


def test_heavy_statistics_choose_tiles_that_spill_far_less(compiled):
    def spills(name):
        return compiled[name]["spill_stores"] + compiled[name]["spill_loads"]

    assert spills("llama8b everything") * 4 < spills("llama8b everything 128x256")

