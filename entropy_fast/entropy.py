"""Entropy math of both lens backends: per-part online-softmax sums, their merge, entropies.

Two ways in:

* `shannon_entropy(probs)` / `renyi_entropy(probs, alpha)` take probabilities (the seed
  library's functions), for small inputs and references.
* `Partials`: per-row sums over parts of the vocabulary, each relative to its part's own
  maximum. The torch backend makes one part per logit chunk (`chunk_partials`), the Triton
  kernel (kernels/lens_entropy.py) one per vocabulary split; `finalize` merges the parts
  and turns the sums into entropies, the argmax token and the targets' surprisal and rank.
  Memory is O(parts x rows): a (rows x vocabulary) tensor is never needed.

For the logits z of one part and its maximum m (x = z - m <= 0, nats):

    S   = sum exp(x)                       partition function, relative to m
    U   = sum exp(x) * x                   Shannon: H_1 = log S - U / S
    D_a = sum exp(a x) - exp(x)            Rényi:   H_a = log S - log1p(D_a / S) / (a - 1)

H_a follows from log sum p^a = log(S + D_a) - a log S. Keeping D_a (instead of
sum exp(a x)) avoids the cancellation of the textbook form near a = 1: for
|a - 1| < EXPM1_BAND each term is computed as exp(x) * expm1((a - 1) x), accurate to
float32 precision however close a is to 1. Special orders need no D_a: a = 1 is Shannon;
a = inf is -log max p = log S; a = 0 is log V (every finite logit has p > 0). Parts merge
at the common maximum M: with shift s = m - M <= 0 per part,

    S = sum_parts e^s S,   U = sum_parts e^s (U + s S),
    D_a = sum_parts e^(a s) D_a + (e^(a s) - e^s) S.

KL to the final layer. Rows may come as G layer groups of the same n tokens, the last
group the final layer L (the model's own distribution). Logits linear in the normed rows
(no soft-cap) give it without another pass over every row: `linear_kl_to_final`. For
the others (soft-capped), online: with x_L and x the logits of the token at L and at the
row's layer, each relative to its own maximum, and S_L, S their partition functions,

    T  = sum exp(x_L) (x_L - x)            KL(p_L || p) = T / S_L - log S_L + log S,

and parts merge with s_L = m_L - M_L and s = m - M as U does: T = sum_parts
e^(s_L) (T + (s_L - s) S_L). The final layer's own rows get T = 0 and S_L = S exactly:
their KL is 0, not a rounding residue. T needs the final layer's logits of each
vocabulary chunk once per token block, shared by every layer of those tokens.

Top-k. Each part keeps its k largest logits and their token ids (`RunningTopK` keeps
them over the torch backend's chunks); merging keeps the k largest of all parts. Ties
rank the lower token id first, within a part and across parts alike, so both backends
give the same ids whatever their part boundaries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from entropy_fast.settings import validate_alphas

# Beyond this distance below the maximum a token's exp(x) is < 2e-35: negligible against
# S >= 1. Clamping there keeps exp(x) * expm1(d x) from evaluating 0 * inf. The kernel
# clamps at the same distance (in bits).
NEGLIGIBLE_LOGIT_GAP = 80.0
# Below this |a - 1| the expm1 form is used; above it the plain difference is exact enough.
# The kernel picks its near-1 branch by the same band.
EXPM1_BAND = 0.5


def tilted_orders(alphas: Sequence[float]) -> tuple[float, ...]:
    """The orders that need their own sum D_a: all but 0, 1 and inf."""
    return tuple(a for a in alphas if a not in (0.0, 1.0) and not math.isinf(a))


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


def tilted_gap(x: torch.Tensor, alpha: float, exp_x: torch.Tensor | None = None) -> torch.Tensor:
    """exp(alpha x) - exp(x) for x <= 0, accurate for alpha near 1 (exp_x: exp(x) if known)."""
    exp_x = torch.exp(x) if exp_x is None else exp_x
    delta = alpha - 1.0
    if abs(delta) < EXPM1_BAND:
        return exp_x * torch.expm1(delta * x.clamp(min=-NEGLIGIBLE_LOGIT_GAP))
    return torch.exp(alpha * x) - exp_x


@dataclass
class LensStatistics:
    """What one pass over the vocabulary yields per row.

    entropy: (n_rows x n_alphas) float32 in nats.
    top_token: (n_rows,) int64 argmax token, when asked for.
    target_surprisal: (n_rows,) float32 -log p(target) in nats, when targets are given
        (nan where a target is outside [0, V)).
    target_rank: (n_rows,) int64 number of other tokens with a larger logit, when targets
        are given (-1 where a target is outside [0, V)).
    top_tokens: (n_rows x k) int64, the k most probable tokens, most probable first (ties:
        lower token id first), when asked for.
    top_probs: (n_rows x k) float32, their probabilities.
    kl_to_final: (n_rows,) float32 KL(p_L || p) in nats to the final layer's distribution
        of the same token, when asked for (0 at the final layer itself).
    """

    entropy: torch.Tensor
    top_token: torch.Tensor | None = None
    target_surprisal: torch.Tensor | None = None
    target_rank: torch.Tensor | None = None
    top_tokens: torch.Tensor | None = None
    top_probs: torch.Tensor | None = None
    kl_to_final: torch.Tensor | None = None

    def rows(self, rows: slice | torch.Tensor) -> LensStatistics:
        """The statistics of some rows."""
        return LensStatistics(**{f.name: None if (v := getattr(self, f.name)) is None
                                 else v[rows] for f in dataclasses.fields(self)})


@dataclass
class Partials:
    """Online-softmax sums of n rows over k parts of the vocabulary (module docstring).

    m: (k x n) each part's max logit, nats.   s: (k x n) S.   u: (k x n) U, nats.
    d: one (k x n) D_a per order of `orders` (entropy.tilted_orders of the alphas).
    vocab: tokens over all parts (V). top: (k x n) int64 first argmax token of each part.
    above: (k x n) int64 tokens of each part, the target excluded, whose logit exceeds an
    estimate of the target's logit made before the sweep. target_logit: (n,) the target's
    logit in nats (in a Partials of one chunk: its logit there if the chunk holds the
    target, else 0, so that `cat` adds them up). The last three are None unless asked for.
    top_values, top_ids: (j x n x K) candidates for the K largest logits (nats) and their
    tokens, in j parts of their own (the kernel's splits; one for the torch backend's
    `RunningTopK`), padded with -inf and `NO_TOKEN` where a part has fewer tokens.
    final_m, final_s, kl_t: (k x n) m and S of the same token's final-layer row in each
    part, and T (module docstring). These five are None unless asked for.
    """

    m: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor
    d: tuple[torch.Tensor, ...]
    orders: tuple[float, ...]
    vocab: int
    top: torch.Tensor | None = None
    above: torch.Tensor | None = None
    target_logit: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    final_m: torch.Tensor | None = None
    final_s: torch.Tensor | None = None
    kl_t: torch.Tensor | None = None

    @classmethod
    def cat(cls, parts: Sequence[Partials]) -> Partials:
        """The parts of several Partials of the same rows, in vocabulary order, as one."""
        target_logit = None
        if parts[0].target_logit is not None:
            target_logit = torch.stack([p.target_logit for p in parts]).sum(0)
        return cls(**_joined(parts, dim=0), vocab=sum(p.vocab for p in parts),
                   target_logit=target_logit)

    @classmethod
    def cat_rows(cls, blocks: Sequence[Partials]) -> Partials:
        """The Partials of consecutive row blocks, cut into the same parts, as one."""
        if len(blocks) == 1:
            return blocks[0]
        target_logit = None
        if blocks[0].target_logit is not None:
            target_logit = torch.cat([b.target_logit for b in blocks])
        return cls(**_joined(blocks, dim=1), vocab=blocks[0].vocab, target_logit=target_logit)

    def merge(self) -> Partials:
        """One part (1 x n) holding the sums of all k, at the common maximum."""
        top_m, where = self.m.max(dim=0, keepdim=True)  # first maximal part: lowest token
        shift = self.m - top_m
        r = torch.exp(shift)
        d = tuple((torch.exp(a * shift) * d_a + tilted_gap(shift, a, r) * self.s).sum(0, True)
                  for a, d_a in zip(self.orders, self.d, strict=True))
        return Partials(
            m=top_m, s=(r * self.s).sum(0, True), u=(r * (self.u + shift * self.s)).sum(0, True),
            d=d, orders=self.orders, vocab=self.vocab,
            top=None if self.top is None else self.top.gather(0, where),
            above=None if self.above is None else self.above.sum(0, True),
            target_logit=self.target_logit, **self._merged_top(), **self._merged_kl(shift))

    def _merged_top(self) -> dict[str, torch.Tensor | None]:
        """The K largest of every part's K largest (ties: lower token id first)."""
        if self.top_values is None:
            return {"top_values": None, "top_ids": None}
        k = self.top_values.shape[2]
        values = self.top_values.permute(1, 0, 2).reshape(self.top_values.shape[1], -1)
        ids = self.top_ids.permute(1, 0, 2).reshape(values.shape)
        values, ids = ranked(values, ids)
        return {"top_values": values[None, :, :k], "top_ids": ids[None, :, :k]}

    def _merged_kl(self, shift: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """T and the final layer's m and S at their common maximum (module docstring)."""
        if self.kl_t is None:
            return {"final_m": None, "final_s": None, "kl_t": None}
        final_m = self.final_m.max(dim=0, keepdim=True).values
        final_shift = self.final_m - final_m
        r = torch.exp(final_shift)
        return {"final_m": final_m, "final_s": (r * self.final_s).sum(0, True),
                "kl_t": (r * (self.kl_t + (final_shift - shift) * self.final_s)).sum(0, True)}


_EXTRA_PARTS = ("top_values", "top_ids", "final_m", "final_s", "kl_t")


def _joined(partials: Sequence[Partials], dim: int) -> dict:
    """The per-part fields of several Partials concatenated on `dim` (0: parts, 1: rows),
    with their orders; vocab and target_logit are left to the caller."""
    def joined(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in partials]
        return None if values[0] is None else torch.cat(values, dim=dim)

    return dict(m=joined("m"), s=joined("s"), u=joined("u"),
                d=tuple(torch.cat(ds, dim=dim) for ds in zip(*(p.d for p in partials),
                                                            strict=True)),
                orders=partials[0].orders, top=joined("top"), above=joined("above"),
                **{name: joined(name) for name in _EXTRA_PARTS})
NO_TOKEN = torch.iinfo(torch.int64).max
"""The token id of a top-k slot that no token fills (a part with fewer than K tokens)."""


def ranked(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n x c) candidates sorted by value, largest first, ties by token id, lowest first."""
    by_id = ids.argsort(dim=1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), ids.gather(1, order)


def top_k_of_chunk(logits: torch.Tensor, k: int, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row of an (n x chunk) block and their token ids
    (offset + column), ties by lower id, in no particular order; (n x k), padded with -inf
    and NO_TOKEN where the chunk is narrower than k.

    torch.topk picks among equal values at the boundary as it likes: one more value than
    needed shows where the k-th ties with the next (a compare over the whole chunk would
    cost twice the topk); those rows are redone by a stable sort.
    """
    width = logits.shape[1]
    if width <= k:
        pad = (logits.shape[0], k - width)
        columns = torch.arange(width, device=logits.device).expand(logits.shape[0], width)
        return (torch.cat([logits, logits.new_full(pad, -math.inf)], dim=1),
                torch.cat([columns + offset, columns.new_full(pad, NO_TOKEN)], dim=1))
    values, columns = torch.topk(logits, k + 1, dim=1)  # sorted, largest first
    tied = values[:, k] == values[:, k - 1]
    values, columns = values[:, :k].contiguous(), columns[:, :k].contiguous()
    if tied.any():
        redo = logits[tied].argsort(dim=1, descending=True, stable=True)[:, :k]
        columns[tied] = redo
        values[tied] = logits[tied].gather(1, redo)
    return values, columns + offset


class RunningTopK:
    """The K largest logits of n rows seen so far and their tokens, over vocabulary chunks
    that come in token order (the torch backend's online top-k).

    A chunk only reaches rows whose chunk maximum beats their K-th value so far: a later
    token that ties it has a higher id and ranks below. After the first chunks that skips
    most rows (~80% of chunks on SmolLM2's 49152 tokens in chunks of 1024).
    """

    def __init__(self, n: int, k: int, device: torch.device) -> None:
        self.k = k
        self.values = torch.full((n, k), -math.inf, device=device)
        self.ids = torch.full((n, k), NO_TOKEN, dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, chunk_max: torch.Tensor, offset: int) -> None:
        """Merge an (n x chunk) block of tokens offset.. whose row maxima are chunk_max."""
        need = chunk_max > self.values[:, -1]  # values stay sorted: the K-th is last
        if not need.any():
            return
        rows = None if need.all() else need.nonzero()[:, 0]
        block = logits if rows is None else logits[rows]
        values, ids = top_k_of_chunk(block, self.k, offset)
        old_values = self.values if rows is None else self.values[rows]
        old_ids = self.ids if rows is None else self.ids[rows]
        values, ids = ranked(torch.cat([old_values, values], 1), torch.cat([old_ids, ids], 1))
        if rows is None:
            self.values, self.ids = values[:, :self.k].contiguous(), ids[:, :self.k].contiguous()
        else:
            self.values[rows], self.ids[rows] = values[:, :self.k], ids[:, :self.k]


def log_partition(partials: Partials) -> torch.Tensor:
    """(n,) log sum_v exp(z_v) in nats of the rows of `partials`."""
    merged = partials.merge()
    return merged.m[0] + torch.log(merged.s[0])


def linear_kl_to_final(rows: torch.Tensor, lse: torch.Tensor, groups: int,
                       expected_head: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(G n,) fp32 KL(p_L || p_row) in nats for logits linear in the normed rows,
    z = c (W h + b): KL = c (h_L - h) . w_L + lse_h - lse_L, where w_L = E_pL[W_v] is the
    final distribution's expected head row (expected_head: (n x d), one per token; the
    bias cancels). rows: (G n x d) normed rows, layer-major, the final layer's group last;
    lse: their (G n,) log-partitions. The final layer's own KL is exactly 0."""
    n = len(rows) // groups
    # float64: the d products of a row can be ~10 each, so an fp32 sum would be off by ~1e-4
    by_group = rows.view(groups, n, -1).double()
    gap = ((by_group[-1] - by_group) * expected_head.double()).sum(dim=2) * logit_scale
    lse = lse.view(groups, n).double()
    return (gap + lse - lse[-1]).clamp(min=0.0).float().reshape(-1)


def finalize(partials: Partials, alphas: Sequence[float],
             targets: torch.Tensor | None = None) -> LensStatistics:
    """Entropies (n x len(alphas), float32 nats) and token statistics of merged partials.

    targets: (n,) token ids when partials carry target statistics; rows whose target is
    outside [0, V) get nan surprisal and rank -1.
    """
    p = partials.merge()
    s, m = p.s[0], p.m[0]
    log_s = torch.log(s)
    tilted = dict(zip(p.orders, p.d, strict=True))
    columns = []
    for a in alphas:
        if a == 1.0:
            columns.append(log_s - p.u[0] / s)
        elif math.isinf(a):
            columns.append(log_s)
        elif a == 0.0:
            columns.append(torch.full_like(log_s, math.log(p.vocab)))
        else:
            columns.append(log_s - torch.log1p(tilted[a][0] / s) / (a - 1.0))
    stats = LensStatistics(entropy=torch.stack(columns, dim=1).float())
    if p.top is not None:
        stats.top_token = p.top[0].long()
    if targets is not None:
        valid = (targets >= 0) & (targets < p.vocab)
        surprisal = log_s - (p.target_logit.to(log_s.dtype) - m)  # exact where z_t ~ m
        stats.target_surprisal = torch.where(valid, surprisal, math.nan).float()
        stats.target_rank = torch.where(valid, p.above[0].long(), -1)
    if p.top_values is not None:
        stats.top_tokens = p.top_ids[0]
        log_z = (m + log_s).to(p.top_values.dtype)[:, None]
        stats.top_probs = torch.exp(p.top_values[0] - log_z).float()
    if p.kl_t is not None:
        final_s, t = p.final_s[0].double(), p.kl_t[0].double()
        kl = t / final_s - torch.log(final_s) + torch.log(s.double())
        stats.kl_to_final = kl.clamp(min=0.0).float()  # >= 0; rounding can dip below
    return stats


def _eager_chunk_moments(logits: torch.Tensor, orders: tuple[float, ...], kl_groups: int = 0):
    m = logits.amax(dim=1, keepdim=True)
    x = logits - m
    e = torch.exp(x)
    moments = (m[:, 0], e.sum(dim=1), (e * x).sum(dim=1),
               tuple(tilted_gap(x, a, e).sum(dim=1) for a in orders))
    if not kl_groups:
        return moments
    x = x.view(kl_groups, -1, x.shape[1])  # (groups x tokens x chunk), the final layer last
    t = (e.view(x.shape)[-1] * (x[-1] - x)).sum(dim=2)
    return (*moments, t.reshape(-1))


def compile_errors() -> tuple[type[Exception], ...]:
    """How torch.compile fails where it cannot build (no or broken C++ compiler, an
    inductor lowering error); any other exception is a bug and propagates. (A function:
    importing torch._dynamo costs time that most imports of this module do not need.)"""
    import torch._dynamo.exc

    return (torch._dynamo.exc.BackendCompilerFailed,)


class ChunkMoments:
    """(m, S, U, (D_a, ...)) of (rows x chunk) float32 logit blocks, row by row.

    Eager torch walks a chunk once per elementwise op (max, sub, exp, sum, mul, sum); on
    CPU that costs as much again as the GEMM that made the chunk. torch.compile fuses them
    into two passes over the chunk (bench/RESULTS.md: statistics from ~1.4x to ~0.2x of the
    GEMM on SmolLM2's head), so CPU chunks of at least `min_elements` logits (128 rows of
    the lens's 1024-column chunks) use it when `compile` is on.

    Compiling costs ~5 s per process (importing dynamo, tracing; the inductor cache warm)
    and ~1 min with a cold cache. With `background`, the first eligible block starts it on
    a thread of its own and every block runs eager until the compiled code is ready, so a
    run's first batch never waits for it and a short run never pays it in full (the eager
    operators release the GIL, so the compiling thread's Python runs beside them).

    The first compilation that fails with one of compile_errors() warns once, records the
    error in `failure` and turns compilation off for this object; every later call runs
    eager. Any other error of the compiled code is a bug and propagates (from a background
    compilation: at the next call).
    """

    def __init__(self, compile: bool, min_elements: int = 1 << 17,
                 compiler: Callable = torch.compile, background: bool = False) -> None:
        self.compile = compile
        self.min_elements = min_elements
        self.background = background
        self.failure: str | None = None
        self._compiler = compiler
        self._compiled: Callable | None = None
        self._builder: threading.Thread | None = None
        self._build_error: BaseException | None = None

    @classmethod
    def from_environment(cls) -> ChunkMoments:
        """Compilation on (in the background) unless ENTROPY_FAST_COMPILE=0, and where
        dynamo runs at all."""
        wanted = os.environ.get("ENTROPY_FAST_COMPILE", "1") != "0"
        return cls(compile=wanted and torch._dynamo.is_dynamo_supported(), background=True)

    def uses_compiled(self, logits: torch.Tensor) -> bool:
        """Whether this block is one that goes through torch.compile (once compiled)."""
        return (self.compile and logits.device.type == "cpu"
                and logits.numel() >= self.min_elements)

    def __call__(self, logits: torch.Tensor, orders: tuple[float, ...] = (),
                 kl_groups: int = 0):
        """(m, S, U, (D_a per order)) of one (n x chunk) block, each (n,), relative to m;
        with kl_groups = G (rows: G layer groups of the same tokens, the final layer
        last) also T of every row (module docstring)."""
        if not self.uses_compiled(logits) or (
                self.background and not self._built(logits, orders, kl_groups)):
            return _eager_chunk_moments(logits, orders, kl_groups)
        try:
            if self._compiled is None:
                self._compiled = self._compiler(_eager_chunk_moments, dynamic=True)
            return self._compiled(logits, orders, kl_groups)
        except compile_errors() as error:
            self._give_up(error)
            return _eager_chunk_moments(logits, orders, kl_groups)

    def _built(self, logits: torch.Tensor, orders: tuple[float, ...], kl_groups: int) -> bool:
        """Whether the background compilation has ended, starting it on this block (read
        only) at the first call. Its error is handled here: a compile error turns
        compilation off (this block runs eager), any other is raised."""
        if self._builder is None:  # compiled under the caller's grad mode (thread-local),
            # or its guards would fail on the caller's thread and compile there again
            arguments = (logits, orders, kl_groups, torch.is_grad_enabled())
            self._builder = threading.Thread(target=self._build, args=arguments,
                                             name="lens-statistics-compile", daemon=True)
            self._builder.start()
            return False
        if self._builder.is_alive():
            return False
        error, self._build_error = self._build_error, None
        if error is None:
            return True
        if isinstance(error, compile_errors()):
            self._give_up(error)
            return False
        raise error

    def _build(self, logits: torch.Tensor, orders: tuple[float, ...], kl_groups: int,
               grad: bool) -> None:
        try:
            compiled = self._compiler(_eager_chunk_moments, dynamic=True)
            with torch.set_grad_enabled(grad):
                compiled(logits, orders, kl_groups)
            self._compiled = compiled
        except BaseException as error:  # handed to the caller's thread by `_built`
            self._build_error = error

    def _give_up(self, error: BaseException) -> None:
        self.compile, self.failure = False, f"{error!r:.300}"
        warnings.warn(f"torch.compile of the lens statistics failed ({self.failure}); "
                      "using eager torch from now on (ENTROPY_FAST_COMPILE=0 skips it)",
                      stacklevel=3)


@functools.cache
def default_chunk_moments() -> ChunkMoments:
    """The process's ChunkMoments, built from the environment at first use (one
    compilation per process; `default_chunk_moments.cache_clear()` rebuilds it)."""
    return ChunkMoments.from_environment()


def chunk_partials(logits: torch.Tensor, orders: tuple[float, ...], *, offset: int = 0,
                   targets: torch.Tensor | None = None,
                   target_estimate: torch.Tensor | None = None, with_argmax: bool = False,
                   kl_groups: int = 0, moments: ChunkMoments | None = None) -> Partials:
    """Partials (one part) of an (n x chunk) float32 block of logits: tokens offset.. of V.

    targets, target_estimate: (n,) token ids and their logits (nats) computed before the
    sweep, for the rank count; the part's target_logit is the chunk's own logit of the
    target (exact against m), 0 where the chunk does not hold it.
    kl_groups = G: the rows are G layer groups of the same n / G tokens, layer-major, the
    final layer last; keep what the online KL to it needs (module docstring).
    moments: the chunk statistics' implementation (default_chunk_moments()).
    """
    moments = default_chunk_moments() if moments is None else moments
    m, s, u, d, *kl_t = moments(logits, orders, kl_groups)
    width = logits.shape[1]
    extra: dict[str, torch.Tensor] = {}
    if kl_groups:
        final = slice(len(m) - len(m) // kl_groups, None)
        extra.update(final_m=m[final].repeat(kl_groups)[None],
                     final_s=s[final].repeat(kl_groups)[None], kl_t=kl_t[0][None])
    top = above = target_logit = None
    if with_argmax:
        top = (logits.argmax(dim=1) + offset)[None]
    if targets is not None:
        local = targets - offset
        inside = (local >= 0) & (local < width)
        own = logits.gather(1, local.clamp(0, width - 1)[:, None])[:, 0]
        above = ((logits > target_estimate[:, None]).sum(dim=1)
                 - (inside & (own > target_estimate)).long())[None]
        target_logit = torch.where(inside, own, 0.0)
    return Partials(m=m[None], s=s[None], u=u[None], d=tuple(x[None] for x in d),
                    orders=orders, vocab=width, top=top, above=above,
                    target_logit=target_logit, **extra)
