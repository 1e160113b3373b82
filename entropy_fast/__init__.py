"""entropy-fast: logit-lens entropy profiles of transformer language models, at corpus scale."""

from entropy_fast.entropy import renyi_entropy, shannon_entropy
from entropy_fast.lens import Lens, UnsupportedArchitectureError
from entropy_fast.loading import DEFAULT_MODEL, ModelNotFoundError, load_model
from entropy_fast.profile import AggregatedProfile, EntropyProfile
from entropy_fast.profiler import EntropyProfiler

__version__ = "0.3.0"

__all__ = [
    "DEFAULT_MODEL",
    "AggregatedProfile",
    "EntropyProfile",
    "EntropyProfiler",
    "Lens",
    "ModelNotFoundError",
    "UnsupportedArchitectureError",
    "load_model",
    "renyi_entropy",
    "shannon_entropy",
]
