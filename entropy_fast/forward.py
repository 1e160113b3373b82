"""The teacher-forced forward, with taps on the residual stream: every block's hidden
state, pre-norm, as soon as it exists.

Hidden-state index i follows HF's `output_hidden_states` numbering: 0 is the input of
the first block (the embedding output), i >= 1 is the output of block i - 1. Unlike HF's
tuple, whose last entry is already passed through the final norm, every tapped state is
pre-norm, so the lens treats all layers the same way. Taps hand each state to a callback
as soon as it exists, so a caller can reduce it (to entropies) and drop it: memory holds
one layer's states at a time, not L + 1 of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
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


@dataclass
class TeacherForced:
    """One token sequence to run teacher-forced: rows predict ids[first_target:].

    index: the caller's name for it (a prompt index); generated: whether ids after
    first_target were generated (else they are the text's own tokens).
    """

    index: int
    ids: list[int]
    first_target: int
    generated: bool

    @property
    def n_rows(self) -> int:
        """Profile rows: one per target token."""
        return len(self.ids) - self.first_target


@torch.no_grad()
def forward_rows(model: nn.Module, layers: nn.ModuleList, batch: Sequence[TeacherForced],
                 indices: Sequence[int], pad_id: int, reduce: StateCallback) -> None:
    """One right-padded teacher-forced forward of the base model over `batch`.

    For each hidden-state index in `indices`, calls reduce(index, rows (n x d)) with the
    states at the positions that predict each sequence's targets, the sequences' rows
    concatenated in batch order. The LM head never runs: the lens does its work.
    """
    input_ids, attention_mask, positions = _right_padded(batch, pad_id)
    device = next(model.parameters()).device
    flat_positions = to_device(positions, device)

    def select(index: int, hidden: torch.Tensor) -> None:
        reduce(index, hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_positions))

    with StateTap(layers, indices, select):
        model.base_model(input_ids=to_device(input_ids, device),
                         attention_mask=to_device(attention_mask, device), use_cache=False)


def _right_padded(batch: Sequence[TeacherForced], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the batch right-padded (batch x width, int64; the
    last token of a sequence is never an input), and the flat positions (into batch x
    width) of the rows that predict each sequence's targets, in batch order. Built with
    a few numpy calls rather than per sequence: a batch can hold thousands of short ones."""
    lengths = np.fromiter((len(s.ids) - 1 for s in batch), dtype=np.int64, count=len(batch))
    width = int(lengths.max())
    ids = np.fromiter(chain.from_iterable(s.ids[:-1] for s in batch), dtype=np.int64,
                      count=int(lengths.sum()))
    real = np.arange(width) < lengths[:, None]  # right padding: real tokens never see pads
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    input_ids[real] = ids
    firsts = np.fromiter((s.first_target - 1 for s in batch), dtype=np.int64, count=len(batch))
    counts = lengths - firsts
    starts = np.arange(len(batch)) * width + firsts
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    positions = np.repeat(starts, counts) + offsets
    return (torch.from_numpy(input_ids), torch.from_numpy(real.astype(np.int64)),
            torch.from_numpy(positions))


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values` on `device`. On CUDA through pinned memory without blocking: a copy from
    pageable memory would make the host wait for the previous batch's kernels, so the next
    batch could not be queued while the device works on the last."""
    if device.type != "cuda":
        return values
    return values.pin_memory().to(device, non_blocking=True)
