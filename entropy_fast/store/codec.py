"""Profiles to rows and back: the only part of the store that knows torch and profiles.

`profile_rows` turns one `EntropyProfile` into long-format rows (ENTROPY_SCHEMA, and
TOP_TOKENS_SCHEMA for its top tokens); `read_profiles` rebuilds profiles from committed
parts, verifying each file's checksum as it is read (a damaged part raises instead of
returning wrong numbers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from entropy_fast.profile import AggregatedProfile, EntropyProfile
from entropy_fast.settings import describe
from entropy_fast.store.errors import StoreError
from entropy_fast.store.layout import Store
from entropy_fast.store.records import ManifestEntry, RunInfo
from entropy_fast.store.rows import long_rows, top_token_rows

_OPTIONAL = {
    "top_token_id": ("top_token_ids", torch.int64),
    "target_surprisal": ("target_surprisal", torch.float32),
    "target_rank": ("target_rank", torch.int64),
    "kl_to_final": ("kl_to_final", torch.float32),
}
"""Nullable column -> (EntropyProfile attribute, dtype read back)."""


def profile_rows(prompt_id: int, profile: EntropyProfile, alphas: Sequence[float]
                 ) -> tuple[pa.RecordBatch, pa.RecordBatch | None]:
    """The long-format rows of one profile (`rows.long_rows`), ordered by (alpha, pos,
    layer): (n_alphas * n_tokens * n_layers) rows in ENTROPY_SCHEMA; and its top tokens'
    rows (`rows.top_token_rows`), None for a profile without them."""
    missing = [a for a in alphas if a not in profile.entropies]
    if missing:
        raise StoreError(f"profile of prompt {prompt_id} lacks alphas {missing}")
    n_tokens = profile.n_tokens
    entropy = np.stack([profile.entropies[a].detach().cpu().numpy() for a in alphas], axis=-1)
    optional = {column: None if (value := getattr(profile, attr)) is None
                else value.detach().cpu().numpy()
                for column, (attr, _) in _OPTIONAL.items()}
    prompt_ids, pos = np.full(n_tokens, prompt_id), np.arange(n_tokens)
    rows = long_rows(prompt_ids, pos, profile.token_ids.cpu().numpy(), profile.layer_indices,
                     alphas, entropy, optional)
    top = None
    if profile.top_tokens is not None:
        top = top_token_rows(prompt_ids, pos, profile.layer_indices,
                             profile.top_tokens.cpu().numpy(), profile.top_probs.cpu().numpy())
    return rows, top


def read_profiles(store: Store, model: str | None = None, run_id: str | None = None, *,
                  alpha: float | None = None, prompt_ids: Collection[int] | None = None,
                  ) -> Iterator[tuple[int, EntropyProfile]]:
    """Yield (prompt_id, profile) for the committed prompts of the matching runs.

    Profiles carry every alpha of their run in `entropies`; the primary order is `alpha`
    (default: the run's first). `prompt_ids`: only these prompts (parts holding none of
    them are not read). Memory holds one part (~1M rows) at a time.
    """
    runs = {r.run_id: r for r in store.runs()
            if (model is None or r.model == model) and (run_id is None or r.run_id == run_id)}
    if not runs:
        raise StoreError(f"no run in {store.root} matches model={model!r} run_id={run_id!r}")
    wanted = None if prompt_ids is None else set(prompt_ids)
    for entry in store.manifest():
        if entry.run_id in runs and (wanted is None or wanted.intersection(entry.prompt_ids)):
            for prompt_id, profile in _part_profiles(store, entry, runs[entry.run_id], alpha):
                if wanted is None or prompt_id in wanted:
                    yield prompt_id, profile


def aggregated(store: Store, model: str, run_id: str | None = None, *,
               alpha: float | None = None) -> AggregatedProfile:
    """All committed profiles of a model (one run) as an AggregatedProfile, by prompt_id."""
    pairs = sorted(read_profiles(store, model, run_id, alpha=alpha), key=lambda p: p[0])
    return AggregatedProfile([p for _, p in pairs], model_name=model)


def read_part_file(store: Store, entry: Any, relative: str) -> pa.Table:
    """One committed file, its bytes checked against the manifest's sha256 first."""
    path = store.root / relative
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{relative} is committed in the manifest but missing",
                         "run `entropy-fast check --repair STORE`, then rerun the run to "
                         "recompute its prompts") from None
    expected = (entry.checksums or {}).get(relative)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise StoreError(f"{relative} is damaged: its sha256 differs from the one recorded "
                         f"at commit (prompts {_ids(entry.prompt_ids)})",
                         "run `entropy-fast check --repair STORE`, then rerun the run to "
                         "recompute them")
    return pq.read_table(pa.BufferReader(data))


def _ids(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:8])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")


def _part_profiles(store: Store, entry: ManifestEntry, info: RunInfo,
                   alpha: float | None) -> Iterator[tuple[int, EntropyProfile]]:
    """The profiles of one committed part."""
    rows = read_part_file(store, entry, entry.entropy_file).sort_by(
        [(c, "ascending") for c in ("prompt_id", "alpha", "pos", "layer")])
    prompts = read_part_file(store, entry, entry.prompts_file).to_pylist()
    order = [p["prompt_id"] for p in prompts]
    blocks = _by_prompt(rows, order)
    top = [None] * len(prompts)
    if entry.top_tokens_file is not None:
        top_rows = read_part_file(store, entry, entry.top_tokens_file).sort_by(
            [(c, "ascending") for c in ("prompt_id", "pos", "layer", "rank")])
        top = _by_prompt(top_rows, order)
    for prompt, block, top_block in zip(prompts, blocks, top, strict=True):
        profile = _block_profile(block, prompt, info, alpha)
        if top_block is not None:
            shape = (profile.n_tokens, profile.n_layers, info.lens.top_tokens)
            profile.top_tokens = torch.from_numpy(
                top_block.column("token_id").to_numpy().reshape(shape).astype(np.int64))
            profile.top_probs = torch.from_numpy(
                top_block.column("prob").to_numpy().reshape(shape).copy())
        yield prompt["prompt_id"], profile


def _by_prompt(rows: pa.Table, prompt_ids: Sequence[int]) -> list[pa.Table]:
    """The rows of each prompt of `prompt_ids`, from rows sorted by prompt_id first."""
    ids = rows.column("prompt_id").to_numpy()
    starts = np.searchsorted(ids, prompt_ids, side="left")
    stops = np.searchsorted(ids, prompt_ids, side="right")
    return [rows.slice(a, b - a) for a, b in zip(starts, stops, strict=True)]


def _block_profile(block: pa.Table, prompt: dict[str, Any], info: RunInfo,
                   alpha: float | None) -> EntropyProfile:
    """Rebuild one prompt's profile from its rows, sorted by (alpha, pos, layer)."""
    alphas = info.lens.alphas
    n_tok, layers = prompt["n_tokens"], info.layer_indices or []
    by_value = sorted(alphas)
    shape = (len(by_value), n_tok, len(layers))
    values = block.column("entropy").to_numpy().reshape(shape)
    entropies = {a: torch.from_numpy(values[by_value.index(a)].copy()) for a in alphas}
    primary = alphas[0] if alpha is None else float(alpha)
    if primary not in entropies:
        raise StoreError(f"run {info.run_id} has alphas {alphas}, not {primary}")
    token_ids = block.column("token_id").to_numpy()[: n_tok * len(layers): len(layers) or 1]
    extra = {attr: _optional(block, column, shape, dtype)
             for column, (attr, dtype) in _OPTIONAL.items()}
    metadata = {**describe(info.lens, info.sampling, info.dtype, info.generator),
                "prompt": prompt["text"], "prompt_token_ids": prompt["prompt_token_ids"],
                "run_id": info.run_id, "weights": info.weights, "source": prompt["source"],
                "source_line": prompt["source_line"]}
    return EntropyProfile(entropy=entropies[primary], token_ids=torch.as_tensor(token_ids.copy()),
                          layer_indices=layers, alpha=primary, model_name=info.model,
                          metadata=metadata, entropies=entropies, **extra)


def _optional(block: pa.Table, column: str, shape: tuple[int, int, int],
              dtype: torch.dtype) -> torch.Tensor | None:
    """The (n_tokens x n_layers) values of a nullable column, or None when all null (or
    absent: a file older than the column)."""
    if column not in block.column_names:
        return None
    col = block.column(column)
    if len(col) == 0 or col.null_count == len(col):
        return None
    values = col.to_numpy(zero_copy_only=False).reshape(shape)[0]
    return torch.from_numpy(values.copy()).to(dtype)
