"""The tests' one float64 reference (full softmax, textbook sums) and one assert helper.

Everything here is written the obvious way, independently of entropy_fast's streaming
math: the lens's own modules (norm, projection) copied to float64, the head in float64,
a full log-softmax, then the definitions of the entropies, surprisal and rank.
"""

from __future__ import annotations

import copy
import math

import torch


def entropy_from_logits(logits: torch.Tensor, alphas) -> torch.Tensor:
    """(n x k) float64 entropies in nats of the softmax of (n x V) logits."""
    logits = logits.double()
    p = torch.softmax(logits, dim=-1)
    columns = []
    for a in alphas:
        if a == 1.0:
            columns.append(-(p * torch.log(p)).nan_to_num().sum(-1))
        elif math.isinf(a):
            columns.append(-torch.log(p.max(-1).values))
        elif a == 0.0:  # every finite logit has p > 0
            columns.append(torch.full(p.shape[:-1], math.log(p.shape[-1]), dtype=torch.float64,
                                      device=p.device))
        else:
            columns.append(torch.log((p**a).sum(-1)) / (1 - a))
    return torch.stack(columns, dim=-1)


def float64_rows(lens, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """(n x d) rows through float64 copies of the lens's own modules (norm, projection)."""
    rows = hidden.double()
    if not normed:
        for module in (lens.norm, lens.projection):
            if module is not None:
                rows = copy.deepcopy(module).double()(rows)
    return rows


def model_dtype_rows(lens, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """(n x d) rows through the lens's own modules in their own dtype (plain torch, e.g.
    bf16): the same-dtype reference of STYLE.md item 12, before a float64 head."""
    rows = hidden
    if not normed:
        for module in (lens.norm, lens.projection):
            if module is not None:
                rows = module(rows)
    return rows


def head_logits_float64(lens, rows: torch.Tensor) -> torch.Tensor:
    """(n x V) float64 logits of normed rows: head, bias, logit scale, soft-cap."""
    logits = rows.double() @ lens.head.weight.double().T
    if getattr(lens.head, "bias", None) is not None:
        logits = logits + lens.head.bias.double()
    logits = logits * lens.logit_scale
    if lens.softcap:
        logits = torch.tanh(logits / lens.softcap) * lens.softcap
    return logits


def lens_logits_float64(lens, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """The lens logits recomputed with float64 copies of the model's own modules."""
    return head_logits_float64(lens, float64_rows(lens, hidden, normed))


def fp32_tol(zmax: float) -> float:
    """What fp32 rounding of logits of size zmax allows, in nats or logit units."""
    return 1e-5 + 2e-7 * zmax


def reference(lens, rows: torch.Tensor, alphas, targets: torch.Tensor | None = None) -> dict:
    """Float64 statistics of normed rows (n x d): entropy (n x k), the logits z, zmax and,
    with targets, surprisal, rank (other tokens strictly above the target) and near (other
    tokens within fp32 rounding of the target: where a rank may legitimately differ)."""
    z = head_logits_float64(lens, rows)
    out = {"entropy": entropy_from_logits(z, alphas), "z": z, "zmax": z.abs().max().item()}
    if targets is not None:
        logp = torch.log_softmax(z, dim=1)
        z_target = z.gather(1, targets[:, None])
        others = torch.ones_like(z, dtype=torch.bool).scatter_(1, targets[:, None], False)
        out["surprisal"] = -logp.gather(1, targets[:, None])[:, 0]
        out["rank"] = ((z > z_target) & others).sum(1)
        out["near"] = (((z - z_target).abs() <= fp32_tol(out["zmax"])) & others).sum(1)
    return out


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol,
                 baseline: torch.Tensor | None = None) -> None:
    """Elementwise |got - want| <= atol (a number, or per column), with a report.

    baseline: a same-dtype torch result (STYLE.md item 12); the tolerance is then its own
    per-column max error against `want` plus atol. Fails on any nan/inf where the other
    side is finite (or the other way round), reporting how many, and on any error beyond
    tolerance, reporting how many elements and the max error per column.
    """
    got, want = got.double(), want.double().to(got.device)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    atol = torch.as_tensor(atol, dtype=torch.float64, device=got.device)
    if baseline is not None:
        atol = atol + column_error(baseline, want)
    finite = torch.isfinite(got) == torch.isfinite(want)
    assert finite.all(), (f"{name}: {int((~finite).sum())} nan/inf disagreements of "
                          f"{got.numel()}")
    err = (got - want).abs().nan_to_num(0.0)  # same nan/inf on both sides: agreement
    bad = err > atol
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} beyond tolerance "
                           f"{atol.flatten()[:8].tolist()}; max error per column "
                           f"{column_error(got, want).tolist()}")


def column_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Max abs error per column of (n x k) results; (1,) over everything for (n,) ones."""
    err = (got.double() - want.double().to(got.device)).abs()
    return err.reshape(err.shape[0], -1).amax(0)


def check_tokens(stats, ref: dict, vocab: int) -> None:
    """Argmax, target surprisal and rank of LensStatistics against reference()."""
    z, tol = ref["z"], fp32_tol(ref["zmax"])
    top = stats.top_token.to(z.device)
    assert ((top >= 0) & (top < vocab)).all(), "argmax outside the vocabulary"
    top_logit = z.gather(1, top[:, None])[:, 0]
    assert (top_logit >= z.max(1).values - tol).all(), "argmax is not a maximal token"
    assert (top == z.argmax(1)).float().mean() > 0.9
    assert_close("surprisal", stats.target_surprisal, ref["surprisal"], tol)
    off = (stats.target_rank.to(z.device) - ref["rank"]).abs()
    assert (off <= ref["near"]).all(), f"rank off by more than the near-ties: {off.max()}"
