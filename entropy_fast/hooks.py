"""Tapping the residual stream: every block's hidden state, pre-norm, during one forward.

Hidden-state index i follows HF's `output_hidden_states` numbering: 0 is the input of
the first block (the embedding output), i >= 1 is the output of block i - 1. Unlike HF's
tuple, whose last entry is already passed through the final norm, every tapped state is
pre-norm, so the lens treats all layers the same way. Taps hand each state to a callback
as soon as it exists, so a caller can reduce it (to entropies) and drop it: memory holds
one layer's states at a time, not L + 1 of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

StateCallback = Callable[[int, torch.Tensor], None]


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks, found by its length (num_hidden_layers)."""
    config = model.config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    base = getattr(model, "base_model", model)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [m for m in lists if len(m) == n_layers]
    if not matching:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__}: no ModuleList of "
            f"num_hidden_layers={n_layers} modules (found lists of lengths "
            f"{sorted({len(m) for m in lists})}). This architecture is not supported yet."
        )
    return matching[0]


def _first_tensor(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


class StateTap:
    """Context manager that calls `callback(index, hidden (batch x seq x d))` per state.

    `indices` are hidden-state indices in 0..L (see the module docstring).
    """

    def __init__(self, layers: nn.ModuleList, indices: Sequence[int],
                 callback: StateCallback) -> None:
        n_states = len(layers) + 1
        bad = [i for i in indices if not 0 <= i < n_states]
        if bad:
            raise ValueError(f"hidden-state indices {bad} are outside 0..{n_states - 1}")
        self.layers = layers
        self.indices = sorted(set(indices))
        self.callback = callback
        self._handles: list = []

    def __enter__(self) -> StateTap:
        for index in self.indices:
            if index == 0:
                handle = self.layers[0].register_forward_pre_hook(
                    self._embedding_hook, with_kwargs=True)
            else:
                handle = self.layers[index - 1].register_forward_hook(self._block_hook(index))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _embedding_hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.callback(0, hidden)

    def _block_hook(self, index: int):
        def hook(module, args, output):
            self.callback(index, _first_tensor(output))
        return hook
