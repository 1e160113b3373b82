#!/usr/bin/env bash
# GPU check and benchmark of the fused lens kernel, in one go (bench/bench_kernel.py).
#
# Run from anywhere (it changes to the repository root), on one H100/H200:
#     OUT=/some/dir bash bench/gpu_check.sh          # $OUT defaults to out/gpu
# Needs torch, triton, transformers; no install of this package, no duckdb, no vllm,
# no network. About 5-7 minutes on an H100/H200 (no new section after BENCH_BUDGET_S=360 s,
# the script stops itself at 420 s, and `timeout` kills it at BENCH_TIMEOUT_S=450 s).
# Writes: $OUT/kernel_bench.json (every number), $OUT/kernel_bench.md (tables),
#         $OUT/bench_log.txt (console), $OUT/env.txt (nvidia-smi, versions).
# Exit status: 0 all checks passed, 1 a correctness check failed or a section raised,
#              2 no CUDA device, 3 stopped by its own deadline, 124/137 killed by timeout.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # the interpreter would run the kernel on the CPU
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/entropy_fast_triton_cache}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export PYTHONWARNINGS="ignore::FutureWarning"
PY="$(command -v python || command -v python3)"

{
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  "$PY" -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__)'
} > "$OUT/env.txt" 2>&1
tail -n 1 "$OUT/env.txt"

timeout -k 15 "${BENCH_TIMEOUT_S:-450}" "$PY" -u bench/bench_kernel.py --out "$OUT" \
  --budget-s "${BENCH_BUDGET_S:-360}" "$@" 2>&1 | tee "$OUT/bench_log.txt"
status=${PIPESTATUS[0]}
echo "bench_kernel.py exit status: $status" | tee -a "$OUT/bench_log.txt"
exit "$status"
