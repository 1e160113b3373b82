"""Fused logit lens: final norm -> lm_head -> online softmax sums, one sweep of the vocabulary.

Per row r and token v the logit is z = t((x_r . W_v + b_v) * scale), where x_r is the
normed row, b the head bias and t the soft-cap c * tanh(. / c) (identity without one).
Nothing of size (rows x vocabulary) is written: each program owns BLOCK_N rows and one
split of the vocabulary, computes BLOCK_N x BLOCK_V logit tiles with tl.dot (bf16/fp16
operands, fp32 accumulation; fp32 operands use "ieee" precision, never tf32) and folds
every tile into per-row fp32 sums, in base 2 (z2 = z * log2 e, so exp is exp2):

    m  running max of z2            x = z2 - m <= 0,  e = 2^x
    S  = sum e                      U = sum e x       D_a = sum 2^(a x) - e

When the max moves by s = m_old - m_new <= 0 (r = 2^s) the sums are rescaled:

    S <- r S,   U <- r (U + s S),   D_a <- 2^(a s) D_a + (2^(a s) - r) S.

Near a = 1 (|a - 1| < entropy.EXPM1_BAND) the gap terms are computed as
e * expm1((a - 1) x ln 2), so orders 0.999 and 1.001 are as accurate as any other; a = 2
uses e * e (no second exp); a = 1, inf and 0 need no D at all. x is clamped at
entropy.NEGLIGIBLE_LOGIT_GAP (in bits) wherever it multiplies e, so e * x is 0, not nan,
past the vocabulary's end. Each program writes its split's sums (m, S, U, D_a x 4 in
fp32; argmax and the rank count in int32); the launcher returns them as entropy.Partials
(one part per split, float64, m and U in nats), and entropy.finalize merges the splits and
computes H_1, H_a, H_inf, H_0, the argmax, surprisal and rank for both lens backends.

The final norm (LayerNorm, RMSNorm, Gemma's 1 + w) runs in a one-row-per-program
prologue (lens_prologue.py) in fp32 that writes the normed rows once in the head's dtype
(N x d, a few percent of the matmul's time at most) and, for targets, their exact logit.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from entropy_fast.entropy import (
    EXPM1_BAND,
    NEGLIGIBLE_LOGIT_GAP,
    NO_TOKEN,
    Partials,
    tilted_orders,
)
from entropy_fast.kernels.lens_prologue import _tanh, prepare_rows

LOG2E = 1.0 / math.log(2.0)
# Runtime scalars and constexprs never lead a product with a tensor: the interpreter passes
# scalars as Python floats, and constexpr * tensor is not a tensor there.
GAP2 = tl.constexpr(NEGLIGIBLE_LOGIT_GAP * LOG2E)  # the same clamp, in bits
_MAX_TILTED = 4  # D_a slots per launch; more orders take more launches
_UNUSED, _GENERAL, _NEAR_ONE, _SQUARE = 0, 1, 2, 3


@triton.jit
def _expm1(y):
    """exp(y) - 1: degree-8 Taylor for |y| < 1/2 (relative error < 1e-8), exp(y) - 1 beyond."""
    t = 1.0 + y * 0.125
    t = 1.0 + y * 0.14285714285714285 * t
    t = 1.0 + y * 0.16666666666666666 * t
    t = 1.0 + y * 0.2 * t
    t = 1.0 + y * 0.25 * t
    t = 1.0 + y * 0.3333333333333333 * t
    t = 1.0 + y * 0.5 * t
    return tl.where((y < 0.5) & (y > -0.5), y * t, tl.exp(y) - 1.0)


@triton.jit
def _fold_tilted(d, a, x, xc, e, s, r, s_old, KIND: tl.constexpr):
    """One order's D_a: rescale to the new max, add this tile's sum of 2^(a x) - 2^x."""
    if KIND == 1:
        p = tl.exp2(s * a)
        d = p * d + (p - r) * s_old + tl.sum(tl.exp2(x * a) - e, axis=1)
    elif KIND == 2:
        dl = (a - 1.0) * 0.6931471805599453  # (a - 1) ln 2: x is in bits
        sc = tl.maximum(s, -GAP2)
        gap = tl.exp2(sc) * _expm1(sc * dl)
        d = tl.exp2(s * a) * d + gap * s_old + tl.sum(e * _expm1(xc * dl), axis=1)
    elif KIND == 3:
        d = r * r * d + (r * r - r) * s_old + tl.sum(e * e - e, axis=1)
    return d


@triton.jit
def _head_ptrs(W, v0, V, stride_wv, ks, BLOCK_V: tl.constexpr, TMA: tl.constexpr):
    """(BLOCK_K x BLOCK_V) pointers to W[v0:v0+BLOCK_V, 0:BLOCK_K]^T, rows clamped to V - 1
    (with TMA, W is a tensor descriptor and addresses itself)."""
    if TMA:
        ptrs = W
    else:
        cols_c = tl.minimum(v0 + tl.arange(0, BLOCK_V), V - 1).to(tl.int64)
        ptrs = W + cols_c[None, :] * stride_wv + ks[:, None]
    return ptrs


@triton.jit
def _dot_step(acc, a_ptrs, w_ptrs, row0, v0, ks, k0, D, EVEN_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """acc += X[rows, k0:k0+BLOCK_K] @ W[cols, k0:k0+BLOCK_K]^T, fp32 accumulation.

    TMA: a_ptrs and w_ptrs are the tensor descriptors of X and W; the copy engine fetches
    whole tiles at (row0, k0) and (v0, k0), zeros past every edge, so threads hold no
    per-element addresses.
    """
    if TMA:
        a = a_ptrs.load([row0, k0])
        w = w_ptrs.load([v0, k0]).T
    elif EVEN_D:
        a = tl.load(a_ptrs + k0)
        w = tl.load(w_ptrs + k0)
    else:
        a = tl.load(a_ptrs + k0, mask=(k0 + ks)[None, :] < D, other=0.0)
        w = tl.load(w_ptrs + k0, mask=(k0 + ks)[:, None] < D, other=0.0)
    if UPCAST:  # the interpreter mis-reads bf16 unless converted right after the load
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, acc, input_precision=PRECISION)


@triton.jit
def _fold_tile(acc, v0, HB, V, in_scale, out_scale, a0, a1, a2, a3, tgt, est2,
               m, s_sum, u_sum, d0, d1, d2, d3, best, above, top_v, top_i,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_V: tl.constexpr,
               K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
               WITH_ARGMAX: tl.constexpr, HAS_TARGETS: tl.constexpr, TOP_K: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Epilogue of one BLOCK_N x BLOCK_V logit tile: fold it into the running statistics.

    Logits in bits: out_scale * tanh(in_scale * (acc + b)) with a soft-cap (in_scale =
    scale / cap, out_scale = cap log2 e), else out_scale * (acc + b) (out_scale = scale
    log2 e > 0), whose scaling is deferred to one FMA (x = z out_scale - m): a positive
    scale commutes with max, argmax and comparisons (est2 comes in z's units).
    """
    cols = v0 + tl.arange(0, BLOCK_V)
    z = acc
    if HAS_BIAS:  # 1. head bias and soft-cap
        z += tl.load(HB + tl.minimum(cols, V - 1)).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = _tanh(z * in_scale) * out_scale
    if not EVEN_V:  # 2. columns past V: 2^-inf = 0 contributes nothing anywhere
        z = tl.where((cols < V)[None, :], z, float("-inf"))
    if HAS_SOFTCAP:  # noqa: SIM108 (constexpr branch)
        m_tile = tl.max(z, axis=1)
    else:
        m_tile = tl.max(z, axis=1) * out_scale
    if WITH_ARGMAX:  # strict >: the first maximal token wins, as torch.argmax
        best = tl.where(m_tile > m, tl.argmax(z, axis=1).to(tl.int32) + v0, best)
    if HAS_TARGETS:
        hit = (z > est2[:, None]) & (cols[None, :] != tgt[:, None])
        above += tl.sum(hit.to(tl.int32), axis=1)
    if TOP_K > 0:
        top_v, top_i = _fold_top_k(z, cols, top_v, top_i, TOP_K)
    m_new = tl.maximum(m, m_tile)  # 3. online rescaling (module docstring)
    s = m - m_new
    r = tl.exp2(s)
    if HAS_SOFTCAP:  # noqa: SIM108 (constexpr branch)
        x = z - m_new[:, None]
    else:
        x = z * out_scale - m_new[:, None]
    e = tl.exp2(x)
    xc = tl.maximum(x, -GAP2)  # finite where x = -inf, so e * xc = 0, not nan
    if EVEN_V:  # noqa: SIM108 (constexpr branches, not ternaries): no -inf anywhere: U needs no clamp
        xc_u = x
    else:
        xc_u = xc
    d0 = _fold_tilted(d0, a0, x, xc, e, s, r, s_sum, K0)
    d1 = _fold_tilted(d1, a1, x, xc, e, s, r, s_sum, K1)
    d2 = _fold_tilted(d2, a2, x, xc, e, s, r, s_sum, K2)
    d3 = _fold_tilted(d3, a3, x, xc, e, s, r, s_sum, K3)
    u_sum = r * (u_sum + s * s_sum) + tl.sum(e * xc_u, axis=1)
    s_sum = r * s_sum + tl.sum(e, axis=1)
    return m_new, s_sum, u_sum, d0, d1, d2, d3, best, above, top_v, top_i


@triton.jit
def _fold_top_k(z, cols, top_v, top_i, TOP_K: tl.constexpr):
    """Merge a tile's logits z (BLOCK_N x BLOCK_V, tokens `cols`) into each row's running
    top-k (top_v, top_i: BLOCK_N x K_PAD; slots >= TOP_K hold +inf and are never
    replaced). The running set is unordered; a token enters by replacing the worst one (the
    smallest value, ties: the highest id). Tiles come in token order, so a later token
    that ties the worst never enters (lower id first); within the tile the largest enter
    first, ties lowest column first. Only as many rounds as the most tokens any row has
    above its worst (at most TOP_K): after the first tiles a peaked row has none."""
    worst = tl.min(top_v, axis=1)
    rounds = tl.minimum(tl.max(tl.sum((z > worst[:, None]).to(tl.int32), axis=1)), TOP_K)
    for _ in range(0, rounds):
        best = tl.max(z, axis=1)
        col = tl.min(tl.where(z == best[:, None], cols[None, :], 2147483647), axis=1)
        worst = tl.min(top_v, axis=1)
        worst_id = tl.max(tl.where(top_v == worst[:, None], top_i, -1), axis=1)
        slot = (top_i == worst_id[:, None]) & (best > worst)[:, None]
        top_v = tl.where(slot, best[:, None], top_v)
        top_i = tl.where(slot, col[:, None], top_i)
        z = tl.where(cols[None, :] == col[:, None], float("-inf"), z)
    return top_v, top_i


@triton.jit
def _lens_entropy_kernel(
    X, W, HB, TGT, EST, PF, PI, PT, PTI, N, V, D, stride_xn, stride_wv, tiles_per_split,
    n_splits, in_scale, out_scale, a0, a1, a2, a3,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_V: tl.constexpr,
    EVEN_D: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    K3: tl.constexpr, WITH_ARGMAX: tl.constexpr, HAS_TARGETS: tl.constexpr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, FLAT: tl.constexpr, TMA: tl.constexpr,
    GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial statistics of BLOCK_N rows over one vocabulary split.

    X (N x D) normed rows and W (V x D) head (pointers, or tensor descriptors with TMA), HB
    (V,) head bias, TGT (N,) int64 targets and EST (N,) fp32 target logits in nats; writes
    PF (n_splits x 7 x N) fp32 = m (bits), S, U (bits), D_a x 4 and PI (n_splits x 2 x N)
    int32 = argmax, rank count; with TOP_K, PT (n_splits x N x TOP_K) fp32 the split's
    TOP_K largest logits (bits, unordered) and PTI their int32 tokens.
    """
    # Grouped order: GROUP_N row blocks x all splits run together, so the head tiles of a
    # split and the rows of a group stay in L2.
    pid = tl.program_id(0)
    group = GROUP_N * n_splits
    first = (pid // group) * GROUP_N
    group_rows = tl.minimum(tl.cdiv(N, BLOCK_N) - first, GROUP_N)
    row_block = first + (pid % group) % group_rows
    split = (pid % group) // group_rows

    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)  # clamped: no row masks in the main loop
    ks = tl.arange(0, BLOCK_K)
    if TMA:  # noqa: SIM108 (constexpr branch: a descriptor addresses itself)
        a_ptrs = X
    else:
        a_ptrs = X + rows_c[:, None] * stride_xn + ks[None, :]
    v_first = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_first + tiles_per_split * BLOCK_V, V)

    m = tl.full([BLOCK_N], -1e30, tl.float32)  # finite, so the first rescale is 0 * finite
    s_sum = tl.zeros([BLOCK_N], tl.float32)
    u_sum = tl.zeros([BLOCK_N], tl.float32)
    d0 = tl.zeros([BLOCK_N], tl.float32)
    d1 = tl.zeros([BLOCK_N], tl.float32)
    d2 = tl.zeros([BLOCK_N], tl.float32)
    d3 = tl.zeros([BLOCK_N], tl.float32)
    best = tl.zeros([BLOCK_N], tl.int32)
    above = tl.zeros([BLOCK_N], tl.int32)
    tgt = tl.zeros([BLOCK_N], tl.int64)
    est2 = tl.zeros([BLOCK_N], tl.float32)
    slots = tl.arange(0, K_PAD)
    # slots < TOP_K start empty (-inf, distinct ids past V); the padding slots never change
    top_v = tl.where(slots < TOP_K, float("-inf"), float("inf"))[None, :] + \
        tl.zeros([BLOCK_N, K_PAD], tl.float32)
    top_i = (V + slots)[None, :] + tl.zeros([BLOCK_N, K_PAD], tl.int32)
    if HAS_TARGETS:
        tgt = tl.load(TGT + rows_c)
        est2 = tl.load(EST + rows_c) * 1.4426950408889634  # bits, then z's units
        if not HAS_SOFTCAP:
            est2 = est2 / out_scale
    k_steps = tl.cdiv(D, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if FLAT:  # one loop over (tile, k step): the load pipeline runs across tile boundaries
        for it in range(0, tl.cdiv(v_end - v_first, BLOCK_V) * k_steps):
            tile = it // k_steps
            ki = it - tile * k_steps
            v0 = v_first + tile * BLOCK_V
            w_ptrs = _head_ptrs(W, v0, V, stride_wv, ks, BLOCK_V, TMA)
            acc = _dot_step(acc, a_ptrs, w_ptrs, row_block * BLOCK_N, v0, ks, ki * BLOCK_K, D,
                            EVEN_D, UPCAST, PRECISION, TMA)
            if ki == k_steps - 1:
                m, s_sum, u_sum, d0, d1, d2, d3, best, above, top_v, top_i = _fold_tile(
                    acc, v0, HB, V, in_scale, out_scale, a0, a1, a2, a3, tgt, est2, m, s_sum, u_sum,
                    d0, d1, d2, d3, best, above, top_v, top_i, HAS_BIAS, HAS_SOFTCAP, EVEN_V,
                    K0, K1, K2, K3, WITH_ARGMAX, HAS_TARGETS, TOP_K, BLOCK_V)
                acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    else:
        for v0 in range(v_first, v_end, BLOCK_V):
            w_ptrs = _head_ptrs(W, v0, V, stride_wv, ks, BLOCK_V, TMA)
            for ki in range(0, k_steps):
                acc = _dot_step(acc, a_ptrs, w_ptrs, row_block * BLOCK_N, v0, ks, ki * BLOCK_K,
                                D, EVEN_D, UPCAST, PRECISION, TMA)
            m, s_sum, u_sum, d0, d1, d2, d3, best, above, top_v, top_i = _fold_tile(
                acc, v0, HB, V, in_scale, out_scale, a0, a1, a2, a3, tgt, est2, m, s_sum, u_sum,
                d0, d1, d2, d3, best, above, top_v, top_i, HAS_BIAS, HAS_SOFTCAP, EVEN_V,
                K0, K1, K2, K3, WITH_ARGMAX, HAS_TARGETS, TOP_K, BLOCK_V)
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)

    ok = rows < N
    pf = PF + split.to(tl.int64) * 7 * N + rows
    tl.store(pf, m, mask=ok)
    tl.store(pf + N, s_sum, mask=ok)
    tl.store(pf + 2 * N, u_sum, mask=ok)
    tl.store(pf + 3 * N, d0, mask=ok)
    tl.store(pf + 4 * N, d1, mask=ok)
    tl.store(pf + 5 * N, d2, mask=ok)
    tl.store(pf + 6 * N, d3, mask=ok)
    pi = PI + split.to(tl.int64) * 2 * N + rows
    tl.store(pi, best, mask=ok)
    tl.store(pi + N, above, mask=ok)
    if TOP_K > 0:
        if not HAS_SOFTCAP:  # to bits, as m
            top_v = top_v * out_scale
        at = split.to(tl.int64) * N * TOP_K + rows[:, None].to(tl.int64) * TOP_K + slots[None, :]
        kept = ok[:, None] & (slots < TOP_K)[None, :]
        tl.store(PT + at, top_v, mask=kept)
        tl.store(PTI + at, top_i, mask=kept)


@dataclass(frozen=True)
class KernelConfig:
    """Tiles and launch options; fixed and measured (bench/bench_kernel.py), never autotuned.

    n_splits: vocabulary splits per row block (None: enough programs to fill the GPU).
    flat: one (tile, k) loop instead of nested loops (pipelines across tile boundaries).
    tma: fetch operand tiles with tensor descriptors (Hopper's copy engine); bf16/fp16
    operands with 16-byte aligned rows on sm_90+ only, others fall back to pointers.
    """

    block_n: int = 128
    block_v: int = 256
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 8
    n_splits: int | None = None
    flat: bool = False
    tma: bool = False


def default_config(device: torch.device, dtype: torch.dtype, *, n_orders: int = 0,
                   with_argmax: bool = False, has_targets: bool = False,
                   top_k: int = 0) -> KernelConfig:
    """The default tiles for a device, operand dtype and set of statistics.

    Interpreter: few large tiles. fp32 ("ieee" dot): small tiles that fit shared memory.
    bf16/fp16: 128 x 256 tiles, which on sm_90 keep Shannon plus two orders in registers;
    beyond that (argmax, targets, more orders, top-k: 342 spilled stores at k=10) their tile
    epilogue spills 100-2500 instructions there, 128 x 128 tiles none or a tenth
    (bench/results_kernel_resources.md; top-k: 242 registers, no spills);
    those use ~255 registers, one block per SM, so a fourth pipeline stage costs nothing.
    """
    if device.type != "cuda":
        return KernelConfig(block_n=64, block_v=256, block_k=64, num_warps=4, num_stages=1,
                            n_splits=2)
    if dtype == torch.float32:
        return KernelConfig(block_n=64, block_v=128, block_k=32, num_warps=4, num_stages=2)
    if with_argmax or has_targets or top_k or n_orders > 2:
        return KernelConfig(block_v=128, num_stages=4)
    return KernelConfig()


_SM_COUNT: dict[int, int] = {}


def _n_splits(cfg: KernelConfig, device: torch.device, n_row_blocks: int, n_tiles: int) -> int:
    want = cfg.n_splits
    if want is None:
        if device.index not in _SM_COUNT:
            _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
        sms = _SM_COUNT[device.index]
        want = max(triton.cdiv(sms, min(cfg.group_n, n_row_blocks)),
                   triton.cdiv(2 * sms, n_row_blocks))
    per_split = triton.cdiv(n_tiles, max(1, min(want, n_tiles)))
    return triton.cdiv(n_tiles, per_split)  # every split holds >= 1 tile


def _operands(cfg: KernelConfig, x: torch.Tensor, weight: torch.Tensor):
    """(cfg, x, weight) as the kernel takes them: tensor descriptors when cfg.tma, else
    pointers, with cfg.tma off where TMA cannot serve: fp32 operands, rows or bases that
    are not 16-byte aligned, GPUs before Hopper (Triton would lower the descriptors to
    plain loads there, and spill), Triton without host descriptors (< 3.4)."""
    if not cfg.tma:
        return cfg, x, weight
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return replace(cfg, tma=False), x, weight
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
                  and t.stride(1) == 1 for t in (x, weight))
    before_hopper = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9
    if x.dtype == torch.float32 or not aligned or before_hopper:
        return replace(cfg, tma=False), x, weight
    return (cfg, TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [cfg.block_n, cfg.block_k]),
            TensorDescriptor(weight, list(weight.shape), [weight.stride(0), 1],
                             [cfg.block_v, cfg.block_k]))


def _kind(a: float) -> int:
    return _SQUARE if a == 2.0 else _NEAR_ONE if abs(a - 1.0) < EXPM1_BAND else _GENERAL


def specialization(cfg: KernelConfig, orders: list[float], dtype: torch.dtype, vocab: int,
                   d: int, *, has_bias: bool, has_softcap: bool, with_argmax: bool,
                   has_targets: bool, top_k: int = 0, interpret: bool = False) -> dict:
    """The kernel's constexpr arguments for one launch (at most _MAX_TILTED orders)."""
    kinds = [_kind(a) for a in orders] + [_UNUSED] * (_MAX_TILTED - len(orders))
    return dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, EVEN_V=vocab % cfg.block_v == 0,
                EVEN_D=d % cfg.block_k == 0, K0=kinds[0], K1=kinds[1], K2=kinds[2], K3=kinds[3],
                WITH_ARGMAX=with_argmax, HAS_TARGETS=has_targets, TOP_K=top_k,
                K_PAD=triton.next_power_of_2(max(top_k, 1)), UPCAST=interpret,
                PRECISION="ieee" if dtype == torch.float32 else "tf32", FLAT=cfg.flat,
                TMA=cfg.tma, GROUP_N=cfg.group_n, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
                BLOCK_K=cfg.block_k)


def _check_operands(x: torch.Tensor, weight: torch.Tensor, vectors: dict, norm: str | None,
                    logit_scale: float, softcap: float | None) -> None:
    """Raise ValueError unless the operands fit a launch. vectors: name -> (tensor, length)."""
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1] or (
            x.device != weight.device):
        raise ValueError(f"rows {tuple(x.shape)} on {x.device} do not fit the head "
                         f"{tuple(weight.shape)} on {weight.device}: need (n x d) and (V x d)")
    for name, (tensor, length) in vectors.items():
        if tensor is not None and (tensor.shape != (length,) or tensor.device != x.device):
            raise ValueError(f"{name} must be ({length},) on {x.device}, got "
                             f"{tuple(tensor.shape)} on {tensor.device}")
    if norm not in (None, "layernorm", "rmsnorm"):
        raise ValueError(f"norm must be None, 'layernorm' or 'rmsnorm', got {norm!r}")
    if not logit_scale > 0 or not (softcap is None or softcap > 0):
        raise ValueError(f"the kernel needs logit_scale > 0 and softcap > 0 or None, got "
                         f"{logit_scale} and {softcap}; use backend='torch'")


def lens_entropy_partials(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
    norm: str | None = None, norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None, norm_eps: float = 1e-5, norm_offset: float = 0.0,
    logit_scale: float = 1.0, softcap: float | None = None, alphas: Sequence[float] = (1.0,),
    targets: torch.Tensor | None = None, with_argmax: bool = False, top_k: int = 0,
    config: KernelConfig | None = None,
) -> Partials:
    """Per-split online-softmax sums of the lens distributions of rows x, in one sweep.

    x: (n x d) rows, pre-norm when `norm` names the final norm ("layernorm" or "rmsnorm":
    (x - mean) / sqrt(var + norm_eps) * (norm_weight + norm_offset) + norm_bias, without
    the centering for "rmsnorm"; norm_offset 1 for Gemma), else already normed.
    weight: (V x d) head; bias: (V,) head bias. Logits z = softcap tanh(logit_scale
    (x W^T + bias) / softcap), no tanh when softcap is None. alphas: Rényi orders as
    entropy.validate_alphas returns them; every four beyond 0, 1 and inf take one sweep,
    whose D_a share the first sweep's m, S and U (the same logits, the same arithmetic).
    targets: (n,) token ids for the rank count and target logits (those outside [0, V)
    count nothing useful: finalize masks them); with_argmax: each split's first argmax;
    top_k: each split's top_k largest logits and their tokens (ties: lower id first).

    Returns entropy.Partials with one part per vocabulary split (float64, nats);
    entropy.finalize(partials, alphas, targets) gives the entropies and token statistics.
    """
    _check_operands(x, weight, {"bias": (bias, weight.shape[0]),
                                "norm_weight": (norm_weight, x.shape[-1]),
                                "norm_bias": (norm_bias, x.shape[-1]),
                                "targets": (targets, x.shape[0])}, norm, logit_scale, softcap)
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    if targets is not None:
        targets = targets.to(torch.int64).contiguous()
    orders = tilted_orders(alphas)
    device, n, vocab = x.device, x.shape[0], weight.shape[0]
    cfg = config or default_config(device, weight.dtype, n_orders=len(orders),
                                   with_argmax=with_argmax, has_targets=targets is not None,
                                   top_k=top_k)
    groups = [orders[i:i + _MAX_TILTED] for i in range(0, len(orders), _MAX_TILTED)] or [()]
    if n == 0:
        return _to_partials([torch.zeros(1, 7, 0, device=device)] * len(groups),
                            torch.zeros(1, 2, 0, dtype=torch.int32, device=device), groups,
                            vocab, torch.zeros(0, device=device), with_argmax, targets,
                            _top_buffers(1, 0, top_k, device))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        # 1. prologue: the final norm applied once, rows in the head's dtype; target logits
        rows, target_logit = prepare_rows(
            x, weight, bias, targets, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
            norm_eps=norm_eps, norm_offset=norm_offset, logit_scale=logit_scale,
            softcap=softcap)
        # 2. sweep(s): sums per (row block, vocabulary split); argmax and targets in the first
        n_splits = _n_splits(cfg, device, triton.cdiv(n, cfg.block_n),
                             triton.cdiv(vocab, cfg.block_v))
        top = _top_buffers(n_splits, n, top_k, device)
        sweeps = [_sweep(cfg, rows, weight, bias, targets if g == 0 else None, target_logit,
                         group, n_splits, logit_scale=logit_scale, softcap=softcap,
                         with_argmax=with_argmax and g == 0, top=top if g == 0 else None)
                  for g, group in enumerate(groups)]
    return _to_partials([pf for pf, _ in sweeps], sweeps[0][1], groups, vocab, target_logit,
                        with_argmax, targets, top)


def _top_buffers(n_splits: int, n: int, top_k: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, ids) buffers of each split's top_k, (n_splits x n x top_k); None for 0."""
    if not top_k:
        return None
    return (torch.empty((n_splits, n, top_k), device=device, dtype=torch.float32),
            torch.empty((n_splits, n, top_k), device=device, dtype=torch.int32))


def _sweep(cfg: KernelConfig, rows: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None, targets: torch.Tensor | None, target_logit: torch.Tensor,
           orders: tuple[float, ...], n_splits: int, *, logit_scale: float,
           softcap: float | None, with_argmax: bool,
           top: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of the vocabulary sweep over normed rows (n x d) for up to four orders:
    (n_splits x 7 x n) fp32 sums (m and U in bits) and (n_splits x 2 x n) int32 (argmax,
    rank count); `top` (values in bits, ids) is filled when given. The sums of m, S and U
    do not depend on the orders, argmax, targets or top-k."""
    (n, d), vocab = rows.shape, weight.shape[0]
    pf = torch.empty((n_splits, 7, n), device=rows.device, dtype=torch.float32)
    pi = torch.empty((n_splits, 2, n), device=rows.device, dtype=torch.int32)
    in_scale = logit_scale / softcap if softcap else 1.0
    out_scale = (softcap if softcap else logit_scale) * LOG2E
    n_tiles = triton.cdiv(vocab, cfg.block_v)
    cfg, x_operand, w_operand = _operands(cfg, rows, weight)
    interpret = rows.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    top_values, top_ids = (pf, pi) if top is None else top
    _lens_entropy_kernel[(triton.cdiv(n, cfg.block_n) * n_splits,)](
        x_operand, w_operand, weight if bias is None else bias,
        pi if targets is None else targets, target_logit, pf, pi, top_values, top_ids, n, vocab, d,
        rows.stride(0), weight.stride(0), triton.cdiv(n_tiles, n_splits), n_splits,
        in_scale, out_scale, *orders, *[0.0] * (_MAX_TILTED - len(orders)),
        **specialization(cfg, list(orders), weight.dtype, vocab, d, has_bias=bias is not None,
                         has_softcap=bool(softcap), with_argmax=with_argmax,
                         has_targets=targets is not None,
                         top_k=0 if top is None else top[0].shape[2], interpret=interpret),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    return pf, pi


def _to_partials(pfs: list[torch.Tensor], pi: torch.Tensor, groups: list[tuple[float, ...]],
                 vocab: int, target_logit: torch.Tensor, with_argmax: bool,
                 targets: torch.Tensor | None,
                 top: tuple[torch.Tensor, torch.Tensor] | None = None) -> Partials:
    """The sweeps' sums (one (splits x 7 x n) tensor per group of orders, the argmax and
    rank counts of the first, the top-k of each split) as entropy.Partials: float64, m, U
    and the top values in nats."""
    first, ln2 = pfs[0].double(), math.log(2.0)
    top_values = top_ids = None
    if top is not None:  # empty slots (ids past V, a split with fewer tokens) as the torch path's
        top_values, top_ids = top[0].double() * ln2, top[1].long()
        top_ids = torch.where(top_ids < vocab, top_ids, NO_TOKEN)
    return Partials(
        m=first[:, 0] * ln2, s=first[:, 1], u=first[:, 2] * ln2,
        d=tuple(pf[:, 3 + j].double() for pf, group in zip(pfs, groups, strict=True)
                for j in range(len(group))),
        orders=tuple(a for group in groups for a in group), vocab=vocab,
        top=pi[:, 0].long() if with_argmax else None,
        above=None if targets is None else pi[:, 1].long(),
        target_logit=None if targets is None else target_logit,
        top_values=top_values, top_ids=top_ids)
