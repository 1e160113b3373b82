"""Result types: one prompt's entropy profile and a collection of them, and layer numbering.

An `EntropyProfile` is a (n_tokens x n_layers) float32 matrix: row i holds, at each
profiled layer, the entropy of the logit-lens distribution that predicts token_ids[i].
Several Rényi orders computed in one pass travel together in `entropies`; `entropy` is
the primary order (`alpha`), the one the seed library exposed.

Every profile says how its `layer_indices` count layers (`numbering`):

- "hidden_state" (entropy_fast's own): HF's output_hidden_states index. 0 is the embedding
  output, i >= 1 the output of block i (1-based), L the last block (the model's output).
- "block" (entropy-profiler 0.2.1's): the 0-based index of the block whose output the column
  holds, so block b is hidden state b + 1 and there is no embedding column.

`profile.blocks()` gives the 0.2.1 view of any profile (the embedding column, which is no
block's output, is dropped); `profile.to_numbering("hidden_state")` the native one. Code
that compares or labels layers goes through `hidden_state_indices`, so profiles of either
numbering can be mixed without one layer ever being taken for another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

HIDDEN_STATE = "hidden_state"
BLOCK = "block"
NUMBERINGS = (HIDDEN_STATE, BLOCK)


def check_numbering(numbering: str) -> str:
    """Return `numbering` if it is one of NUMBERINGS, else raise ValueError."""
    if numbering not in NUMBERINGS:
        raise ValueError(f"numbering must be one of {NUMBERINGS}, got {numbering!r}")
    return numbering


def hidden_state_indices(layer_indices: Sequence[int], numbering: str) -> list[int]:
    """The HF hidden-state index of each layer index given in `numbering`."""
    shift = 1 if check_numbering(numbering) == BLOCK else 0
    return [int(i) + shift for i in layer_indices]


def layer_axis_label(numbering: str) -> str:
    """Axis label naming what a layer index means in `numbering`."""
    if check_numbering(numbering) == BLOCK:
        return "block index (0 = first block's output)"
    return "hidden-state index (0 = embeddings)"


@dataclass
class EntropyProfile:
    """Per-token, per-layer logit-lens entropy of one sequence.

    Attributes:
        entropy: (n_tokens x n_layers) float32, entropy at the primary order `alpha`.
        token_ids: (n_tokens,) int64, the token each row's distribution predicts.
        layer_indices: the index of each column's layer, counted as `numbering` says.
        alpha: the Rényi order of `entropy` (1.0 = Shannon).
        model_name: the model's name or path.
        metadata: free-form run information (prompt, generator, dtype, ...).
        entropies: {alpha: (n_tokens x n_layers)} for every order computed in the same pass,
            the primary one included.
        top_token_ids: optional (n_tokens x n_layers) int64, the lens argmax token.
        target_surprisal: optional (n_tokens x n_layers) float32, -log p(token_ids[i]).
        target_rank: optional (n_tokens x n_layers) int64, rank of token_ids[i] (0 = top).
        top_tokens: optional (n_tokens x n_layers x k) int64, the lens's k most probable
            tokens, most probable first (ties: lower token id first).
        top_probs: optional (n_tokens x n_layers x k) float32, their probabilities.
        kl_to_final: optional (n_tokens x n_layers) float32, KL(p_final || p_layer) in the
            profile's unit (nats, or bits with base=2): 0 at the last layer.
        numbering: "hidden_state" (0 = embeddings, i = block i's output, 1-based) or "block"
            (0-based block index, entropy-profiler 0.2.1's); see the module docstring.
    """

    entropy: torch.Tensor
    token_ids: torch.Tensor
    layer_indices: list[int]
    alpha: float = 1.0
    model_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    entropies: dict[float, torch.Tensor] = field(default_factory=dict)
    top_token_ids: torch.Tensor | None = None
    target_surprisal: torch.Tensor | None = None
    target_rank: torch.Tensor | None = None
    top_tokens: torch.Tensor | None = None
    top_probs: torch.Tensor | None = None
    kl_to_final: torch.Tensor | None = None
    numbering: str = HIDDEN_STATE

    def __post_init__(self) -> None:
        check_numbering(self.numbering)
        self.entropy = torch.as_tensor(self.entropy, dtype=torch.float32)
        self.token_ids = torch.as_tensor(self.token_ids, dtype=torch.int64)
        self.layer_indices = [int(i) for i in self.layer_indices]
        self.alpha = float(self.alpha)
        if self.entropy.ndim != 2:
            raise ValueError(
                f"entropy must be (n_tokens x n_layers), got shape {tuple(self.entropy.shape)}"
            )
        if self.entropy.shape[0] != self.token_ids.shape[0]:
            raise ValueError(
                f"entropy has {self.entropy.shape[0]} rows but token_ids has "
                f"{self.token_ids.shape[0]} entries; they must match"
            )
        if self.entropy.shape[1] != len(self.layer_indices):
            raise ValueError(
                f"entropy has {self.entropy.shape[1]} columns but layer_indices has "
                f"{len(self.layer_indices)} entries; they must match"
            )
        self.entropies = {float(a): torch.as_tensor(e, dtype=torch.float32)
                          for a, e in self.entropies.items()}
        self.entropies.setdefault(self.alpha, self.entropy)
        if any(i < 0 for i in self.layer_indices):
            raise ValueError(f"layer_indices must be >= 0, got {self.layer_indices}")

    @property
    def n_tokens(self) -> int:
        """Number of profiled tokens (rows)."""
        return int(self.entropy.shape[0])

    @property
    def n_layers(self) -> int:
        """Number of profiled layers (columns)."""
        return int(self.entropy.shape[1])

    @property
    def alphas(self) -> tuple[float, ...]:
        """Every Rényi order carried by this profile, the primary one first."""
        return (self.alpha, *(a for a in self.entropies if a != self.alpha))

    def mean_profile(self) -> torch.Tensor:
        """(n_layers,) mean entropy over tokens at each layer."""
        return self.entropy.mean(dim=0)

    def std_profile(self) -> torch.Tensor:
        """(n_layers,) standard deviation over tokens at each layer (0 for one token)."""
        if self.n_tokens < 2:
            return torch.zeros(self.n_layers)
        return self.entropy.std(dim=0)

    def to_numpy(self) -> np.ndarray:
        """(n_tokens x n_layers) float32 copy of `entropy`."""
        return self.entropy.detach().cpu().numpy().astype(np.float32)

    def at_alpha(self, alpha: float) -> EntropyProfile:
        """The same profile with `alpha` as its primary order."""
        alpha = float(alpha)
        if alpha not in self.entropies:
            raise ValueError(
                f"this profile has no entropy of order {alpha}; it carries {self.alphas}. "
                "Profile again with that alpha included."
            )
        return replace(self, entropy=self.entropies[alpha], alpha=alpha)

    @property
    def hidden_state_indices(self) -> list[int]:
        """The HF hidden-state index of each column (0 = embeddings), whatever the numbering."""
        return hidden_state_indices(self.layer_indices, self.numbering)

    def to_numbering(self, numbering: str) -> EntropyProfile:
        """The same profile with its layers counted as `numbering` says.

        Columns keep their values; to "block" the embedding column (hidden state 0), which
        is no block's output, is dropped.
        """
        if check_numbering(numbering) == self.numbering:
            return self
        states = self.hidden_state_indices
        keep = [k for k, i in enumerate(states) if i > 0 or numbering == HIDDEN_STATE]
        shift = 1 if numbering == BLOCK else 0
        columns = torch.tensor(keep, dtype=torch.long)

        def take(matrix: torch.Tensor | None) -> torch.Tensor | None:
            return None if matrix is None else matrix.index_select(1, columns)

        return replace(
            self, entropy=take(self.entropy), layer_indices=[states[k] - shift for k in keep],
            entropies={a: take(e) for a, e in self.entropies.items()},
            top_token_ids=take(self.top_token_ids),
            target_surprisal=take(self.target_surprisal), target_rank=take(self.target_rank),
            top_tokens=take(self.top_tokens), top_probs=take(self.top_probs),
            kl_to_final=take(self.kl_to_final), numbering=numbering)

    def blocks(self) -> EntropyProfile:
        """entropy-profiler 0.2.1's view: columns are block outputs, 0-based, no embeddings."""
        return self.to_numbering(BLOCK)

    def drop_positions(self, n: int) -> EntropyProfile:
        """The profile without its first n rows (n >= 0; all rows gone when n >= n_tokens).

        In text mode row 0 predicts the text's second token from its first one alone (often
        BOS), which dominates the middle layers of some models; n = 1 leaves it out.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of positions to drop must be an integer >= 0, "
                             f"got {n!r}")
        if n == 0:
            return self

        def rows(matrix: torch.Tensor | None) -> torch.Tensor | None:
            return None if matrix is None else matrix[n:]

        return replace(self, entropy=self.entropy[n:], token_ids=self.token_ids[n:],
                       entropies={a: e[n:] for a, e in self.entropies.items()},
                       top_token_ids=rows(self.top_token_ids),
                       target_surprisal=rows(self.target_surprisal),
                       target_rank=rows(self.target_rank))


@dataclass
class AggregatedProfile:
    """A collection of profiles of one model over many prompts.

    Each prompt weighs the same: `to_matrix()` stacks the per-prompt mean profiles and
    `mean_profile()` averages them.
    """

    profiles: list[EntropyProfile]
    model_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layer_sets = {(p.numbering, tuple(p.layer_indices)) for p in self.profiles}
        if len(layer_sets) > 1:
            raise ValueError(
                "all profiles of an AggregatedProfile must share layer_indices and numbering; "
                f"got {len(layer_sets)} different sets: {sorted(layer_sets)[:2]}"
            )
        if not self.model_name and self.profiles:
            self.model_name = self.profiles[0].model_name

    def __len__(self) -> int:
        return len(self.profiles)

    def __iter__(self):
        return iter(self.profiles)

    def __getitem__(self, index: int) -> EntropyProfile:
        return self.profiles[index]

    @property
    def layer_indices(self) -> list[int]:
        """The index of each column's layer, shared by every profile (see `numbering`)."""
        return self.profiles[0].layer_indices if self.profiles else []

    @property
    def numbering(self) -> str:
        """How the profiles count layers: "hidden_state" (the default when empty) or "block"."""
        return self.profiles[0].numbering if self.profiles else HIDDEN_STATE

    def to_numbering(self, numbering: str) -> AggregatedProfile:
        """Every profile with its layers counted as `numbering` says (see EntropyProfile)."""
        return replace(self, profiles=[p.to_numbering(numbering) for p in self.profiles])

    def blocks(self) -> AggregatedProfile:
        """entropy-profiler 0.2.1's view of every profile (see EntropyProfile.blocks)."""
        return self.to_numbering(BLOCK)

    @property
    def n_layers(self) -> int:
        """Number of profiled layers."""
        return len(self.layer_indices)

    def pooled(self) -> EntropyProfile:
        """One profile holding every profile's rows, in order (each token weighs the same).

        The orders every profile carries travel along; the optional per-token statistics
        only where every profile has them. Metadata: the first profile's.
        """
        if not self.profiles:
            raise ValueError("AggregatedProfile is empty: profile at least one prompt first")
        first = self.profiles[0]
        alphas = [a for a in first.alphas if all(a in p.entropies for p in self.profiles)]

        def rows(attr: str) -> torch.Tensor | None:
            parts = [getattr(p, attr) for p in self.profiles]
            return None if any(part is None for part in parts) else torch.cat(parts)

        return replace(first, entropy=rows("entropy"), token_ids=rows("token_ids"),
                       entropies={a: torch.cat([p.entropies[a] for p in self.profiles])
                                  for a in alphas},
                       top_token_ids=rows("top_token_ids"),
                       target_surprisal=rows("target_surprisal"),
                       target_rank=rows("target_rank"), metadata=dict(first.metadata))

    def to_matrix(self) -> torch.Tensor:
        """(n_profiles x n_layers) matrix of per-prompt mean profiles."""
        if not self.profiles:
            raise ValueError("AggregatedProfile is empty: profile at least one prompt first")
        return torch.stack([p.mean_profile() for p in self.profiles])

    def mean_profile(self) -> torch.Tensor:
        """(n_layers,) mean of the per-prompt mean profiles."""
        return self.to_matrix().mean(dim=0)

    def std_profile(self) -> torch.Tensor:
        """(n_layers,) standard deviation across prompts (0 for one prompt)."""
        matrix = self.to_matrix()
        if matrix.shape[0] < 2:
            return torch.zeros(matrix.shape[1])
        return matrix.std(dim=0)
