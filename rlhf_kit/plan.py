"""Memory preflight: the peak GPU memory of a recipe config, per process, estimated before anything is loaded.

    rlhf-kit plan recipes/configs/sft/llama-8b-qlora.yaml --num_gpus 8 --profile accelerate_configs/zero3.yaml

The estimate is arithmetic on the model's shape (a local config.json, or the shape table below for a named LLaMA
size) and the config's precision, LoRA/QLoRA, batch and sequence lengths. It predicts what
`torch.cuda.max_memory_allocated` reports at the peak of one training step; the check against the GPUs adds the
CUDA context and allocator slack on top. `benchmarks/plan_accuracy.py` measures the real peak for comparison.

What it counts, in bytes per process:
  weights      parameters x bytes of the dtype (4-bit: 0.5 plus the blockwise scales; embeddings and the LM head
               stay in the compute dtype), divided over the GPUs under ZeRO-3 / FSDP
  trainable    LoRA parameters (fp32, PEFT's default) or all parameters: their gradients and AdamW's two moments
               (plus an fp32 master copy under DeepSpeed), gradients and moments divided under ZeRO-2/3 / FSDP
  activations  per layer ~ (11 h + 3 kv + 4 i) values per token in the compute dtype (norm inputs and outputs,
               q/k/v, attention output, the SwiGLU's four i-wide tensors); with gradient checkpointing one hidden
               state per layer plus one layer recomputed
  logits       tokens x vocab x 4 bytes twice (fp32 logits and their gradient in the loss)
  kv cache     generation stages: 2 x layers x kv width x (prompt + response) tokens x dtype bytes
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_kit.config import ConfigError, check_bounds, check_keys, check_precision, load_yaml
from rlhf_kit.stages import TRAINING, recipe_arguments

GIB = 1024**3
# What max_memory_allocated does not see: the CUDA context and kernels (~0.5-1 GiB) and allocator fragmentation.
CONTEXT_BYTES = 1 * GIB
FRAGMENTATION = 0.10
STAGES = TRAINING
BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# 4-bit NF4: half a byte per weight plus one fp32 scale per 64 weights (nested quantization shrinks the scales 4x).
NF4_BYTES, NF4_NESTED_BYTES = 0.5 + 4 / 64, 0.5 + 1 / 64
# The prompt length planned for when the config bounds none (PPO's max_prompt_length: null; GRPO/RLOO keep every
# prompt whole): an assumption of the plan, not a setting of any recipe.
UNBOUNDED_PROMPT_TOKENS = 512


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a decoder-only transformer (LLaMA layout: GQA attention, SwiGLU MLP)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes()) + 2 * self.hidden  # two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        """Input embeddings and LM head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.hidden

    def lora_params(self, r: int, targets: list[str] | str | None) -> int:
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        chosen = names if targets in (None, "all-linear") or targets == ["all-linear"] else targets
        per_layer = sum((a + b) * r for name, (a, b) in zip(names, self.linear_shapes()) if name in chosen)
        return self.layers * per_layer


# Named LLaMA sizes (Llama 3.x), so a Hub name plans without a download.
SHAPES = {
    "1b": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True),
    "3b": Shape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256, tied=True),
    "8b": Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tied=False),
    "70b": Shape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256, tied=False),
}


def shape_from_config(c: dict) -> Shape:
    """A transformers config.json's keys (the pretraining recipe's YAML uses the same names)."""
    return Shape(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                 heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                 vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)))


def model_shape(name_or_path: str) -> Shape:
    """The shape from `name_or_path`/config.json (an adapter directory: its base's), else from a size in the name."""
    path = Path(name_or_path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return model_shape(base)
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()))
    size = re.search(r"(?<![0-9.])(\d+)[bB](?![a-zA-Z0-9])", path.name)
    if size and f"{size.group(1)}b" in SHAPES and "llama" in name_or_path.lower():
        return SHAPES[f"{size.group(1)}b"]
    raise ConfigError(f"cannot plan for model {name_or_path!r}: give a local directory with a config.json, or a "
                      f"LLaMA name with one of the sizes {sorted(SHAPES)} (e.g. meta-llama/Llama-3.1-8B).")


@dataclass(frozen=True)
class Sharding:
    """How a launch profile divides the state over `gpus` processes."""

    gpus: int = 1
    weights: bool = False      # ZeRO-3, FSDP
    gradients: bool = False    # ZeRO-2/3, FSDP
    optimizer: bool = False    # ZeRO-1/2/3, FSDP
    offload_optimizer: bool = False
    offload_weights: bool = False
    master_copy: bool = False  # DeepSpeed keeps fp32 master weights of 16-bit trainable parameters

    @classmethod
    def from_profile(cls, profile: str | Path | None, gpus: int) -> Sharding:
        if profile is None:
            return cls(gpus=gpus)
        raw = load_yaml(profile)
        kind = raw.get("distributed_type", "NO")
        if kind == "DEEPSPEED":
            ds = raw.get("deepspeed_config", {})
            stage = int(ds.get("zero_stage", 2))
            return cls(gpus=gpus, weights=stage >= 3, gradients=stage >= 2, optimizer=stage >= 1,
                       offload_optimizer=ds.get("offload_optimizer_device", "none") != "none",
                       offload_weights=ds.get("offload_param_device", "none") != "none", master_copy=True)
        if kind == "FSDP":
            offload = bool(raw.get("fsdp_config", {}).get("fsdp_offload_params", False))
            return cls(gpus=gpus, weights=True, gradients=True, optimizer=True, offload_optimizer=offload,
                       offload_weights=offload)
        return cls(gpus=gpus)


@dataclass
class Estimate:
    stage: str
    parts: dict[str, float]  # bytes per process
    # PPO with generation_backend vllm: the share of a GPU's memory vLLM reserves (vllm_gpu_memory_utilization), or
    # the bytes it reserves when vllm_kv_cache_gb fixes its cache. It takes that much even when it needs less.
    engine_share: float | None = None
    engine_bytes: float | None = None

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def needed(self) -> float:
        """Bytes a GPU must have: the estimate plus the CUDA context and allocator slack."""
        return self.total * (1 + FRAGMENTATION) + CONTEXT_BYTES

    def needed_on(self, gpu_bytes: float) -> float:
        """`needed` on a GPU of `gpu_bytes`: a colocated vLLM engine counts for what it reserves there."""
        engine = self.parts.get("vllm engine", 0.0)
        reserved = self.engine_bytes if self.engine_bytes is not None else (self.engine_share or 0.0) * gpu_bytes
        return self.needed + max(reserved - engine, 0.0)


def recipe_values(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """`config` (a recipe YAML's keys) over the defaults of the stage recipe's dataclasses: what the recipe would run
    with, so that a default changed in a dataclass is the plan's default too. Keys and numbers are checked as the
    recipe checks them (`rlhf_kit.config`), so a misspelled key is an error here as well.

    The dataclasses are not built: TrainingArguments would check this machine (bf16 needs a GPU) and set up its
    device, and a plan is often made on another machine than the one it is for.
    """
    types = recipe_arguments(stage)
    check_keys(list(config), types, f"the {stage} config")
    values: dict[str, Any] = {}
    for field in (f for t in types for f in dataclasses.fields(t) if f.init):
        if field.default is not dataclasses.MISSING:
            values.setdefault(field.name, field.default)
        elif field.default_factory is not dataclasses.MISSING:
            values.setdefault(field.name, field.default_factory())
    values.update(config)
    check_bounds(values)
    check_precision(values)
    return values


def estimate(config: dict, stage: str, sharding: Sharding = Sharding(), shape: Shape | None = None) -> Estimate:
    """Peak bytes per process of `stage` run with `config` (a recipe YAML's keys; missing keys take the recipe's
    defaults, `recipe_values`)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; one of {STAGES}")
    values = recipe_values(config, stage)
    if shape is None:
        if stage == "pretrain":
            shape = shape_from_config(values)
        elif values["model_name_or_path"] is None:
            raise ConfigError("model_name_or_path is not set: give it in the config or with --model.")
        else:
            shape = model_shape(values["model_name_or_path"])
    n = sharding.gpus
    # The weights' dtype (ModelArguments); pretraining builds its model in float32 and trains under autocast.
    dtype = str(values.get("dtype") or ("bfloat16" if values["bf16"] else "float32")).replace("torch.", "")
    if dtype == "auto":
        dtype = "bfloat16"
    width = BYTES[dtype]  # compute dtype bytes
    four_bit = bool(values.get("load_in_4bit"))
    peft = bool(values.get("use_peft")) and stage != "pretrain"
    # transformers' rule: activation_checkpointing when set, else its deprecated alias (TRL's configs default it on).
    checkpointing = bool(values["activation_checkpointing"] if values["activation_checkpointing"] is not None
                         else values["gradient_checkpointing"])
    batch = int(values["per_device_train_batch_size"])

    # Weights: linear layers in 4 bits under QLoRA, everything else in the compute dtype.
    linear = shape.layers * sum(a * b for a, b in shape.linear_shapes())
    per_weight = (NF4_NESTED_BYTES if values.get("use_bnb_nested_quant") else NF4_BYTES) if four_bit else width
    weights = linear * per_weight + (shape.params - linear) * width
    if sharding.weights:
        weights = 0.0 if sharding.offload_weights else weights / n

    # Trainable state: gradients and AdamW moments (fp32 for LoRA adapters, the model dtype for full training).
    if peft:
        trainable, t_bytes = shape.lora_params(int(values["lora_r"]), values["lora_target_modules"]), 4
    else:
        trainable, t_bytes = shape.params, width
    if stage == "ppo" and peft:
        trainable *= 2  # the critic is a second adapter of the same shape on the same base
    adapter_weights = trainable * t_bytes if peft else 0.0
    grads = trainable * t_bytes
    optimizer = trainable * (8 if sharding.master_copy else 2 * t_bytes)
    if sharding.master_copy and t_bytes < 4:
        optimizer += trainable * 4
    if sharding.gradients:
        grads /= n
    if sharding.optimizer:
        optimizer = 0.0 if sharding.offload_optimizer else optimizer / n

    parts = {"weights": weights + adapter_weights, "gradients": grads, "optimizer": optimizer}
    if stage == "ppo" and values["reward_model_path"]:
        parts["reward model"] = weights  # a second model of the same size and precision (assumed)

    # Sequences and tokens of one micro-batch's forward/backward.
    if stage in ("ppo", "grpo", "rloo"):
        prompt = int(values.get("max_prompt_length") or UNBOUNDED_PROMPT_TOKENS)
        response = int(values["response_length"] if stage == "ppo" else values["max_completion_length"])
        seq = prompt + response
        logit_tokens = batch * response
        generation_batch = (int(values["rollout_forward_batch_size"]) if stage == "ppo"
                            else batch * int(values["num_generations"]))
        parts["kv cache"] = 2 * shape.layers * shape.kv_width * generation_batch * seq * width
    else:
        length_key = "block_size" if stage == "pretrain" else "max_length"
        if values[length_key] is None:
            raise ConfigError(f"{length_key}: null keeps sequences as long as the data's, which the plan cannot "
                              f"know: set {length_key} to the longest sequence to plan for.")
        seq = int(values[length_key])
        logit_tokens = batch * seq
    engine = {}
    if stage == "ppo" and values.get("generation_backend") == "vllm":
        # vLLM holds its own copy of the merged policy in the compute dtype and a KV cache for the process's whole
        # rollout (it schedules every prompt at once); transformers' generate and its cache are not used.
        rollout = batch * int(values["gradient_accumulation_steps"]) * int(values["num_mini_batches"])
        parts["kv cache"] = 0.0
        kv = 2 * shape.layers * shape.kv_width * rollout * seq * width
        parts["vllm engine"] = shape.params * width + kv
        if values["vllm_kv_cache_gb"] is not None:
            engine["engine_bytes"] = shape.params * width + float(values["vllm_kv_cache_gb"]) * GIB
        else:
            engine["engine_share"] = float(values["vllm_gpu_memory_utilization"])
    sequences = batch * (2 if stage in ("reward", "dpo") else 1)  # chosen and rejected in one forward
    tokens = sequences * seq
    per_token_layer = (11 * shape.hidden + 3 * shape.kv_width + 4 * shape.intermediate) * width
    if checkpointing:
        activations = shape.layers * tokens * shape.hidden * width + tokens * per_token_layer
    else:
        activations = shape.layers * tokens * per_token_layer
    if stage == "ppo":
        activations *= 2  # the policy and the critic forward, both kept for one backward
    parts["activations"] = activations
    parts["logits"] = 0.0 if stage == "reward" else (2 if stage == "dpo" else 1) * logit_tokens * shape.vocab * 4 * 2
    return Estimate(stage, parts, **engine)


def stage_of(config_path: str | Path) -> str:
    """The stage a recipe config belongs to: its directory name (recipes/configs/<stage>/x.yaml)."""
    stage = Path(config_path).resolve().parent.name
    if stage not in STAGES:
        raise ConfigError(f"{config_path} is not under recipes/configs/<stage>/; pass --stage, one of {', '.join(STAGES)}")
    return stage


def visible_gpus() -> list[tuple[str, int]]:
    """(name, total bytes) of each visible GPU; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [(p.name, p.total_memory) for p in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))]


def format_plan(result: Estimate, gpus: list[tuple[str, int]], sharding: Sharding) -> str:
    lines = [f"== plan: {result.stage}, per process with {sharding.gpus} process(es)"]
    lines += [f"  {name:<13} {value / GIB:8.2f} GiB" for name, value in result.parts.items() if value]
    lines.append(f"  {'peak':<13} {result.total / GIB:8.2f} GiB  (+ context and slack: {result.needed / GIB:.2f} GiB)")
    if not gpus:
        lines.append("  no GPU visible: nothing to check the estimate against")
    if result.engine_share is not None:
        lines.append(f"  vLLM reserves {result.engine_share:.0%} of each GPU (vllm_gpu_memory_utilization), at least "
                     f"the vllm engine line above")
    for i, (name, total) in enumerate(gpus[: sharding.gpus]):
        verdict = "fits" if result.needed_on(total) <= total else "does NOT fit"
        lines.append(f"  GPU {i} {name}: {total / GIB:.1f} GiB -> {verdict}")
    if gpus and len(gpus) < sharding.gpus:
        lines.append(f"  only {len(gpus)} GPU(s) visible for {sharding.gpus} process(es)")
    return "\n".join(lines)
