"""The one parameter table of lens cases, run over both lens backends (tests/test_lens.py).

Each case is a lens built by hand (norm, head, bias, soft-cap, logit scale) and hidden rows
that carry the numerical hazards of STYLE.md item 15: row 0 all zeros, rows 1-4 nearly
one-hot (entropy ~1e-10, late layers), the rest random; whole cases for near-uniform rows
(early layers) and huge logits (|z| ~ 1e4). Shapes include odd sizes that break masking
(STYLE.md item 13). Vocabularies stay small: the Triton interpreter's cost grows with the
number of tiles.

Backends: "torch" runs with small row blocks and vocabulary chunks here (several of each,
the last ones ragged), "triton" with the launcher's default tiles (under the interpreter
on CPU; compiled on CUDA when TRITON_INTERPRET=0).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from entropy_fast.lens import Lens

ALPHAS = (0.0, 0.5, 0.999, 1.0, 1.001, 2.0, math.inf)
BACKENDS = ("torch", "triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# name: (d, V, norm, head bias, soft-cap, logit scale, head weight std, rows)
CASES = {
    "layernorm": (100, 500, "layernorm", True, None, 1.0, 1.0, 70),
    "layernorm-nobias": (100, 211, "layernorm-nobias", False, None, 1.0, 1.0, 70),
    "rmsnorm-even": (64, 512, "rmsnorm", False, None, 1.0, 1.0, 64),  # no masks at all
    "gemma-softcap": (48, 211, "gemma", False, 3.0, 1.0, 1.0, 70),
    "no-norm": (37, 500, None, True, None, 0.5, 1.0, 70),
    "bias-scale-softcap": (100, 211, "rmsnorm", True, 30.0, 2.0, 1.0, 70),
    "huge-logits": (100, 500, "layernorm", True, None, 300.0, 1.0, 70),
    "near-uniform": (100, 500, "rmsnorm", False, None, 1.0, 1e-3, 70),
    "odd-shape": (123, 507, "layernorm", True, None, 1.0, 1.0, 131),
}
BF16_CASES = ("layernorm", "gemma-softcap", "bias-scale-softcap", "huge-logits",
              "near-uniform", "odd-shape")


class GemmaStyleNorm(nn.Module):
    """RMSNorm scaled by (1 + weight), computed in the input's dtype (float64 for references)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width) * 0.3)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * (1.0 + self.weight)


def make_norm(kind: str | None, width: int) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "gemma":
        return GemmaStyleNorm(width)
    norm = {"layernorm": lambda: nn.LayerNorm(width, eps=1e-5),
            "layernorm-nobias": lambda: nn.LayerNorm(width, eps=1e-5, bias=False),
            "rmsnorm": lambda: nn.RMSNorm(width, eps=1e-6)}[kind]()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0.0, 0.2)
    return norm


def make_case(name: str, dtype: torch.dtype = torch.float32, n_rows: int | None = None,
              seed: int = 0) -> tuple[Lens, torch.Tensor, torch.Tensor]:
    """(lens, hidden (n x d) pre-norm rows, targets (n,)) of one case, on DEVICE."""
    d, vocab, norm_kind, has_bias, softcap, scale, std, rows = CASES[name]
    n_rows = rows if n_rows is None else n_rows
    gen = torch.manual_seed(seed)
    head = nn.Linear(d, vocab, bias=has_bias)
    with torch.no_grad():
        head.weight.normal_(0.0, std, generator=gen)
        if has_bias:
            head.bias.normal_(0.0, 1.0, generator=gen)
    lens = Lens(head, make_norm(norm_kind, d), softcap=softcap, logit_scale=scale)
    lens.row_block, lens.vocab_chunk = 32, 128  # torch backend: several of each, ragged
    hidden = torch.randn(n_rows, d, generator=gen) * 2.0 + 0.3
    hidden[0] = 0.0
    hidden[1:5] = head.weight[torch.tensor([3, 7, vocab - 1, vocab // 2])].detach() * 20.0 / std
    targets = torch.randint(0, vocab, (n_rows,), generator=gen)
    targets[1] = 3  # the top token itself
    return to(lens, dtype), hidden.to(DEVICE, dtype), targets.to(DEVICE)


def to(lens: Lens, dtype: torch.dtype) -> Lens:
    """The lens's modules moved to DEVICE and `dtype`, in place."""
    for module in (lens.head, lens.norm, lens.projection):
        if module is not None:
            module.to(DEVICE, dtype)
    return lens


def kernel_operands(lens: Lens, hidden: torch.Tensor) -> torch.Tensor:
    """The rows the kernel multiplies: its fp32 norm (NormSpec.apply) rounded once to the
    head's dtype; the lens's modules where it cannot fuse the norm."""
    spec = lens.norm_spec
    rows = lens.normalize(hidden) if spec is None else spec.apply(hidden)
    return rows.to(lens.head.weight.dtype)


def on_device(model: nn.Module) -> nn.Module:
    """The model itself on CPU; a copy on DEVICE otherwise (fixtures are shared)."""
    return model if DEVICE.type == "cpu" else copy.deepcopy(model).to(DEVICE)
