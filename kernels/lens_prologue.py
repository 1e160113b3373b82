"""Prologue of the lens kernel: the final norm applied once per row, in fp32.

One program per row (n x d): LayerNorm (x - mean) / sqrt(var + eps) * w + b, RMSNorm
x / sqrt(mean x^2 + eps) * (w + offset) (offset 1 for Gemma), rounded once to the head's
dtype and written, so that the vocabulary sweep reads operands ready for tl.dot. This
costs one read and one write of the rows (memory-bound, well under a percent of the lens
matmul at d >= 768) and holds one layer's normed rows. With targets, it also computes
each target's exact logit (one dot product per row) for the surprisal and the rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    t = tl.exp2(tl.where(x < 0, x, -x) * 2.8853900817779268)  # 2^(-2|x| log2 e)
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _round_bf16(x):
    """fp32 rounded to the nearest bf16 (ties to even), still fp32; the interpreter's own
    fp32 -> bf16 cast truncates, a GPU's rounds: this makes both round the same way."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _lens_prologue_kernel(
    X, Y, NW, NB, W, HB, TGT, EST, V, D, stride_xn, stride_yn, stride_wv,
    eps, w_offset, scale, softcap,
    NORM: tl.constexpr, HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, WRITE_Y: tl.constexpr, HAS_TARGETS: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One row: fp32 final norm (NORM 0 none, 1 LayerNorm, 2 RMSNorm), written in Y's dtype
    (the head's); with targets, EST = the target's logit in nats from the rounded row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(X + row * stride_xn + cols, mask=ok, other=0.0).to(tl.float32)
    if NORM == 1:
        x = tl.where(ok, x - tl.sum(x, axis=0) / D, 0.0)
    if NORM != 0:
        x = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        if HAS_NW:
            x = x * (tl.load(NW + cols, mask=ok, other=0.0).to(tl.float32) + w_offset)
        if HAS_NB:
            x = x + tl.load(NB + cols, mask=ok, other=0.0).to(tl.float32)
    if ROUND_BF16:
        x = _round_bf16(x)
    y = x.to(Y.dtype.element_ty)
    if WRITE_Y:
        tl.store(Y + row * stride_yn + cols, y, mask=ok)
    if HAS_TARGETS:
        t = tl.minimum(tl.maximum(tl.load(TGT + row), 0), V - 1)
        w = tl.load(W + t * stride_wv + cols, mask=ok, other=0.0).to(tl.float32)
        z = tl.sum(y.to(tl.float32) * w, axis=0)
        if HAS_BIAS:
            z += tl.load(HB + t).to(tl.float32)
        z = z * scale
        if HAS_SOFTCAP:
            z = _tanh(z / softcap) * softcap
        tl.store(EST + row, z)


_NORMS = {None: 0, "layernorm": 1, "rmsnorm": 2}


def prepare_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor | None, *, norm: str | None,
                 norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                 norm_eps: float, norm_offset: float, logit_scale: float,
                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, target_logit): rows (n x d) in the head's dtype, normed when `norm` names a
    norm (arguments as lens_entropy.lens_entropy_partials), and (n,) fp32 target logits in
    nats (uninitialized without targets). x: (n x d) with unit column stride; rows already
    normed and in the head's dtype are used as they are.
    """
    (n, d), vocab = x.shape, weight.shape[0]
    write_y = norm is not None or x.dtype != weight.dtype
    rows = torch.empty((n, d), device=x.device, dtype=weight.dtype) if write_y else x
    est = torch.empty(n, device=x.device, dtype=torch.float32)
    if write_y or targets is not None:
        block_d = triton.next_power_of_2(d)
        _lens_prologue_kernel[(n,)](
            x, rows, rows if norm_weight is None else norm_weight,
            rows if norm_bias is None else norm_bias, weight, rows if bias is None else bias,
            rows if targets is None else targets, est, vocab, d, x.stride(0), rows.stride(0),
            weight.stride(0), float(norm_eps), float(norm_offset), float(logit_scale),
            float(softcap or 0.0), NORM=_NORMS[norm],
            HAS_NW=norm is not None and norm_weight is not None,
            HAS_NB=norm is not None and norm_bias is not None, HAS_BIAS=bias is not None,
            HAS_SOFTCAP=bool(softcap), WRITE_Y=write_y, HAS_TARGETS=targets is not None,
            ROUND_BF16=rows.dtype == torch.bfloat16,
            BLOCK_D=block_d, num_warps=max(1, min(16, block_d // 512)), enable_fp_fusion=True)
    return rows, est
