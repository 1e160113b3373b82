"""The logit lens: a model's own unembedding, resolved by inspection and verified.

`Lens.from_model(model)` finds the final norm, the optional projection after it (OPT's
project_out), the output head with its optional bias, and the final-logit transforms
(Gemma-2/3 soft-capping, Cohere/Granite logit scaling), then checks that the lens applied
to the last block's pre-norm output reproduces the model's own logits.

`lens.entropy(hidden)` maps pre-norm hidden states (n_rows x d_model) of any layer to
entropies (n_rows x n_alphas) without ever holding an (n_rows x vocabulary) tensor.
Both backends produce per-part online-softmax sums (`entropy.Partials`) that
`entropy.finalize` turns into entropies: `backend="torch"` streams over vocabulary chunks
(`entropy.chunk_partials`), `backend="triton"` hands the lens's tensors (rows, head, bias,
norm parameters, scale, soft-cap) to the fused kernel's launcher
(`kernels.lens_entropy.lens_entropy_partials`), `"auto"` picks the kernel on CUDA, after
checking it once per lens against the torch backend on a sample of the first batch's rows
(`Lens._checked_kernel_statistics`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from entropy_fast.entropy import (
    LensStatistics,
    Partials,
    RunningTopK,
    chunk_partials,
    finalize,
    linear_kl_to_final,
    log_partition,
    tilted_orders,
    validate_alphas,
)
from entropy_fast.forward import StateTap, find_decoder_layers
from entropy_fast.kernel_check import (
    Tolerance,
    error_summary,
    token_disagreement,
    value_disagreement,
)
from entropy_fast.settings import MAX_TOP_TOKENS

if TYPE_CHECKING:  # the kernels import triton: only where the kernel runs
    from entropy_fast.kernels.lens_entropy import KernelConfig

BACKENDS = ("auto", "torch", "triton")
CHECK_ROWS = 64  # rows of the first "auto" batch on which the kernel is checked
REPORT_COMMAND = ("python -c 'import torch, triton; print(torch.__version__, "
                  "triton.__version__, torch.cuda.get_device_name())'")

log = logging.getLogger("entropy_fast")


class UnsupportedArchitectureError(ValueError):
    """The lens could not be resolved, or does not reproduce the model's logits."""


@dataclass(frozen=True)
class NormSpec:
    """The final norm's math, for kernels that fuse it.

    kind: "layernorm" or "rmsnorm"; weight_offset: 1.0 for Gemma's (1 + weight) RMSNorm.
    """

    kind: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    weight_offset: float = 0.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Reference float32 implementation, used to identify the module's kind."""
        x = x.float()
        if self.kind == "layernorm":
            x = x - x.mean(dim=-1, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * (self.weight.float() + self.weight_offset)
        if self.bias is not None:
            y = y + self.bias.float()
        return y

    def kernel_arguments(self) -> dict:
        """This norm as the fused kernel's launcher takes it: plain tensors and scalars."""
        return dict(norm=self.kind, norm_eps=self.eps, norm_offset=self.weight_offset,
                    norm_weight=None if self.weight is None else self.weight.detach(),
                    norm_bias=None if self.bias is None else self.bias.detach())


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _modules_outside(base: nn.Module, layers: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    inside = {id(m) for m in layers.modules()}
    return [(name, m) for name, m in base.named_modules() if id(m) not in inside]


def _find_final_norm(base: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    # The final norm is the last norm registered outside the blocks (ln_f, norm,
    # final_layer_norm, final_layernorm, ...); the self-check confirms the choice.
    norms = [m for _, m in _modules_outside(base, layers) if _is_norm(m)]
    return norms[-1] if norms else None


def _find_projection(base: nn.Module, layers: nn.ModuleList, head: nn.Module,
                     hidden_size: int) -> nn.Module | None:
    if head.weight.shape[1] == hidden_size:
        return None
    for name, module in _modules_outside(base, layers):
        if (isinstance(module, nn.Linear) and module.in_features == hidden_size
                and module.out_features == head.weight.shape[1] and "out" in name):
            return module
    raise UnsupportedArchitectureError(
        f"the output head takes {head.weight.shape[1]} features but the blocks produce "
        f"{hidden_size}, and no projection between them was found"
    )


def identify_norm(norm: nn.Module | None, width: int) -> NormSpec | None:
    """The NormSpec whose math reproduces `norm` on random input, or None if none does."""
    if norm is None:
        return None
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    eps = next((float(getattr(norm, k)) for k in ("eps", "variance_epsilon", "epsilon")
                if isinstance(getattr(norm, k, None), (int, float))), 1e-5)
    probe = torch.randn(4, width, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    param = weight if weight is not None else bias
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    with torch.no_grad():
        expected = norm(probe.to(device=device, dtype=dtype)).float()
        for kind in ("rmsnorm", "layernorm"):
            for offset in (0.0, 1.0):
                spec = NormSpec(kind, weight, bias, eps, offset)
                got = spec.apply(probe.to(device=device, dtype=dtype))
                if torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max()):
                    return spec
    return None


class Lens:
    """The unembedding of one model: final norm, projection, head, logit transforms.

    The torch backend's logit blocks are row_block x vocab_chunk at most: 1024-column
    chunks measured best or within noise of it on the AVX2 CPU VM, 25-30% faster than 8192
    (the best on an earlier AVX-512 VM). A narrow head has fewer rows per block, as many as
    keep the block's logits within block_logits (1 MB of float32) but at least
    min_block_rows: a 211-token head ran its GEMM 2.6x and its eager statistics 3x faster
    in blocks of ~1,200 rows than of 4096, while on SmolLM2's head 256-row blocks made text
    mode 1.24x the forward + head-GEMM floor at 2 threads against ~1.0x with 1024 to 4096
    (bench/bench_lens_cpu.py, bench/bench_profiler_cpu.py, bench/RESULTS.md).
    Fixed; set per instance to change.
    """

    row_block: int = 4096
    vocab_chunk: int = 1024
    block_logits: int = 1 << 18
    min_block_rows: int = 1024

    def __init__(self, head: nn.Module, norm: nn.Module | None = None,
                 projection: nn.Module | None = None, softcap: float | None = None,
                 logit_scale: float = 1.0, name: str = "model") -> None:
        self.head = head
        self.norm = norm
        self.projection = projection
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.name = name
        self._float_weight: torch.Tensor | None = None
        # backend="auto": None until the kernel's first-batch check, then its verdict.
        self._kernel_passed: bool | None = None

    @classmethod
    def from_model(cls, model: nn.Module, verify: bool = True) -> Lens:
        """Resolve the lens of an HF causal LM by inspection; verify it unless told not to."""
        name = type(model).__name__
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise UnsupportedArchitectureError(
                f"{name} has no output embedding (lm_head); load it with "
                "AutoModelForCausalLM, not AutoModel"
            )
        config = model.config.get_text_config()
        base = model.base_model
        layers = find_decoder_layers(model)
        lens = cls(
            head=head,
            norm=_find_final_norm(base, layers),
            projection=_find_projection(base, layers, head, config.hidden_size),
            softcap=getattr(config, "final_logit_softcapping", None) or None,
            logit_scale=_logit_scale(config),
            name=name,
        )
        if verify:
            lens.verify(model, layers)
        return lens

    @property
    def vocab_size(self) -> int:
        """Number of rows of the output head."""
        return int(self.head.weight.shape[0])

    @functools.cached_property
    def norm_spec(self) -> NormSpec | None:
        """The final norm's math when a kernel can fuse it, else None (identified once)."""
        width = self.head.weight.shape[1] if self.projection is None else None
        if width is None or self.norm is None:
            return None
        return identify_norm(self.norm, width)

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm (and projection) of pre-norm states, in the model's dtype."""
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.projection is not None:
            hidden = self.projection(hidden)
        return hidden

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        """Head bias is already added; apply logit scaling and soft-capping in float32."""
        logits = logits.float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _matmul_weight(self, device: torch.device) -> torch.Tensor:
        weight = self.head.weight
        if device.type == "cpu" and weight.dtype != torch.float32:
            # No fast bf16/fp16 GEMM on most CPUs: keep one float32 copy of the head.
            if self._float_weight is None:
                self._float_weight = weight.detach().float()
            return self._float_weight
        return weight.detach()

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """(n_rows x vocabulary) float32 lens logits; for small inputs and references."""
        normed_hidden = hidden if normed else self.normalize(hidden)
        weight = self._matmul_weight(normed_hidden.device)
        logits = normed_hidden.to(weight.dtype) @ weight.T
        if getattr(self.head, "bias", None) is not None:
            logits = logits + self.head.bias
        return self._transform(logits)

    @torch.no_grad()
    def entropy(self, hidden: torch.Tensor, alphas: float | Sequence[float] = (1.0,),
                backend: str = "auto", normed: bool = False) -> torch.Tensor:
        """(n_rows x n_alphas) float32 entropies in nats of pre-norm states (n_rows x d).

        `normed=True` marks states that already went through the final norm (HF's last
        hidden state). alpha: 0, 1 (Shannon), inf, or any positive order.
        """
        return self.statistics(hidden, alphas, backend=backend, normed=normed).entropy

    @torch.no_grad()
    def statistics(self, hidden: torch.Tensor, alphas: float | Sequence[float] = (1.0,),
                   backend: str = "auto", normed: bool = False,
                   targets: torch.Tensor | None = None,
                   with_top_token: bool = False, top_k: int = 0,
                   kl_groups: int = 0) -> LensStatistics:
        """Entropies plus, on request, the argmax token, the targets' surprisal and rank,
        the top_k most probable tokens and the KL divergence to the final layer.

        hidden: (n_rows x d); targets: (n_rows,) token ids (e.g. the actual next tokens).
        kl_groups = G > 0: hidden holds G layer groups of the same n_rows / G tokens,
        layer-major, the final layer's group last; each row gets KL(p_final || p_row) to
        its token's row in the last group.
        """
        alphas = validate_alphas(alphas)
        if hidden.ndim != 2:
            raise ValueError(f"hidden must be (n_rows x d_model), got {tuple(hidden.shape)}")
        _check_extras(len(hidden), self.vocab_size, top_k, kl_groups)
        if targets is not None:
            targets = targets.to(hidden.device, torch.int64)
        choice = _pick_backend(backend, hidden.device)
        asked = (with_top_token, top_k, kl_groups)
        if kl_groups and self.softcap:  # KL is linear in the rows only without a soft-cap
            choice = "torch"  # (kernels/lens_kl.py): the torch backend's online KL
        if choice == "triton" and backend == "auto":
            return self._checked_kernel_statistics(hidden, alphas, normed, targets, *asked)
        if choice == "triton":  # asked for by name: never checked, errors included
            return self.kernel_statistics(hidden, alphas, normed=normed, targets=targets,
                                          with_top_token=with_top_token, top_k=top_k,
                                          kl_groups=kl_groups)
        return self._statistics_torch(hidden, alphas, normed, targets, *asked)

    def _checked_kernel_statistics(self, hidden, alphas, normed, targets,
                                   with_top_token, top_k, kl_groups) -> LensStatistics:
        """The kernel as backend="auto" uses it: no GPU run precedes a user's first one, so
        the first non-empty batch's kernel results are checked against the torch backend
        on a sample of its rows; on any failure this lens keeps the torch backend (same
        results, slower) and logs one warning. Checked once: no host syncs afterwards."""
        if self._kernel_passed is None and len(hidden):
            stats, failure = self._try_kernel(hidden, alphas, normed, targets, with_top_token,
                                              top_k, kl_groups)
            self._kernel_passed = failure is None
            if failure is None:
                return stats
            log.warning("%s: the fused Triton lens kernel failed its first-batch check (%s); "
                        "using the torch backend instead (slower, same results). Please "
                        "report it, with the output of `%s`, at the project's issue tracker.",
                        self.name, failure, REPORT_COMMAND)
        if self._kernel_passed:
            return self.kernel_statistics(hidden, alphas, normed=normed, targets=targets,
                                          with_top_token=with_top_token, top_k=top_k,
                                          kl_groups=kl_groups)
        return self._statistics_torch(hidden, alphas, normed, targets, with_top_token, top_k,
                                      kl_groups)

    def _try_kernel(self, hidden, alphas, normed, targets, with_top_token, top_k,
                    kl_groups) -> tuple[LensStatistics | None, str | None]:
        """(kernel statistics of the whole batch, None) if they pass the check, else
        (None, what failed). Out of memory is the batch's fault, not the kernel's: raised."""
        try:
            stats = self.kernel_statistics(hidden, alphas, normed=normed, targets=targets,
                                           with_top_token=with_top_token, top_k=top_k,
                                           kl_groups=kl_groups)
            if hidden.is_cuda:  # asynchronous launch errors surface here
                torch.cuda.synchronize(hidden.device)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # compile errors, launch failures, bad resources
            return None, f"it raised {error_summary(error)}"
        failure = self._kernel_disagreement(hidden, stats, alphas, normed, targets, kl_groups)
        return (stats, None) if failure is None else (None, failure)

    def _kernel_disagreement(self, hidden, stats, alphas, normed, targets,
                             kl_groups: int = 0) -> str | None:
        """The first statistic on which the kernel disagrees with the torch backend on up to
        CHECK_ROWS evenly spaced rows, with its largest disagreement; None if none does.

        The reference is the torch backend on the rows the kernel itself multiplies
        (`_kernel_rows`: its fp32 norm rounded once to the head's dtype), so the check sees
        the kernel alone and not the bf16 rounding of the model's own norm, which moves
        entropies by up to ~2e-2 nats on real bf16 models (docs/kernel.md). What remains is
        the fp32 rounding of the logits (proportional to the row's largest |logit|), or TF32
        where the user enabled it for torch's GEMMs (`kernel_check.Tolerance`). A broken
        kernel misses by far more. The argmax and the target's rank are discrete: near ties
        may flip, so they are judged on the sample's fp32 logits
        (`kernel_check.token_disagreement`).
        """
        count = min(len(hidden), CHECK_ROWS)  # evenly spaced, first and last included
        index = torch.arange(count, device=hidden.device) * (len(hidden) - 1) // max(count - 1, 1)
        rows = self._kernel_rows(hidden[index], normed)
        row_targets = None if targets is None else targets[index]
        ref = self._statistics_torch(rows, alphas, True, row_targets,
                                     stats.top_token is not None,
                                     0 if stats.top_tokens is None else stats.top_tokens.shape[1])
        got = stats.rows(index)
        logits = self._exact_logits(rows)  # (<= CHECK_ROWS x V) float32, once per lens
        tolerance = Tolerance.of(self.head.weight.dtype, logits)
        checks = [(f"entropy (alpha={a:g})", got.entropy[:, i], ref.entropy[:, i])
                  for i, a in enumerate(alphas)]
        if got.top_probs is not None:  # p moves by at most |dz| where z does
            checks += [(f"probability of top token {r}", got.top_probs[:, r], ref.top_probs[:, r])
                       for r in range(got.top_probs.shape[1])]
        if got.kl_to_final is not None:
            checks.append(("KL to the final layer", got.kl_to_final,
                           self._sample_kl(hidden, index, logits, normed, kl_groups)))
        if targets is not None:
            checks.append(("target surprisal", got.target_surprisal, ref.target_surprisal))
        for name, kernel, torch_value in checks:
            failure = value_disagreement(name, kernel, torch_value, index, tolerance)
            if failure is not None:
                return failure
        return token_disagreement(logits, got, ref, row_targets, index, tolerance)

    def _sample_kl(self, hidden: torch.Tensor, index: torch.Tensor, logits: torch.Tensor,
                   normed: bool, kl_groups: int) -> torch.Tensor:
        """KL(p_final || p) of the sampled rows (their fp32 `logits`), written out: the
        final layer's rows of the same tokens, their logits, the KL sum."""
        n = len(hidden) // kl_groups
        final = self._exact_logits(self._kernel_rows(hidden[(kl_groups - 1) * n + index % n],
                                                     normed)).log_softmax(dim=1)
        return (final.exp() * (final - logits.log_softmax(dim=1))).sum(dim=1)

    def _kernel_rows(self, hidden: torch.Tensor, normed: bool) -> torch.Tensor:
        """The normed rows the kernel multiplies for `hidden` (see kernel_statistics)."""
        if normed:
            return hidden
        if self.norm_spec is None:
            return self.normalize(hidden)
        return self.norm_spec.apply(hidden).to(self.head.weight.dtype)

    def _exact_logits(self, normed_rows: torch.Tensor) -> torch.Tensor:
        """(n x V) float32 logits with float32 accumulation, for a few rows only."""
        weight = self._matmul_weight(normed_rows.device)
        logits = _matmul_float32(normed_rows.to(weight.dtype), weight)
        if getattr(self.head, "bias", None) is not None:
            logits = logits + self.head.bias
        return self._transform(logits)

    @torch.no_grad()
    def kernel_statistics(self, hidden: torch.Tensor, alphas: float | Sequence[float] = (1.0,),
                          *, normed: bool = False, targets: torch.Tensor | None = None,
                          with_top_token: bool = False, top_k: int = 0, kl_groups: int = 0,
                          config: KernelConfig | None = None) -> LensStatistics:
        """`statistics(..., backend="triton")` with an optional kernels.lens_entropy.KernelConfig
        (benchmarks, tests): the lens's tensors through the fused kernel, then finalize.

        hidden: (n_rows x d); targets: (n_rows,) int64 token ids on hidden's device.
        """
        from entropy_fast.kernels.lens_entropy import lens_entropy_partials
        from entropy_fast.kernels.lens_kl import expected_head_rows

        if kl_groups and self.softcap:
            raise ValueError("the kernel's KL to the final layer needs logits linear in the "
                             "rows: a soft-capped lens computes it with backend='torch'")
        alphas = validate_alphas(alphas)
        rows, norm = hidden, {}
        if kl_groups:  # the KL reads the normed rows too: norm them once, here
            rows = self._kernel_rows(hidden, normed)
        elif not normed and self.norm_spec is None:  # a projection or an unknown norm: torch
            rows = self.normalize(hidden)
        elif not normed:  # fused into the kernel's prologue
            norm = self.norm_spec.kernel_arguments()
        bias = getattr(self.head, "bias", None)
        partials = lens_entropy_partials(
            rows, self.head.weight.detach(), None if bias is None else bias.detach(), **norm,
            logit_scale=self.logit_scale, softcap=self.softcap or None, alphas=alphas,
            targets=targets, with_argmax=with_top_token, top_k=top_k, config=config)
        stats = finalize(partials, alphas, targets)
        if kl_groups:
            lse, n = log_partition(partials), len(hidden) // kl_groups
            expected = expected_head_rows(rows[len(rows) - n:], self.head.weight.detach(),
                                          None if bias is None else bias.detach(),
                                          lse[len(rows) - n:], self.logit_scale)
            stats.kl_to_final = linear_kl_to_final(rows, lse, kl_groups, expected,
                                                   self.logit_scale)
        return stats

    def _statistics_torch(self, hidden, alphas, normed, targets, with_top_token,
                          top_k: int = 0, kl_groups: int = 0) -> LensStatistics:
        """Token blocks of about row_block rows (every layer group's rows of the same
        tokens together, so the final layer's rows serve all groups), one vocabulary chunk
        at a time. KL: linear in the rows without a soft-cap (`entropy.linear_kl_to_final`,
        one more sweep over the block's final rows), else online in the same sweep."""
        groups = max(kl_groups, 1)
        online_kl = kl_groups if self.softcap else 0
        n_tokens = len(hidden) // groups
        by_group = hidden.view(groups, n_tokens, hidden.shape[-1])
        grouped_targets = None if targets is None else targets.view(groups, n_tokens)
        blocks, block_targets, kls, orders = [], [], [], tilted_orders(alphas)
        step = max(self.block_rows() // groups, 1)
        for start in range(0, max(n_tokens, 1), step):  # one empty block for no rows
            rows = by_group[:, start:start + step].reshape(-1, hidden.shape[-1])
            rows = rows if normed else self.normalize(rows)
            row_targets = (None if targets is None
                           else grouped_targets[:, start:start + step].reshape(-1))
            partials = self._stream_partials(rows, orders, row_targets, with_top_token,
                                             top_k, online_kl)
            if kl_groups and not online_kl:
                kls.append(self._linear_kl(rows, log_partition(partials), kl_groups))
            blocks.append(partials)
            block_targets.append(row_targets)
        # one merge and finalize for all blocks: a few dozen small ops that every block of
        # a narrow head would otherwise pay (~20% of its lens time on the bench's 211 tokens)
        stats = finalize(Partials.cat_rows(blocks), alphas,
                         None if targets is None else torch.cat(block_targets))
        if kls:
            stats.kl_to_final = torch.cat(kls)
        if groups == 1:
            return stats
        sizes = [len(p.m[0]) for p in blocks]
        offsets = [0, *itertools.accumulate(sizes)]
        return _concat([stats.rows(slice(a, b)) for a, b in itertools.pairwise(offsets)],
                       groups)

    def block_rows(self) -> int:
        """Rows per token block of the torch backend (see the class docstring)."""
        width = min(self.vocab_size, self.vocab_chunk)
        return min(self.row_block, max(self.min_block_rows, self.block_logits // width))

    def _linear_kl(self, normed_rows: torch.Tensor, lse: torch.Tensor,
                   groups: int) -> torch.Tensor:
        """KL to the final layer of normed rows (G layer groups) with log-partitions lse."""
        n = len(normed_rows) // groups
        final = normed_rows[len(normed_rows) - n:]
        expected = self._expected_head(final, lse[len(lse) - n:])
        return linear_kl_to_final(normed_rows.to(expected.dtype), lse, groups, expected,
                                  self.logit_scale)

    def _expected_head(self, normed_rows: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """(n x d) float32 E_p[W_v] of each row's lens distribution p (log-partition lse),
        one vocabulary chunk at a time: p of the chunk, then p @ W of the chunk; divided
        by the sum of p (1 up to lse's rounding, which would scale a KL of 100 nats by
        ~1e-6 relative, 1e-4 nats)."""
        weight = self._matmul_weight(normed_rows.device)
        bias = getattr(self.head, "bias", None)
        rows = normed_rows.to(weight.dtype)
        expected = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        total = torch.zeros(len(rows), dtype=torch.float32, device=rows.device)
        for start in range(0, weight.shape[0], self.vocab_chunk):
            chunk = weight[start:start + self.vocab_chunk]
            logits = _matmul_float32(rows, chunk)
            if bias is not None:
                logits = logits + bias[start:start + self.vocab_chunk]
            p = torch.exp(self._transform(logits) - lse[:, None].float())
            expected += p @ chunk.float()
            total += p.sum(dim=1)
        return expected / total[:, None]  # exactly normalized: lse's own rounding cancels

    def _stream_partials(self, normed_rows: torch.Tensor, orders: tuple[float, ...],
                         targets: torch.Tensor | None, with_top_token: bool,
                         top_k: int = 0, kl_groups: int = 0) -> Partials:
        """One part per vocabulary chunk of normed rows (n x d); logits (n x chunk) float32.
        The top-k candidates come as one part of their own (`entropy.RunningTopK`)."""
        weight = self._matmul_weight(normed_rows.device)
        bias = getattr(self.head, "bias", None)
        rows = normed_rows.to(weight.dtype)
        estimate = None
        if targets is not None:  # one dot product per row; targets outside [0, V) clamped
            picked = targets.clamp(0, weight.shape[0] - 1)
            z = (rows * weight[picked]).sum(dim=1, keepdim=True)
            estimate = self._transform(z if bias is None else z + bias[picked, None])[:, 0]
        top = RunningTopK(len(rows), top_k, rows.device) if top_k else None
        parts = []
        step = self.vocab_chunk
        for start in range(0, weight.shape[0], step):
            chunk = _matmul_float32(rows, weight[start:start + step])
            if bias is not None:
                chunk = chunk + bias[start:start + step]
            logits = self._transform(chunk)
            parts.append(chunk_partials(logits, orders, offset=start, targets=targets,
                                        target_estimate=estimate, with_argmax=with_top_token,
                                        kl_groups=kl_groups))
            if top is not None:
                top.add(logits, parts[-1].m[0], start)
        partials = Partials.cat(parts)
        if top is not None:
            partials.top_values, partials.top_ids = top.values[None], top.ids[None]
        return partials

    @torch.no_grad()
    def verify(self, model: nn.Module, layers: nn.ModuleList | None = None) -> None:
        """Raise UnsupportedArchitectureError unless the lens reproduces the model's logits."""
        layers = layers if layers is not None else find_decoder_layers(model)
        device = self.head.weight.device
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
        captured = {}
        last = len(layers)
        with StateTap(layers, [last], lambda i, h: captured.setdefault(i, h)):
            expected = model(input_ids=ids.to(device), use_cache=False).logits[0].float()
        got = self.logits(captured[last][0])
        scale = expected.abs().max().item() + 1.0
        tolerance = (1e-3 if self.head.weight.dtype == torch.float32 else 5e-2) * scale
        error = (got - expected).abs().max().item()
        if not error <= tolerance:
            raise UnsupportedArchitectureError(
                f"the logit lens resolved for {self.name} (norm: "
                f"{type(self.norm).__name__ if self.norm is not None else 'none'}, projection: "
                f"{'yes' if self.projection is not None else 'none'}, head bias: "
                f"{'yes' if getattr(self.head, 'bias', None) is not None else 'no'}, soft-cap: "
                f"{self.softcap}) does not reproduce the model's own logits (max abs error "
                f"{error:.3g} > {tolerance:.3g}); this architecture is not supported yet"
            )


def _matmul_float32(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows @ weight.T with float32 output; half-precision GPU GEMMs keep fp32 accumulators."""
    if rows.is_cuda and rows.dtype != torch.float32:
        try:
            return torch.mm(rows, weight.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm.out_dtype
            pass
    return rows @ weight.T


def _logit_scale(config) -> float:
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    if isinstance(scale, (int, float)):
        return float(scale)
    divisor = getattr(config, "logits_scaling", None)  # Granite divides
    if isinstance(divisor, (int, float)) and divisor:
        return 1.0 / float(divisor)
    return 1.0


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if _kernel_by_default(device) else "torch"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing entropy_fast, or use backend='torch'"
        )
    return backend


def _kernel_by_default(device: torch.device) -> bool:
    """Whether backend="auto" picks the fused kernel (then checked once per lens): on CUDA
    where Triton imports. Tests monkeypatch it to run the check under the interpreter."""
    return device.type == "cuda" and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from entropy_fast.kernels import lens_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def _check_extras(n_rows: int, vocab: int, top_k: int, kl_groups: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= min(
            MAX_TOP_TOKENS, vocab):
        raise ValueError(f"top_k must be an integer in 0..{min(MAX_TOP_TOKENS, vocab)}, "
                         f"got {top_k!r}")
    if kl_groups < 0 or (kl_groups and n_rows % kl_groups):
        raise ValueError(f"kl_groups={kl_groups} does not divide the {n_rows} rows into "
                         "layer groups of the same tokens")


def _concat(parts: list[LensStatistics], groups: int = 1) -> LensStatistics:
    """The statistics of consecutive token blocks as one, layer-major: each block holds
    `groups` layer groups of its tokens."""
    def cat(name):
        values = [getattr(p, name) for p in parts]
        if values[0] is None:
            return None
        by_group = [v.view(groups, len(v) // groups, *v.shape[1:]) for v in values]
        return torch.cat(by_group, dim=1).reshape(-1, *values[0].shape[1:])

    return LensStatistics(**{f.name: cat(f.name) for f in dataclasses.fields(LensStatistics)})

