"""The one error base of entropy-fast.

An `EntropyFastError` is a problem the user can fix: bad input, a missing file or extra, a
store in the wrong state. Its message says what is wrong in the library's own terms
(Python parameter names); its `hint` says what to do. The CLI prints both on one line,
with parameters renamed to their flags; every other exception is a bug or an environment
failure and keeps its traceback.
"""

from __future__ import annotations


class EntropyFastError(Exception):
    """A user-fixable problem. `param` names the setting at fault, when one is.

    Args:
        message: what is wrong, naming the value and, where one is, the parameter.
        hint: what to do about it (optional).
        param: the Python parameter at fault, so a front end can name its own option.
    """

    def __init__(self, message: str, hint: str | None = None, *,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.param = param

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}; {self.hint}"


class ConfigError(EntropyFastError, ValueError):
    """An invalid setting (alpha, layer_stride, sampling option, ...)."""


class MissingDependencyError(EntropyFastError, ImportError):
    """An optional extra (vllm, ray, bitsandbytes, pandas) is needed but not installed."""


def require(module: str, extra: str, purpose: str) -> None:
    """Raise MissingDependencyError unless `module` can be imported (cheap: no import)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{purpose} needs the '{module}' package",
                                     f"pip install 'entropy-fast[{extra}]'")
