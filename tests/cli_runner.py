"""Running the CLI in-process, as tests do."""

from __future__ import annotations

import pytest

from entropy_fast.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `entropy-fast ARGV`."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
