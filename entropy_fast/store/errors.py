"""The store's error: a store that is missing, foreign, damaged or used inconsistently."""

from entropy_fast.errors import EntropyFastError


class StoreError(EntropyFastError, ValueError):
    """A store is missing, not a store, of another version, damaged, locked, or used
    inconsistently (other settings under the same run id, another shard layout)."""
