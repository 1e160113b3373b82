"""entropy-profiler 0.2.1's `entropy_profiler.profiler`, re-exported from entropy_fast."""

from entropy_fast.entropy import renyi_entropy, shannon_entropy
from entropy_fast.profile import AggregatedProfile, EntropyProfile
from entropy_fast.profiler import EntropyProfiler

__all__ = ["AggregatedProfile", "EntropyProfile", "EntropyProfiler", "renyi_entropy",
           "shannon_entropy"]
