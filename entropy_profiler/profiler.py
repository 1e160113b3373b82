"""entropy-profiler 0.2.1's `entropy_profiler.profiler`, run on entropy_fast's engine.

Owns the 0.2.1 result types (`EntropyProfile`, `AggregatedProfile`), its entropy functions
of probabilities, and `EntropyProfiler`: 0.2.1's constructor, methods, shapes and layer
numbering on top of `entropy_fast.EntropyProfiler` (prompts decoded in batches with the KV
cache, their states read by the streamed or fused lens as they are decoded).

0.2.1's conventions, kept here:

- Columns are the L block outputs (HF hidden states 1..L), counted from 0 (numbering
  "block"); `layer_stride=k` keeps columns 0, k, 2k, ... < L.
- Rows are the generated tokens (generation stops after a generated stop token, which
  keeps its row). `include_prompt_tokens=True` puts one row per prompt position first (the
  distribution at position p, which predicts token p + 1), so the last prompt position
  appears twice, once from the prompt and once as the first generated row.
- `profile_text_with_states` returns states (n_generated_tokens, n_layers, d_model) in the
  model's dtype, the last block's state after the final norm, as HF hands it over.

The lens fixes (the only intended differences from 0.2.1, see docs/migrating-from-0.2.1.md):
the last column is the model's own output distribution (0.2.1 normed the already-normed
last state a second time), and Gemma-2 final-logit soft-capping, OPT's final norm and
projection, Phi's final norm, Cohere/Granite logit scaling apply at every layer.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass

import torch

from entropy_fast.models import load_model
from entropy_fast.profile import BLOCK, AggregatedProfile
from entropy_fast.profile import EntropyProfile as _NativeProfile
from entropy_fast.profiler import EntropyProfiler as _Engine

# HF generate's defaults for what a checkpoint's generation_config leaves unset; 0.2.1
# samples with them because it passes nothing but do_sample.
_HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclass
class EntropyProfile(_NativeProfile):
    """0.2.1's EntropyProfile: (n_tokens, n_layers) entropy, 0-based block columns.

    The entropy_fast profile with `numbering="block"` by default, so that a profile built
    by 0.2.1 code from its own fields counts layers as 0.2.1 did.
    """

    numbering: str = BLOCK


def shannon_entropy(probs: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """H(p) = -sum p log(p + eps) over the last dimension (0.2.1's definition)."""
    return -(probs * torch.log(probs + eps)).sum(dim=-1)


def renyi_entropy(probs: torch.Tensor, alpha: float, eps: float = 1e-15) -> torch.Tensor:
    """log(max(sum p^alpha, eps)) / (1 - alpha); Shannon when |alpha - 1| < 1e-6 (0.2.1's)."""
    if abs(alpha - 1.0) < 1e-6:
        return shannon_entropy(probs, eps)
    return (1.0 / (1.0 - alpha)) * torch.log((probs**alpha).sum(dim=-1).clamp(min=eps))


def _runnable_dtype(dtype: torch.dtype, device: str) -> torch.dtype:
    """`dtype`, or float32 where half precision has no CPU kernels (0.2.1 would fail there)."""
    if dtype not in (torch.float16, torch.bfloat16) or not device.startswith("cpu"):
        return dtype
    try:
        probe = torch.ones(2, 2, dtype=dtype)
        torch.nn.functional.linear(probe, probe)
    except RuntimeError:
        warnings.warn(f"this CPU build of torch has no {dtype} matmul: the model runs in "
                      "float32, as 0.2.1 would run it on a GPU in half precision", stacklevel=3)
        return torch.float32
    return dtype


class EntropyProfiler:
    """0.2.1's EntropyProfiler on entropy_fast's engine (see the module docstring).

    Parameters and attributes are 0.2.1's: `model_name`, `alpha`, `layer_stride`, `device`
    (a string), `tokenizer` (its pad token set to the eos token when missing) and `model`.
    """

    def __init__(self, model_name_or_path: str, device: str | None = None,
                 dtype: torch.dtype = torch.float16, alpha: float = 1.0,
                 layer_stride: int = 1, load_in_8bit: bool = False,
                 load_in_4bit: bool = False) -> None:
        if load_in_8bit and load_in_4bit:
            raise ValueError("Cannot use both load_in_8bit and load_in_4bit.")
        if (load_in_8bit or load_in_4bit) and not torch.cuda.is_available():
            raise ValueError("8-bit and 4-bit quantization require CUDA. "
                             "Install bitsandbytes and run on a GPU.")
        self.model_name = model_name_or_path
        self.alpha = alpha
        self.layer_stride = layer_stride
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, self.tokenizer, _ = load_model(
            model_name_or_path, None, _runnable_dtype(dtype, self.device), self.device,
            load_in_8bit, load_in_4bit)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        n_blocks = model.config.get_text_config().num_hidden_layers
        self._engine = _Engine(model, tokenizer=self.tokenizer, alpha=alpha,
                               device=self.device,
                               layers=[c + 1 for c in range(0, n_blocks, layer_stride)])
        self.model = self._engine.model

    # -- 0.2.1's methods -----------------------------------------------------------------

    def profile_text(self, prompt: str, max_new_tokens: int = 32, do_sample: bool = False,
                     include_prompt_tokens: bool = False) -> EntropyProfile:
        """Generate from `prompt` and return the (n_tokens, n_layers) entropy profile.

        An empty prompt is profiled as the tokenizer's BOS token (else its EOS token).
        """
        ids = self._prompt_ids(prompt)
        ((profile, _),) = self._profile([ids], max_new_tokens, do_sample)
        if include_prompt_tokens:
            return self._with_prompt_rows(ids, profile)
        return self._seed_profile(profile)

    def profile_text_with_states(self, prompt: str, max_new_tokens: int = 32,
                                 do_sample: bool = False, include_prompt_tokens: bool = False,
                                 ) -> tuple[EntropyProfile, torch.Tensor]:
        """`profile_text` plus the states (n_generated_tokens, n_layers, d_model).

        States are those of the generated tokens only, in the model's dtype, on the CPU;
        the last block's state is after the final norm, as HF returns it.
        """
        ids = self._prompt_ids(prompt)
        ((profile, states),) = self._profile([ids], max_new_tokens, do_sample, keep_states=True)
        if include_prompt_tokens:
            return self._with_prompt_rows(ids, profile), self._seed_states(states)
        return self._seed_profile(profile), self._seed_states(states)

    def profile_batch(self, prompts: list[str], max_new_tokens: int = 32,
                      do_sample: bool = False) -> AggregatedProfile:
        """Profile every prompt (batched underneath); profiles come in the prompts' order."""
        results = self._profile([self._prompt_ids(p) for p in prompts], max_new_tokens,
                                do_sample)
        return AggregatedProfile([self._seed_profile(profile) for profile, _ in results])

    def unload(self) -> None:
        """Release the model (0.2.1 also drops the tokenizer attribute)."""
        if getattr(self, "_engine", None) is not None:
            self._engine.unload()
            self._engine = None
        self.model = None
        if hasattr(self, "tokenizer"):
            del self.tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> EntropyProfiler:
        return self

    def __exit__(self, *args) -> None:
        self.unload()

    # -- internals -----------------------------------------------------------------------

    def _prompt_ids(self, prompt: str) -> list[int]:
        if len(prompt) == 0:  # 0.2.1 profiles an empty prompt as the BOS (else EOS) token
            prompt = getattr(self.tokenizer, "bos_token", None) or self.tokenizer.eos_token
        return list(self.tokenizer(prompt)["input_ids"])

    def _profile(self, ids: list[list[int]], max_new_tokens: int, do_sample: bool,
                 keep_states: bool = False) -> list[tuple[_NativeProfile, torch.Tensor | None]]:
        """Engine profiles (and states) of prompt ids, in order; rows = generated tokens."""
        if max_new_tokens <= 0:  # HF's own refusal, which 0.2.1 passed on
            raise ValueError(f"`max_new_tokens` must be greater than 0, but is {max_new_tokens}.")
        sampling = self._checkpoint_sampling() if do_sample else {}
        results: dict[int, tuple] = {}
        for index, profile, *states in self._engine.profile_prompt_ids(
                ids, max_new_tokens, keep_states=keep_states, do_sample=do_sample, **sampling):
            results[index] = (profile, states[0] if keep_states else None)
        return [results[index] for index in range(len(ids))]

    def _checkpoint_sampling(self) -> dict:
        """The checkpoint's sampling settings, which 0.2.1's bare generate() call used."""
        config = self.model.generation_config
        sampling = {k: v if getattr(config, k, None) is None else getattr(config, k)
                    for k, v in _HF_SAMPLING_DEFAULTS.items()}
        sampling["top_k"] = sampling["top_k"] or None  # 0 turns top-k off, as None does
        return sampling

    def _seed_profile(self, profile: _NativeProfile) -> EntropyProfile:
        view = profile.blocks()
        return EntropyProfile(entropy=view.entropy, token_ids=view.token_ids,
                              layer_indices=view.layer_indices, alpha=self.alpha,
                              model_name=self.model_name)

    def _with_prompt_rows(self, ids: list[int], generated: _NativeProfile) -> EntropyProfile:
        """Rows of every prompt position, then of every generated token (0.2.1's layout)."""
        continuation = generated.token_ids.tolist()
        ((_, text),) = self._engine.profile_token_ids([(ids + continuation, [])])
        rows = text.entropy  # row p: the distribution at position p
        prompt_len = len(ids)
        entropy = torch.cat([rows[:prompt_len], rows[prompt_len - 1:]])
        full = _NativeProfile(entropy, torch.tensor(ids + continuation), text.layer_indices)
        return self._seed_profile(full)

    @torch.no_grad()
    def _seed_states(self, states: torch.Tensor) -> torch.Tensor:
        """Engine states (n_layers x n_tokens x d, pre-norm, float32) in 0.2.1's layout."""
        engine, dtype = self._engine, self.model.dtype
        states = states.to(dtype)
        norm = engine.lens.norm
        if engine.layer_indices[-1] == len(engine.layers) and norm is not None:
            # HF hands the last block's state over normed (OPT's also projected, to another
            # width, which a (T, L, d) tensor cannot hold: 0.2.1 failed there)
            normed = norm(states[-1].to(engine.device)).to("cpu", dtype)
            states = torch.cat([states[:-1], normed[None]])
        return states.transpose(0, 1).contiguous()
