"""GRPO and RLOO settings: TRL's configs with rlhf-kit's defaults, the checks that run before a model loads, and the
before/after numbers the recipes record.

Both methods drop PPO's critic: each prompt gets `num_generations` completions and a completion's advantage is its
reward against the others' (GRPO: minus the group mean, divided by the group std; RLOO: minus the mean of the other
completions). TRL's trainers run as they are; the rewards come from `rlhf_kit.rewards.load_reward_functions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig, RLOOConfig

from rlhf_kit.training.distributed import apply_global_batch_size
from rlhf_kit.model import ModelArguments
from rlhf_kit.runs import start_and_final_evaluation
from rlhf_kit.training.settings import StageSettings, check_eval_data


@dataclass
class GRPOArguments(StageSettings, GRPOConfig):
    """TRL's `GRPOConfig` with rlhf-kit's stage settings (bf16 when the hardware has it, global_batch_size) and the
    tools the policy may call while it samples."""

    tools: list[str] = field(
        default_factory=list,
        metadata={"help": "Tool modules the policy may call during rollouts (.py files or importable modules of typed, "
                          "documented functions, as `rlhf-kit generate --tools` takes; the shipped calculator: "
                          "rlhf_kit.inference.calculator). TRL runs the calls and appends their results, up to "
                          "max_tool_calling_iterations rounds; the results are not trained on."},
    )
    tool_timeout: float = field(
        default=5.0,
        metadata={"help": "Seconds a tool call may run before it is stopped (the calls run in a worker process); a "
                          "call that fails or is stopped gives the policy an error message, not a crash."},
    )


@dataclass
class RLOOArguments(StageSettings, RLOOConfig):
    """TRL's `RLOOConfig` with rlhf-kit's stage settings (bf16 when the hardware has it, global_batch_size)."""


def apply_sampling_global_batch(args: GRPOArguments | RLOOArguments) -> None:
    """`apply_global_batch_size` for GRPO/RLOO, where the global batch counts completions per optimizer step.

    TRL derives the generation batch from gradient_accumulation_steps while the config is built; when it was derived
    (neither generation_batch_size nor steps_per_generation set), it must follow the new accumulation. It stays a
    multiple of num_generations: TRL has already checked that the batch of one accumulation step is.
    """
    processes = args.world_size
    before = args.gradient_accumulation_steps
    derived = (args.steps_per_generation == before
               and args.generation_batch_size == args.per_device_train_batch_size * processes * before)
    apply_global_batch_size(args)
    if not derived or args.gradient_accumulation_steps == before:
        return
    args.steps_per_generation = args.gradient_accumulation_steps
    args.generation_batch_size = args.per_device_train_batch_size * processes * args.steps_per_generation


def check_sampling_setup(model_args: ModelArguments, args: GRPOArguments | RLOOArguments, has_eval_data: bool) -> None:
    """Cross-config checks that otherwise surface only after the model is loaded, or after the first rollout."""
    check_eval_data(args, has_eval_data)
    if model_args.use_peft and getattr(args, "sync_ref_model", False):
        raise ValueError("sync_ref_model moves the reference towards the policy, but with LoRA the reference is the "
                         "base with the adapter disabled; set use_peft: false or sync_ref_model: false.")


def reward_metrics(trainer) -> dict[str, Any]:
    """Mean reward of the first and last logged training steps, and the held-out evaluation at the start (with
    eval_on_start) and at the end (`start_and_final_evaluation`)."""
    metrics: dict[str, Any] = {}
    train = [e for e in trainer.state.log_history if "reward" in e]
    if train:
        metrics.update(reward_at_start=train[0]["reward"], reward=train[-1]["reward"])
    if trainer.eval_dataset is None:
        return metrics
    start, final = start_and_final_evaluation(trainer, "eval_reward")
    metrics.update({f"{k}_at_start": v for k, v in start.items() if k.startswith("eval_reward")})
    kept = ("eval_reward", "eval_kl", "eval_completions/mean_length", "eval_completions/clipped_ratio")
    metrics.update({k: v for k, v in final.items() if k.startswith(kept)})
    return metrics
