"""Independent float64 references, written the obvious way (full softmax, textbook sums)."""

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
        elif a == 0.0:
            columns.append(torch.full(p.shape[:-1], math.log(p.shape[-1]), dtype=torch.float64,
                                      device=p.device))
        else:
            columns.append(torch.log((p**a).sum(-1)) / (1 - a))
    return torch.stack(columns, dim=-1)


def lens_logits_float64(lens, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
    """The lens logits recomputed with float64 copies of the model's own modules."""
    h = hidden.double()
    if not normed:
        if lens.norm is not None:
            h = copy.deepcopy(lens.norm).double()(h)
        if lens.projection is not None:
            h = copy.deepcopy(lens.projection).double()(h)
    logits = h @ lens.head.weight.double().T
    if getattr(lens.head, "bias", None) is not None:
        logits = logits + lens.head.bias.double()
    logits = logits * lens.logit_scale
    if lens.softcap:
        logits = torch.tanh(logits / lens.softcap) * lens.softcap
    return logits
