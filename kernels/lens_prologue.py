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


def prepare_rows(lens, hidden: torch.Tensor, weight: torch.Tensor, normed: bool,
                 targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, est): normed rows (n x d) in the head's dtype, and (n,) fp32 target logits in nats.

    Norms the kernel cannot fuse (a projection after it, or an unrecognized module) run as
    the lens's own modules in torch. Rows already normed, contiguous and in the head's
    dtype are used as they are.
    """
    bias = getattr(lens.head, "bias", None)
    spec = None
    if not normed:
        spec = lens.norm_spec
        if spec is None:  # projection or unrecognized norm: the module itself, in torch
            hidden = lens.normalize(hidden)
    n, d = hidden.shape
    vocab = weight.shape[0]
    if d != weight.shape[1] or hidden.device != weight.device:
        raise ValueError(f"hidden states {tuple(hidden.shape)} on {hidden.device} do not fit "
                         f"the head {tuple(weight.shape)} on {weight.device}")
    device = hidden.device
    softcap = float(lens.softcap) if lens.softcap else 0.0
    write_y = spec is not None or hidden.dtype != weight.dtype or hidden.stride(1) != 1
    x = torch.empty((n, d), device=device, dtype=weight.dtype) if write_y else hidden
    est = torch.empty(n, device=device, dtype=torch.float32)
    if write_y or targets is not None:
        block_d = triton.next_power_of_2(d)
        _lens_prologue_kernel[(n,)](
            hidden, x, _ptr(spec, "weight", x), _ptr(spec, "bias", x), weight,
            x if bias is None else bias, x if targets is None else targets, est,
            vocab, d, hidden.stride(0), x.stride(0), weight.stride(0),
            float(spec.eps) if spec else 0.0, float(spec.weight_offset) if spec else 0.0,
            float(lens.logit_scale), softcap,
            NORM=0 if spec is None else 1 if spec.kind == "layernorm" else 2,
            HAS_NW=spec is not None and spec.weight is not None,
            HAS_NB=spec is not None and spec.bias is not None, HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap > 0, WRITE_Y=write_y, HAS_TARGETS=targets is not None,
            ROUND_BF16=x.dtype == torch.bfloat16,
            BLOCK_D=block_d, num_warps=max(1, min(16, block_d // 512)), enable_fp_fusion=True)
    return x, est


def _ptr(spec, name: str, dummy: torch.Tensor) -> torch.Tensor:
    value = None if spec is None else getattr(spec, name)
    return dummy if value is None else value.detach()

