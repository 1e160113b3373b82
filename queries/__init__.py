"""Named DuckDB queries of entropy-fast (installed as `entropy_fast.queries`)."""
