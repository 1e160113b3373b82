"""Entropy math: Shannon and Rényi entropies, exact and streamed over vocabulary chunks.

Two ways in:

* `shannon_entropy(probs)` / `renyi_entropy(probs, alpha)` take probabilities (the seed
  library's functions), for small inputs and references.
* `OnlineEntropy` takes logits chunk by chunk (columns of the vocabulary) and keeps, per
  row, only O(1) statistics in float32, so that a (rows x vocabulary) tensor of
  probabilities is never needed. The Triton kernel runs the same recurrence per tile.

Online statistics per row, for logits z and the running maximum m (x = z - m <= 0):

    S   = sum exp(x)                       partition function, relative to m
    U   = sum exp(x) * x                   Shannon: H = log S - U / S
    D_a = sum exp(a x) - exp(x)            Rényi:   H_a = log S - log1p(D_a / S) / (a - 1)

H_a follows from log sum p^a = log(S + D_a) - a log S. Keeping D_a (instead of
sum exp(a x)) avoids the cancellation of the textbook form near a = 1: for |a - 1| < 1/2
each term is computed as exp(x) * expm1((a - 1) x), accurate to float32 precision however
close a is to 1. Special orders: a = 1 is Shannon; a = inf is -log max p = log S; a = 0 is
the log of the number of tokens (every finite logit has p > 0). When the running maximum
moves from m to m' (shift s = m - m' <= 0) the sums are rescaled:

    S <- e^s S,   U <- e^s (U + s S),   D_a <- e^(a s) D_a + (e^(a s) - e^s) S.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Beyond this distance below the maximum a token's exp(x) is < 2e-35: negligible against
# S >= 1. Clamping there keeps exp(x) * expm1(d x) from evaluating 0 * inf.
_NEGLIGIBLE_LOGIT_GAP = 80.0
# Below this |a - 1| the expm1 form is used; above it the plain difference is exact enough.
_EXPM1_BAND = 0.5


def validate_alphas(alpha: float | Sequence[float]) -> tuple[float, ...]:
    """Return the Rényi orders as a tuple of floats, or raise ValueError naming the bad one."""
    alphas = (alpha,) if isinstance(alpha, (int, float)) else tuple(alpha)
    if not alphas:
        raise ValueError("alpha must name at least one Rényi order, e.g. alpha=1.0 (Shannon)")
    checked = []
    for a in alphas:
        try:
            a = float(a)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a number >= 0 or inf, got {a!r}") from None
        if math.isnan(a) or a < 0:
            raise ValueError(
                f"alpha must be >= 0 (0 = log support size, 1 = Shannon, inf = min-entropy), "
                f"got {a}"
            )
        checked.append(a)
    if len(set(checked)) != len(checked):
        raise ValueError(f"alpha lists an order twice: {checked}")
    return tuple(checked)


def shannon_entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """H(p) = -sum p log p over `dim` (0 log 0 = 0), in float32 or the input's wider dtype."""
    p = probs if probs.dtype == torch.float64 else probs.float()
    return -torch.special.xlogy(p, p).sum(dim=dim)


def renyi_entropy(probs: torch.Tensor, alpha: float, dim: int = -1) -> torch.Tensor:
    """H_a(p) = log(sum p^a) / (1 - a) over `dim`; Shannon at a = 1, -log max p at a = inf.

    a = 0 gives the log of the support size (entries with p > 0).
    """
    (alpha,) = validate_alphas(alpha)
    p = probs if probs.dtype == torch.float64 else probs.float()
    if alpha == 1.0:
        return shannon_entropy(p, dim)
    if math.isinf(alpha):
        return -torch.log(p.amax(dim=dim))
    if alpha == 0.0:
        return torch.log((p > 0).sum(dim=dim).to(p.dtype))
    return torch.log(p.pow(alpha).sum(dim=dim)) / (1.0 - alpha)


def _tilted_gap(x: torch.Tensor, alpha: float, exp_x: torch.Tensor | None = None) -> torch.Tensor:
    """exp(alpha x) - exp(x) for x <= 0, accurate for alpha near 1 (exp_x: exp(x) if known)."""
    exp_x = torch.exp(x) if exp_x is None else exp_x
    delta = alpha - 1.0
    if abs(delta) < _EXPM1_BAND:
        return exp_x * torch.expm1(delta * x.clamp(min=-_NEGLIGIBLE_LOGIT_GAP))
    return torch.exp(alpha * x) - exp_x


def _eager_chunk_moments(logits: torch.Tensor, tilted: tuple[float, ...]):
    m = logits.amax(dim=1, keepdim=True)
    x = logits - m
    e = torch.exp(x)
    return m[:, 0], e.sum(dim=1), (e * x).sum(dim=1), tuple(
        _tilted_gap(x, a, e).sum(dim=1) for a in tilted)


# Eager torch walks a chunk once per elementwise op (max, sub, exp, sum, mul, sum); on
# CPU that costs as much again as the GEMM that made the chunk. torch.compile fuses them
# into two passes over the chunk (measured: statistics from ~1.4x to ~0.2x of the GEMM on
# SmolLM2's head, at ~1 min of one-time compilation per process), so large CPU chunks use
# it. ENTROPY_FAST_COMPILE=0 turns it off; a failed compilation falls back to eager.
_COMPILE_MIN_ELEMENTS = 1 << 20
_compiled_chunk_moments = None


def chunk_moments(logits: torch.Tensor, tilted: tuple[float, ...] = ()):
    """(m, S, U, (D_a, ...)) of one (n_rows x chunk) block, relative to its own row max m."""
    global _compiled_chunk_moments
    tilted = tuple(tilted)
    if (logits.device.type != "cpu" or logits.numel() < _COMPILE_MIN_ELEMENTS
            or os.environ.get("ENTROPY_FAST_COMPILE", "1") == "0"
            or _compiled_chunk_moments is False):
        return _eager_chunk_moments(logits, tilted)
    try:
        if _compiled_chunk_moments is None:
            _compiled_chunk_moments = torch.compile(_eager_chunk_moments, dynamic=True)
        return _compiled_chunk_moments(logits, tilted)
    except Exception as error:  # no C++ compiler, unsupported platform, ...
        warnings.warn(f"torch.compile of the lens statistics failed ({error!r:.200}); "
                      "using eager torch", stacklevel=2)
        _compiled_chunk_moments = False
        return _eager_chunk_moments(logits, tilted)


@dataclass
class LensStatistics:
    """What one pass over the vocabulary yields per row.

    entropy: (n_rows x n_alphas) float32 in nats.
    top_token: (n_rows,) int64 argmax token, when asked for.
    target_surprisal: (n_rows,) float32 -log p(target) in nats, when targets are given.
    target_rank: (n_rows,) int64 number of tokens with a larger logit, when targets are given.
    """

    entropy: torch.Tensor
    top_token: torch.Tensor | None = None
    target_surprisal: torch.Tensor | None = None
    target_rank: torch.Tensor | None = None


class OnlineEntropy:
    """Per-row running statistics over vocabulary chunks (see the module docstring).

    Feed (n_rows x chunk) float32 logits with `update`, in vocabulary order, then call
    `finalize`. Memory is O(n_rows x n_alphas) whatever the vocabulary size.

    Target statistics need `targets` (n_rows,) token ids and `target_logit_estimate`
    (n_rows,): the target's logit computed up front (one dot product per row), so that its
    rank can be counted in the same single pass. The surprisal uses the exact logit of the
    chunk; the rank counts the other tokens whose logit exceeds the estimate.
    """

    def __init__(
        self,
        alphas: Sequence[float],
        targets: torch.Tensor | None = None,
        target_logit_estimate: torch.Tensor | None = None,
        track_argmax: bool = False,
    ) -> None:
        self.alphas = tuple(alphas)
        self._tilted = [a for a in self.alphas if a != 1.0 and not math.isinf(a)]
        self.targets = targets
        self.target_logit_estimate = target_logit_estimate
        self.track_argmax = track_argmax
        self._offset = 0
        self.m: torch.Tensor | None = None

    def update(self, logits: torch.Tensor) -> None:
        """Fold one (n_rows x chunk) block of float32 logits into the statistics."""
        m_chunk, s_chunk, u_chunk, d_chunk = chunk_moments(logits, self._tilted)
        argmax_chunk = logits.argmax(dim=1) if self.track_argmax else None
        self._track_tokens(logits, m_chunk, argmax_chunk)
        if self.m is None:
            self.m, self.s, self.u, self.d = m_chunk, s_chunk, u_chunk, list(d_chunk)
        else:  # both sides move to the common maximum (one of the shifts is 0)
            m_new = torch.maximum(self.m, m_chunk)
            old, new = self.m - m_new, m_chunk - m_new
            self.d = [
                torch.exp(a * old) * d + _tilted_gap(old, a) * self.s
                + torch.exp(a * new) * dc + _tilted_gap(new, a) * s_chunk
                for a, d, dc in zip(self._tilted, self.d, d_chunk, strict=True)
            ]
            self.u = (torch.exp(old) * (self.u + old * self.s)
                      + torch.exp(new) * (u_chunk + new * s_chunk))
            self.s = torch.exp(old) * self.s + torch.exp(new) * s_chunk
            self.m = m_new
        self._offset += logits.shape[1]

    def _track_tokens(self, logits, m_chunk, argmax_chunk) -> None:
        if self.track_argmax:
            argmax_chunk = argmax_chunk + self._offset
            if self.m is None:
                self.argmax = argmax_chunk
            else:  # strict: the first maximal token wins, as in torch.argmax
                self.argmax = torch.where(m_chunk > self.m, argmax_chunk, self.argmax)
        if self.targets is None:
            return
        columns = torch.arange(self._offset, self._offset + logits.shape[1],
                               device=logits.device)
        is_target = columns[None, :] == self.targets[:, None]
        above = (logits > self.target_logit_estimate[:, None]) & ~is_target
        self.rank = above.sum(dim=1) + (0 if self.m is None else self.rank)
        exact = (logits * is_target).sum(dim=1)
        self.target_logit = exact + (0 if self.m is None else self.target_logit)

    def finalize(self) -> LensStatistics:
        """Turn the running sums into entropies (and the optional token statistics)."""
        if self.m is None:
            raise ValueError("no logits were given: the vocabulary is empty")
        log_s = torch.log(self.s)
        tilted = dict(zip(self._tilted, self.d, strict=True))
        columns = []
        for a in self.alphas:
            if a == 1.0:
                columns.append(log_s - self.u / self.s)
            elif math.isinf(a):
                columns.append(log_s)
            else:
                columns.append(log_s - torch.log1p(tilted[a] / self.s) / (a - 1.0))
        stats = LensStatistics(entropy=torch.stack(columns, dim=1))
        if self.track_argmax:
            stats.top_token = self.argmax
        if self.targets is not None:
            stats.target_surprisal = log_s - (self.target_logit - self.m)
            stats.target_rank = self.rank
        return stats
