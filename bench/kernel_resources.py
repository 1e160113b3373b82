"""Register, spill and shared-memory use of the lens kernel per tile configuration, no GPU.

Compiles the vocabulary sweep ahead of time for sm_90 (H100/H200) with Triton's bundled
ptxas (entropy_fast.kernels.resources) for the main tile configurations (most of
bench_kernel.py's GPU sweep, and a few more) and each set of statistics, and writes a
markdown table. A configuration whose
epilogue spills pays local-memory traffic once per logit tile; one whose hot loop
spills pays it on every K step. Timing still needs the GPU (bench/gpu_check.sh).

    python bench/kernel_resources.py [--out bench/results_kernel_resources.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch

from entropy_fast.kernels.lens_entropy import KernelConfig, default_config
from entropy_fast.kernels.resources import lens_kernel_resources

CONFIGS = {
    "128x256x64 w8 s3": KernelConfig(),
    "128x256x64 w8 s3 tma": KernelConfig(tma=True),
    "128x256x64 w8 s3 flat": KernelConfig(flat=True),
    "128x256x64 w8 s3 flat tma": KernelConfig(flat=True, tma=True),
    "128x128x64 w8 s3": KernelConfig(block_v=128),
    "128x128x64 w8 s3 tma": KernelConfig(block_v=128, tma=True),
    "128x128x64 w8 s4": KernelConfig(block_v=128, num_stages=4),
    "128x128x64 w8 s4 flat": KernelConfig(block_v=128, num_stages=4, flat=True),
    "256x128x64 w8 s3": KernelConfig(block_n=256, block_v=128),
    "64x256x64 w4 s4": KernelConfig(block_n=64, num_warps=4, num_stages=4),
}
STATISTICS = {  # name: keyword arguments of lens_kernel_resources
    "Shannon": {},
    "+ 0.5, 2": dict(orders=(0.5, 2.0)),
    "+ 4 orders": dict(orders=(0.5, 0.999, 1.001, 2.0)),
    "+ argmax, target": dict(with_argmax=True, has_targets=True),
    "+ 2 orders, argmax, target": dict(orders=(0.5, 2.0), with_argmax=True, has_targets=True),
    "everything": dict(orders=(0.5, 0.999, 1.001, 2.0), with_argmax=True, has_targets=True),
}
SHAPES = {"d=4096 V=128256": (4096, 128256), "d=768 V=50257": (768, 50257)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results_kernel_resources.md"))
    args = parser.parse_args()
    start = time.time()
    lines = [f"# Lens kernel resources on sm_90 (bf16, compiled ahead of time on "
             f"{platform.node()}, {time.strftime('%Y-%m-%d')})", "",
             "Cells: registers per thread / spill stores + loads in the whole kernel / in the "
             "hot K loop; shared memory per block in KiB.", ""]
    for shape, (d, vocab) in SHAPES.items():
        lines += [f"## {shape}", "", "| config | smem KiB | " + " | ".join(STATISTICS) + " |",
                  "|---" * (len(STATISTICS) + 2) + "|"]
        for name, cfg in CONFIGS.items():
            used = [lens_kernel_resources(cfg, d=d, vocab=vocab, **stats)
                    for stats in STATISTICS.values()]
            cells = [f"{r.registers} / {r.spill_stores + r.spill_loads} / {r.hot_loop_spills}"
                     for r in used]
            smem = max(r.shared_bytes for r in used) / 1024
            lines.append(f"| {name} | {smem:.0f} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        lines.append("")
    picks = {label: default_config(torch.device("cuda"), torch.bfloat16, **stats)
             for label, stats in (("Shannon", {}), ("everything", dict(
                 n_orders=4, with_argmax=True, has_targets=True)))}
    lines += ["Defaults (kernels/lens_entropy.default_config): "
              + "; ".join(f"{k}: {v}" for k, v in picks.items()),
              "", f"({time.time() - start:.0f} s)"]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
