"""Bundled data: the sample corpus that the built-in default run profiles."""

from importlib.resources import files
from pathlib import Path


def sample_corpus_path() -> Path:
    """Path of the bundled sample corpus (42 varied prompts, one per line)."""
    return Path(str(files("entropy_fast.data") / "sample_prompts.txt"))


def sample_prompts() -> list[str]:
    """The bundled sample corpus as a list of prompts."""
    return [line for line in sample_corpus_path().read_text().splitlines() if line.strip()]
