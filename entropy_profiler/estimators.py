"""entropy-profiler 0.2.1's `entropy_profiler.estimators`, re-exported from entropy_fast."""

from entropy_fast.estimators import MatrixRenyiMI

__all__ = ["MatrixRenyiMI"]
