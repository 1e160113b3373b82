"""The profile store: a folder of Parquet files, a manifest that commits them, run records.

Parts of the package, in data-flow order (none imports torch except `codec`):

- `schema`: the declared Parquet schemas and the Arrow types of record fields;
- `records`: the JSON records of runs and the manifest entries of committed parts;
- `layout`: the folder (marker, where each file lives) and reading records back;
- `writer`: streaming rows into committed parts, exactly once, resumable;
- `codec`: EntropyProfile <-> rows (torch);
- `sql`: DuckDB views and the named queries of queries/*.sql, and profiles back;
- `selection`: choosing runs by what they are, and labelling them;
- `compare`: the distance matrix of the chosen runs (imports torch when it computes);
- `check`: verifying a store, and repairing what can be repaired.
"""

from entropy_fast.store.errors import StoreError
from entropy_fast.store.layout import GENERATION, PROFILE, Stage, Store
from entropy_fast.store.records import (
    MARKER,
    SCHEMA_VERSION,
    GenerationEntry,
    GenerationInfo,
    ManifestEntry,
    RunInfo,
)

__all__ = ["GENERATION", "MARKER", "PROFILE", "SCHEMA_VERSION", "GenerationEntry",
           "GenerationInfo", "ManifestEntry", "RunInfo", "Stage", "Store", "StoreError"]
