"""KL to the final layer for the fused lens kernel: the final distribution's expected head row.

Without a soft-cap the lens logits are linear in the normed row h: z(v) = c (W_v . h + b_v),
c the logit scale. So for the final layer's distribution p_L of a token and any layer's
row h of the same token,

    KL(p_L || p_h) = E_pL[z_L - z_h] - lse_L + lse_h = c (h_L - h) . w_L + lse_h - lse_L,

with w_L = sum_v p_L(v) W_v, one d-vector per token (the bias cancels;
entropy.linear_kl_to_final, which the torch backend shares). The entropy sweep gives every
row's lse (m + log S); this module computes w_L in one more sweep of the vocabulary over
the final layer's rows only (1/G of the rows for G layer groups: two
GEMMs' worth on them, the logits and p_L @ W), never a tokens x vocabulary tensor. The
final layer's own KL is exactly 0 (h_L - h = 0, the same lse).

Each program owns BLOCK_N rows and one vocabulary split; per tile it computes the
logits (tl.dot, fp32 accumulation), p_L = 2^(z2 - lse2) with the known lse, and adds
p_L @ W_tile to its split's (BLOCK_N x d) partial sum, BLOCK_D columns at a time, in fp32
operands ("ieee" in the interpreter, "tf32x3" on a GPU: tf32 alone would cost KL ~1e-3
relative). The splits' partial sums are added by torch (deterministic, no atomics).
A soft-capped lens is not linear: lens.py keeps the torch backend's online KL there.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _expected_head_kernel(
    X, W, HB, LSE, OUT, TOTAL, N, V, D, stride_xn, stride_wv, tiles_per_split, n_splits,
    scale2,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    W_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT[split, rows, :] = sum over the split's tokens v of p(v) W_v and TOTAL[split, rows]
    = sum of p(v) (fp32), where p(v) = 2^(scale2 (x . W_v + b_v) - LSE log2 e): X (N x D)
    normed rows, LSE (N,) nats."""
    pid = tl.program_id(0)
    row_block, split = pid // n_splits, pid % n_splits
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    ds = tl.arange(0, BLOCK_D)
    lse2 = tl.load(LSE + rows_c) * 1.4426950408889634
    v_first = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_first + tiles_per_split * BLOCK_V, V)
    out = OUT + split.to(tl.int64) * N * D + rows_c[:, None] * D
    total = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_first, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cols_c = tl.minimum(cols, V - 1).to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a = tl.load(X + rows_c[:, None] * stride_xn + (k0 + ks)[None, :],
                        mask=(k0 + ks)[None, :] < D, other=0.0)
            w = tl.load(W + cols_c[None, :] * stride_wv + (k0 + ks)[:, None],
                        mask=(k0 + ks)[:, None] < D, other=0.0)
            if UPCAST:  # the interpreter mis-reads bf16 unless converted right after the load
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(HB + cols_c).to(tl.float32)[None, :]
        p = tl.exp2(acc * scale2 - lse2[:, None])
        p = tl.where((cols < V)[None, :], p, 0.0)
        total += tl.sum(p, axis=1)
        for d0 in range(0, D, BLOCK_D):
            w = tl.load(W + cols_c[:, None] * stride_wv + (d0 + ds)[None, :],
                        mask=(d0 + ds)[None, :] < D, other=0.0).to(tl.float32)
            part = tl.dot(p, w, input_precision=W_PRECISION)
            at = out + (d0 + ds)[None, :]
            keep = (rows < N)[:, None] & ((d0 + ds) < D)[None, :]
            tl.store(at, tl.load(at, mask=keep, other=0.0) + part, mask=keep)
    tl.store(TOTAL + split.to(tl.int64) * N + rows, total, mask=rows < N)


KL_WARPS, KL_STAGES = 4, 2


def kl_constants(dtype: torch.dtype, interpret: bool, has_bias: bool = False) -> tuple:
    """The kernel's constexprs (HAS_BIAS, UPCAST, PRECISION, W_PRECISION and the blocks
    N, V, K, D) for a head of `dtype`; the interpreter's blocks are small (its cost grows
    with each block's size), tl.dot's at least 16. On sm_90, 64 x 64 tiles compile without
    spills (bf16 d=4096: 241 registers; 64 x 128 spill 116 stores), tests/test_kernel_compile."""
    blocks = (16, 128, 32, 32) if interpret else (64, 64, 32, 64)
    precision = "ieee" if interpret or dtype == torch.float32 else "tf32"
    return (has_bias, interpret, precision, "ieee" if interpret else "tf32x3", *blocks)


def expected_head_rows(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lse: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
    """(n x d) fp32 w = sum_v p(v) W_v for normed rows (n x d, the head's dtype) whose lens
    logits z = logit_scale (x W^T + bias) have log-partition `lse` (n,) in nats."""
    (n, d), vocab = rows.shape, weight.shape[0]
    interpret = rows.device.type != "cuda"
    constants = dict(zip(("HAS_BIAS", "UPCAST", "PRECISION", "W_PRECISION", "BLOCK_N",
                          "BLOCK_V", "BLOCK_K", "BLOCK_D"),
                         kl_constants(weight.dtype, interpret, bias is not None), strict=True))
    block_n, block_v = constants["BLOCK_N"], constants["BLOCK_V"]
    n_tiles = triton.cdiv(vocab, block_v)
    n_splits = min(4, n_tiles)
    per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, per_split)
    out = torch.zeros((n_splits, n, d), device=rows.device, dtype=torch.float32)
    total = torch.zeros((n_splits, n), device=rows.device, dtype=torch.float32)
    if n == 0:
        return out.sum(0) / total.sum(0)[:, None]  # exactly normalized: lse's rounding cancels
    with torch.cuda.device(rows.device) if rows.is_cuda else contextlib.nullcontext():
        _expected_head_kernel[(triton.cdiv(n, block_n) * n_splits,)](
            rows, weight, weight if bias is None else bias, lse.float().contiguous(), out, total, n,
            vocab, d, rows.stride(0), weight.stride(0), per_split, n_splits,
            float(logit_scale) * LOG2E, **constants, num_warps=KL_WARPS, num_stages=KL_STAGES)
    return out.sum(0) / total.sum(0)[:, None]  # exactly normalized: lse's rounding cancels

