"""Long-format entropy rows from arrays: many prompts at once, numpy in, Arrow out.

The one definition of how statistics become ENTROPY_SCHEMA rows, for a whole batch of
prompts (a run's host stage) and for one profile alike (`codec.profile_rows`). Torch-free:
callers hand over numpy arrays.

A batch's rows are ordered by (alpha, prompt, pos, layer): for one alpha that is each
prompt's tokens in order, layer by layer; readers sort as they need. `top_token_rows`
makes the TOP_TOKENS_SCHEMA rows of the same tokens, ordered by (prompt, pos, layer, rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from entropy_fast.store.schema import ENTROPY_SCHEMA, TOP_TOKENS_SCHEMA

OPTIONAL_COLUMNS = {"top_token_id": np.int32, "target_surprisal": np.float32,
                    "target_rank": np.int32, "kl_to_final": np.float32}
"""The nullable statistics and their stored dtype; they do not depend on alpha (they repeat
for each alpha)."""


def long_rows(prompt_ids: np.ndarray, pos: np.ndarray, token_ids: np.ndarray,
              layers: Sequence[int], alphas: Sequence[float], entropy: np.ndarray,
              optional: dict[str, np.ndarray | None] | None = None) -> pa.RecordBatch:
    """The ENTROPY_SCHEMA rows of `n` profile rows (tokens) of any number of prompts.

    prompt_ids, pos, token_ids: (n,) per token; entropy: (n x n_layers x n_alphas) in the
    run's unit; optional: column name -> (n x n_layers) values, or None / absent for a
    column of nulls. Returns n_alphas * n * n_layers rows.
    """
    n, n_layers, n_alphas = entropy.shape
    if not len(prompt_ids) == len(pos) == len(token_ids) == n:
        raise ValueError(f"{len(prompt_ids)}, {len(pos)} and {len(token_ids)} per-token "
                         f"values for {n} rows of statistics")
    per_token = n * n_layers
    total = n_alphas * per_token

    def token_column(values: np.ndarray) -> np.ndarray:
        return np.tile(np.repeat(values.astype(np.int32, copy=False), n_layers), n_alphas)

    columns: dict[str, np.ndarray | pa.Array] = {
        "prompt_id": token_column(prompt_ids),
        "pos": token_column(pos),
        "token_id": token_column(token_ids),
        "layer": np.tile(np.asarray(layers, dtype=np.int16), n_alphas * n),
        "alpha": np.repeat(np.asarray(alphas, dtype=np.float64), per_token),
        "entropy": np.ascontiguousarray(entropy.transpose(2, 0, 1), dtype=np.float32
                                        ).reshape(-1),
    }
    for name, dtype in OPTIONAL_COLUMNS.items():
        values = (optional or {}).get(name)
        columns[name] = (pa.nulls(total, ENTROPY_SCHEMA.field(name).type) if values is None
                         else np.tile(values.reshape(-1).astype(dtype, copy=False), n_alphas))
    arrays = [c if isinstance(c := columns[f.name], pa.Array) else pa.array(c)
              for f in ENTROPY_SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=ENTROPY_SCHEMA)


def top_token_rows(prompt_ids: np.ndarray, pos: np.ndarray, layers: Sequence[int],
                   top_tokens: np.ndarray, top_probs: np.ndarray) -> pa.RecordBatch:
    """The TOP_TOKENS_SCHEMA rows of `n` profile rows: top_tokens and top_probs are
    (n x n_layers x k); returns n * n_layers * k rows."""
    n, n_layers, k = top_tokens.shape
    per_token = n_layers * k
    columns = {
        "prompt_id": np.repeat(prompt_ids.astype(np.int32, copy=False), per_token),
        "pos": np.repeat(pos.astype(np.int32, copy=False), per_token),
        "layer": np.tile(np.repeat(np.asarray(layers, dtype=np.int16), k), n),
        "rank": np.tile(np.arange(k, dtype=np.int16), n * n_layers),
        "token_id": top_tokens.reshape(-1).astype(np.int32),
        "prob": top_probs.reshape(-1).astype(np.float32, copy=False),
    }
    return pa.RecordBatch.from_arrays([pa.array(columns[f.name]) for f in TOP_TOKENS_SCHEMA],
                                      schema=TOP_TOKENS_SCHEMA)


def token_positions(counts: Sequence[int]) -> np.ndarray:
    """0..count-1 for each count, concatenated: the `pos` of consecutive prompts' rows."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return (np.arange(int(counts.sum()), dtype=np.int64) - starts).astype(np.int32)
