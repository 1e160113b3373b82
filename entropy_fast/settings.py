"""Settings: the single definition of every option of a profile or generation run.

Three frozen dataclasses say what a run does:

- `LensSettings`: what is measured (Rényi orders, layers, base, extra statistics);
- `SamplingSettings`: how continuations are drawn (or none: max_new_tokens=0);
- `ModelSettings`: how the model is loaded and run (dtype, device, generator, ...).

Everything else is derived from them: the profiler's keyword options, the CLI's flags and
their help (each field's metadata), the run identity and record in the store (fields whose
metadata says `identity`), and the columns of the store's `runs` view. A new option is one
new field here. Validation happens on construction and raises `ConfigError` naming the
field, so a bad value is refused before any model loads.

This module imports nothing heavy (no torch), so the CLI can build its parser instantly.
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from entropy_fast.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
BACKENDS = ("auto", "torch", "triton")
GENERATORS = ("hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
MAX_TOP_TOKENS = 32
WHEN_SET = "when set"


def option(default: Any, help: str, *, identity: bool | str = True, flag: str | None = None,
           choices: tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    """A settings field: its default, its help text (shown by --help), whether it is part
    of a run's identity, and, when it differs from --field-name, its CLI flag.

    identity=WHEN_SET: part of the identity only when it differs from the default, for a
    field added after runs were stored (their run ids stay what they were)."""
    metadata = {"help": help, "identity": identity, "flag": flag, "choices": choices,
                "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings are frozen: use a tuple default")
    return field(default=default, metadata=metadata)


def flag_of(f: Field) -> str:
    """The CLI flag of a settings field ('--layer-stride')."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class _Settings:
    """Shared behaviour: JSON round trip, identity, keyword construction."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that change what a run computes (inf-safe: floats by repr)."""
        return {f.name: _canonical(getattr(self, f.name)) for f in fields(self)
                if _in_identity(f, getattr(self, f.name))}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """Inverse of `to_dict`; unknown keys are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _in_identity(f: Field, value: Any) -> bool:
    identity = f.metadata.get("identity", True)
    return value != f.default if identity == WHEN_SET else bool(identity)


def _canonical(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return [_canonical(v) for v in value]
    return value


def _fail(param: str, message: str, hint: str | None = None) -> None:
    raise ConfigError(f"{param} {message}", hint, param=param)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, f"must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class LensSettings(_Settings):
    """What is measured at every profiled token and layer."""

    alphas: tuple[float, ...] = option(
        (1.0,), "Rényi order, repeatable (1 = Shannon, 2 = collision, inf = min-entropy, "
        "0 = log vocabulary size); all come out of one pass, the first is primary",
        flag="--alpha", metavar="A")
    layer_stride: int = option(
        1, "profile hidden states 0, k, 2k, ... and always the last one (0 = embeddings)",
        metavar="K")
    base: float | None = option(
        None, "logarithm base of the entropies: 2 gives bits (default: nats)", metavar="B")
    top_token: bool = option(False, "also record the lens's argmax token at every layer")
    target_stats: bool = option(
        False, "also record the surprisal and rank of the actual next token at every layer")
    top_tokens: int = option(
        0, f"also record the K most probable tokens and their probabilities at every layer "
        f"(K <= {MAX_TOP_TOKENS}; ties: lower token id first)", metavar="K",
        identity=WHEN_SET)
    kl_to_final: bool = option(
        False, "also record KL(p_final || p_layer) at every layer: the divergence of each "
        "layer's lens distribution from the model's own output (0 at the last layer)",
        identity=WHEN_SET)

    def __post_init__(self) -> None:
        alphas = (self.alphas,) if isinstance(self.alphas, (int, float)) else self.alphas
        object.__setattr__(self, "alphas", validate_alphas(alphas))
        _check_int("layer_stride", self.layer_stride, 1)
        _check_int("top_tokens", self.top_tokens, 0)
        if self.top_tokens > MAX_TOP_TOKENS:
            _fail("top_tokens", f"must be at most {MAX_TOP_TOKENS}, got {self.top_tokens}")
        if self.base is not None and not (self.base > 0 and self.base != 1
                                          and math.isfinite(self.base)):
            _fail("base", f"must be > 0 and != 1 (2 for bits), got {self.base!r}")

    @property
    def alpha(self) -> float:
        """The primary Rényi order."""
        return self.alphas[0]

    @property
    def unit(self) -> str:
        """'nats', 'bits' or 'log base B'."""
        if self.base is None:
            return "nats"
        return "bits" if self.base == 2 else f"log base {self.base:g}"


@dataclass(frozen=True)
class SamplingSettings(_Settings):
    """How prompts are presented and continuations drawn; greedy unless do_sample.
    max_new_tokens=0: text mode.

    Sampled continuations depend on the seed and, with the HF generator, on batch
    composition (the random stream is shared by a batch); greedy ones do not.
    """

    max_new_tokens: int = option(
        32, "tokens generated per prompt and profiled; 0 = profile the prompt text itself",
        metavar="N")
    do_sample: bool = option(False, "sample continuations instead of greedy decoding")
    temperature: float = option(1.0, "sampling temperature (with --do-sample)", metavar="T")
    top_p: float = option(1.0, "nucleus sampling threshold in (0, 1] (with --do-sample)",
                          metavar="P")
    top_k: int | None = option(None, "sample among the k most likely tokens only "
                               "(with --do-sample; default: all)", metavar="K")
    seed: int | None = option(None, "random seed of sampling", metavar="S")
    chat_template: bool = option(
        False, "wrap each prompt in the tokenizer's chat template (a user message, the "
        "assistant's turn opened) before tokenizing: for instruct models",
        identity=WHEN_SET)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 0)
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            _fail("temperature", f"must be > 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            _fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)

    @property
    def generating(self) -> bool:
        """Whether continuations are generated (else the text itself is profiled)."""
        return self.max_new_tokens > 0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for HF `model.generate` (sampling options only when sampling)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                                  "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
        else:  # override sampling defaults a checkpoint's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass(frozen=True)
class ModelSettings(_Settings):
    """How the model is loaded and run. dtype, generator and quantization change the
    numbers and belong to a run's identity; device, backend and batch size do not."""

    dtype: str | None = option(
        None, "model dtype (default: bfloat16 on CUDA, float32 on CPU)", choices=DTYPES)
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when present)",
                                identity=False)
    generator: str = option("hf", "what generates continuations: hf (batched HF decoding) "
                            "or vllm (needs the vllm extra)", choices=GENERATORS)
    load_in_8bit: bool = option(False, "load the model in 8 bits (needs the quantize extra)")
    load_in_4bit: bool = option(False, "load the model in 4 bits (needs the quantize extra)")
    backend: str = option("auto", "lens backend: auto (the Triton kernel on CUDA), torch "
                          "or triton", identity=False, choices=BACKENDS)
    batch_tokens: int = option(8192, "token budget of one padded batch (forward and "
                               "generation); lower it when memory runs out", identity=False,
                               metavar="N")
    threads: int | None = option(None, "CPU threads for torch (default on CPU: the cores "
                                 "other jobs leave idle while the model loads, at least 1; "
                                 "$OMP_NUM_THREADS stands)",
                                 identity=False, metavar="N")

    def __post_init__(self) -> None:
        if self.dtype is not None:
            object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.generator not in GENERATORS:
            _fail("generator", f"must be one of {GENERATORS}, got {self.generator!r}")
        if self.backend not in BACKENDS:
            _fail("backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        _check_int("batch_tokens", self.batch_tokens, 1)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.load_in_8bit and self.load_in_4bit:
            _fail("load_in_8bit", "and load_in_4bit exclude each other: choose one")
        if self.generator == "vllm" and (self.load_in_8bit or self.load_in_4bit):
            _fail("generator", "'vllm' would generate with the unquantized weights of a "
                  "model profiled in 8/4 bits", "use generator='hf' with quantization")

    @property
    def quantization(self) -> str | None:
        """'8bit', '4bit' or None."""
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else None


_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                  "fp16": "float16", "half": "float16"}


def canonical_dtype(dtype: Any) -> str | None:
    """'float32' | 'bfloat16' | 'float16' from a name, an alias or a torch.dtype; None
    (or 'auto') for the device's default."""
    if dtype is None or dtype == "auto":
        return None
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        _fail("dtype", f"must be one of {DTYPES} (or auto), got {dtype!r}")
    return name


def validate_alphas(alpha: float | tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """The Rényi orders as a tuple of floats, or ConfigError naming the bad one."""
    alphas = (alpha,) if isinstance(alpha, (int, float)) else tuple(alpha)
    if not alphas:
        _fail("alpha", "must name at least one Rényi order", "e.g. alpha=1.0 (Shannon)")
    checked = []
    for a in alphas:
        try:
            a = float(a)
        except (TypeError, ValueError):
            _fail("alpha", f"must be a number >= 0 or inf, got {a!r}")
        if math.isnan(a) or a < 0:
            _fail("alpha", f"must be >= 0 (0 = log support size, 1 = Shannon, "
                  f"inf = min-entropy), got {a}")
        checked.append(a)
    if len(set(checked)) != len(checked):
        _fail("alpha", f"lists an order twice: {checked}")
    return tuple(checked)


def split_options(options: dict[str, Any], classes: tuple[type, ...]) -> list[Any]:
    """Route keyword options (field names; `alpha` for alphas) to settings of `classes`.

    Unknown names raise TypeError listing the known ones, as a function call would.
    """
    options = dict(options)
    if "alpha" in options:
        if "alphas" in options:
            raise TypeError("give alpha or alphas, not both")
        options["alphas"] = options.pop("alpha")
    parts = []
    for cls in classes:
        names = cls.field_names()
        parts.append(cls(**{k: options.pop(k) for k in list(options) if k in names}))
    if options:
        known = sorted(n for cls in classes for n in cls.field_names())
        raise TypeError(f"unknown option(s) {', '.join(sorted(options))}; known: "
                        f"{', '.join(known)} (alpha for alphas)")
    return parts


def describe(lens: LensSettings, sampling: SamplingSettings, dtype: str | None,
             generator: str) -> dict[str, Any]:
    """The settings as a profile's metadata (the same for fresh and stored profiles)."""
    return {"mode": "generation" if sampling.generating else "text",
            "generator": generator if sampling.generating else "none",
            **sampling.to_dict(), **lens.to_dict(), "dtype": dtype}
