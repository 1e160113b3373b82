"""The first-use check of the fused lens kernel: how far its statistics may be from the
torch backend's on the same rows, and the one-line reasons a check fails.

`lens.Lens` runs the check once per lens when backend="auto" picks the kernel (on CUDA);
this module holds the tolerances and the comparisons, on tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropy_fast.entropy import LensStatistics


@dataclass(frozen=True)
class Tolerance:
    """|kernel - torch| allowed in the kernel check, per sampled row, in nats: on entropies,
    surprisals and (near ties) logits alike, atol + rtol |value| + zrel max_v |z_v|.

    fp32 (torch's GEMMs at "highest" precision): 1e-3 + 1e-3 |value| + 4e-6 max|z|, as
    each backend is within ~2e-7 max|z| of float64 (docs/kernel.md). bf16/fp16 heads, and
    fp32 heads where TF32 is allowed (the torch side then rounds its operands to 10
    bits): 2e-2 + 1e-2 |value| + 1e-3 max|z|. On the tests' case table (all zero, nearly
    one-hot, near-uniform rows, |z| ~ 1e4) the real kernel uses at most 1.2% (fp32) and
    0.01% (bf16) of these; a broken one (a wrong tile, mask or merge) misses by far more.
    """

    atol: float
    rtol: float
    zrel: float
    scale: torch.Tensor  # (n,) each row's largest |logit|

    @classmethod
    def of(cls, dtype: torch.dtype, logits: torch.Tensor) -> Tolerance:
        exact = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
        atol, rtol, zrel = (1e-3, 1e-3, 4e-6) if exact else (2e-2, 1e-2, 1e-3)
        return cls(atol, rtol, zrel, logits.abs().amax(1).double())

    def allowed(self, values: torch.Tensor) -> torch.Tensor:
        """(n,) or (n x k) allowed differences around `values` of the same rows."""
        scale = self.scale if values.ndim == 1 else self.scale[:, None]
        return self.atol + self.rtol * values.double().abs() + self.zrel * scale


def value_disagreement(name: str, kernel: torch.Tensor, reference: torch.Tensor,
                        index: torch.Tensor, tolerance: Tolerance) -> str | None:
    """The worst row where the kernel's value is off by more than the tolerance, or is
    non-finite where torch's is finite (or the reverse); None if there is none."""
    kernel, reference = kernel.double(), reference.double()
    allowed = tolerance.allowed(reference.nan_to_num())
    finite = kernel.isfinite() & reference.isfinite()
    excess = ((kernel - reference).abs() / allowed).where(finite, 0.0)
    excess = excess.where(finite | (kernel.isfinite() == reference.isfinite()), torch.inf)
    worst = int(excess.argmax())
    if not excess[worst] > 1:
        return None
    return (f"{name} at row {int(index[worst])}: kernel {float(kernel[worst]):.6g}, torch "
            f"{float(reference[worst]):.6g}, tolerance {float(allowed[worst]):.3g}")


def token_disagreement(logits: torch.Tensor, got: LensStatistics, ref: LensStatistics,
                        targets: torch.Tensor | None, index: torch.Tensor,
                        tolerance: Tolerance) -> str | None:
    """Argmax and target rank may differ from torch's only within a near tie: the kernel's
    top token's logit within tolerance of the row's maximum; its rank off by at most the
    number of other tokens whose logits are within tolerance of the target's."""
    vocab = logits.shape[1]
    if got.top_token is not None and not torch.equal(got.top_token, ref.top_token):
        picked = logits.gather(1, got.top_token.clamp(0, vocab - 1)[:, None])[:, 0]
        best = logits.amax(1)
        bad = (best - picked > tolerance.allowed(best)) | (got.top_token < 0) | (
            got.top_token >= vocab)
        if bad.any():
            i = int(bad.nonzero()[0])
            return (f"top token at row {int(index[i])}: kernel {int(got.top_token[i])} "
                    f"(logit {float(picked[i]):.6g}), torch {int(ref.top_token[i])} "
                    f"(logit {float(best[i]):.6g})")
    if targets is not None and not torch.equal(got.target_rank, ref.target_rank):
        valid = (targets >= 0) & (targets < vocab)
        z = logits.gather(1, targets.clamp(0, vocab - 1)[:, None])
        near = ((logits - z).abs() <= tolerance.allowed(z[:, 0])[:, None]).sum(1) - 1
        off = (got.target_rank - ref.target_rank).abs()
        bad = torch.where(valid, off > near, off != 0)
        if bad.any():
            i = int(bad.nonzero()[0])
            return (f"target rank at row {int(index[i])}: kernel {int(got.target_rank[i])}, "
                    f"torch {int(ref.target_rank[i])} ({int(near[i])} tokens in a near tie)")
    return None


def error_summary(error: BaseException) -> str:
    """One line for an exception: its type, its message's first line and (Triton's
    compile errors put the cause last) its last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ... ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
