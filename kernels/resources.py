"""Ahead-of-time compilation of the lens kernels for a GPU architecture, with no GPU.

Triton ships ptxas and cuobjdump, so the kernels can be compiled for, say, an H100
(sm_90) on any machine, specialized as a launch there would be (16-byte aligned
pointers, sizes divisible by 16 where they are), and their machine code read: registers
per thread, local-memory stack (register spills), shared memory, the spill instructions
inside the hot loop (the innermost loop that holds the tensor-core MMA) and the TMA loads.
The row count is taken as a multiple of 16 (a launch with N = 1, or with one vocabulary
tile per split, specializes those to constants and compiles a slightly different kernel).
Tests use it to catch what the interpreter cannot (GPU-only compile errors, a hot loop
that spills); bench/kernel_resources.py uses it to compare tile configurations before a
GPU run.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from entropy_fast.kernels.lens_entropy import (
    KernelConfig,
    _lens_entropy_kernel,
    specialization,
)
from entropy_fast.kernels.lens_kl import (
    KL_STAGES,
    KL_WARPS,
    _expected_head_kernel,
    kl_constants,
)
from entropy_fast.kernels.lens_prologue import _lens_prologue_kernel

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_MMA = ("HGMMA", "HMMA")  # Hopper warp-group MMA, Ampere-style MMA


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel uses per thread (registers, stack) and per block (shared)."""

    registers: int
    stack_bytes: int
    shared_bytes: int
    spill_stores: int
    spill_loads: int
    hot_loop_spills: int  # STL + LDL in the innermost loop holding the MMA (-1: no MMA loop)
    tma_loads: int  # UTMALDG instructions: tiles fetched by the copy engine


def cuda_tool(name: str) -> Path | None:
    """Path of a CUDA binary bundled with Triton (ptxas, cuobjdump), None if absent."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.is_file() else None


def lens_kernel_resources(cfg: KernelConfig, *, dtype: torch.dtype = torch.bfloat16,
                          d: int = 4096, vocab: int = 128256, orders: tuple[float, ...] = (),
                          with_argmax: bool = False, has_targets: bool = False,
                          has_bias: bool = False, has_softcap: bool = False, top_k: int = 0,
                          capability: int = 90) -> Resources:
    """Compile the vocabulary sweep as a launch with these statistics would, and measure it.

    orders: the Rényi orders other than 0, 1 and inf (at most four per launch).
    """
    pointer = "*" + _TYPES[dtype]
    signature = dict(X=pointer, W=pointer, HB=pointer, TGT="*i64" if has_targets else "*i32",
                     EST="*fp32", PF="*fp32", PI="*i32", PT="*fp32", PTI="*i32")
    aligned = ["HB", "TGT", "EST", "PF", "PI", "PT", "PTI", "N"]
    if cfg.tma:
        signature["X"] = f"tensordesc<{_TYPES[dtype]}[{cfg.block_n}, {cfg.block_k}]>"
        signature["W"] = f"tensordesc<{_TYPES[dtype]}[{cfg.block_v}, {cfg.block_k}]>"
    else:
        aligned += ["X", "W"]
    signature.update(dict.fromkeys(("N", "V", "D", "stride_xn", "stride_wv",
                                    "tiles_per_split", "n_splits"), "i32"))
    signature.update(dict.fromkeys(("in_scale", "out_scale", "a0", "a1", "a2", "a3"), "fp32"))
    constants = specialization(cfg, list(orders), dtype, vocab, d, has_bias=has_bias,
                               has_softcap=has_softcap, with_argmax=with_argmax,
                               has_targets=has_targets, top_k=top_k)
    aligned += ["D", "stride_xn", "stride_wv"] if d % 16 == 0 else []
    aligned += ["V"] if vocab % 16 == 0 else []
    return _compile(_lens_entropy_kernel, signature, constants, aligned, capability,
                    cfg.num_warps, cfg.num_stages)


def prologue_resources(*, dtype: torch.dtype = torch.bfloat16, d: int = 4096,
                       vocab: int = 128256, norm: str = "rmsnorm", has_targets: bool = True,
                       capability: int = 90) -> Resources:
    """Compile the fused-norm prologue (one row per program) and measure it."""
    pointer = "*" + _TYPES[dtype]
    signature = dict(X=pointer, Y=pointer, NW=pointer, NB=pointer, W=pointer, HB=pointer,
                     TGT="*i64", EST="*fp32")
    signature.update(dict.fromkeys(("V", "D", "stride_xn", "stride_yn", "stride_wv"), "i32"))
    signature.update(dict.fromkeys(("eps", "w_offset", "scale", "softcap"), "fp32"))
    block_d = triton.next_power_of_2(d)
    constants = dict(NORM={"layernorm": 1, "rmsnorm": 2}[norm], HAS_NW=True,
                     HAS_NB=norm == "layernorm", HAS_BIAS=False, HAS_SOFTCAP=False,
                     WRITE_Y=True, HAS_TARGETS=has_targets,
                     ROUND_BF16=dtype == torch.bfloat16, BLOCK_D=block_d)
    aligned = ["X", "Y", "NW", "NB", "W", "HB", "TGT", "EST"]
    aligned += ["D", "stride_xn", "stride_yn", "stride_wv"] if d % 16 == 0 else []
    aligned += ["V"] if vocab % 16 == 0 else []
    return _compile(_lens_prologue_kernel, signature, constants, aligned, capability,
                    max(1, min(16, block_d // 512)), 1)


def expected_head_resources(*, dtype: torch.dtype = torch.bfloat16, d: int = 4096,
                            vocab: int = 128256, capability: int = 90) -> Resources:
    """Compile the KL kernel's sweep over the final rows (kernels/lens_kl.py) as a bf16 or
    fp32 launch would, and measure it."""
    pointer = "*" + _TYPES[dtype]
    signature = dict(X=pointer, W=pointer, HB=pointer, LSE="*fp32", OUT="*fp32",
                     TOTAL="*fp32")
    signature.update(dict.fromkeys(("N", "V", "D", "stride_xn", "stride_wv",
                                    "tiles_per_split", "n_splits"), "i32"))
    signature["scale2"] = "fp32"
    constants = dict(zip(("HAS_BIAS", "UPCAST", "PRECISION", "W_PRECISION", "BLOCK_N",
                          "BLOCK_V", "BLOCK_K", "BLOCK_D"), kl_constants(dtype, False),
                         strict=True))
    aligned = ["X", "W", "HB", "LSE", "OUT", "TOTAL", "N"]
    aligned += ["D", "stride_xn", "stride_wv"] if d % 16 == 0 else []
    return _compile(_expected_head_kernel, signature, constants, aligned, capability,
                    KL_WARPS, KL_STAGES)


def _compile(kernel, signature: dict, constants: dict, aligned: list[str], capability: int,
             num_warps: int, num_stages: int) -> Resources:
    if cuda_tool("cuobjdump") is None:
        raise RuntimeError("this Triton install has no bundled cuobjdump: cannot read SASS")
    names = kernel.arg_names
    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    source = ASTSource(kernel, signature, constants, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages,
                                           enable_fp_fusion=True))  # as the launchers ask
    cubin = compiled.asm["cubin"]
    sass = _cuobjdump("-sass", cubin).splitlines()
    usage = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump("--dump-resource-usage", cubin))
    return Resources(registers=int(usage[1]), stack_bytes=int(usage[2]),
                     shared_bytes=int(compiled.metadata.shared),
                     spill_stores=sum("STL" in line for line in sass),
                     spill_loads=sum("LDL" in line for line in sass),
                     hot_loop_spills=_hot_loop_spills(sass),
                     tma_loads=sum("UTMALDG" in line for line in sass))


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(cuda_tool("cuobjdump")), flag, file.name],
                              capture_output=True, text=True, check=True).stdout


def _hot_loop_spills(sass: list[str]) -> int:
    """Spill instructions in the shortest backward-branch range that contains an MMA."""
    line_of = {}
    for i, line in enumerate(sass):
        address = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        if address:
            line_of[int(address[1], 16)] = i
    mma = [i for i, line in enumerate(sass) if any(op in line for op in _MMA)]
    loops = []
    for end, line in enumerate(sass):
        branch = re.search(r"BRA (0x[0-9a-f]+)", line)
        start = line_of.get(int(branch[1], 16), end) if branch else end
        if start < end and any(start <= i <= end for i in mma):
            loops.append((end - start, start, end))
    if not loops:
        return -1
    _, start, end = min(loops)
    return sum(("STL" in line) or ("LDL" in line) for line in sass[start:end + 1])
