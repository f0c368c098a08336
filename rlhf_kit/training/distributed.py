"""Batch sizes that mean the same on 1 or 8 GPUs: gradient accumulation derived from a global batch size.

A recipe that sets `global_batch_size` gives the same optimization whatever the launch: rlhf-kit divides it by
`per_device_train_batch_size * processes` (and, for PPO, by `num_mini_batches`) and sets
`gradient_accumulation_steps` to the quotient. The process count is the one the training run will have: transformers
reads it from the environment `accelerate launch` / `torchrun` set up, so this runs on every process before the
trainer is built.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from rlhf_kit.config import ConfigError

GLOBAL_BATCH_HELP = (
    "Sequences per optimizer step over all processes (PPO: prompts per update). When set, "
    "gradient_accumulation_steps is derived from it and the number of processes, so the same recipe gives the "
    "same optimization on 1 or 8 GPUs; it must be divisible by per_device_train_batch_size x processes "
    "(x num_mini_batches for PPO)."
)


def accumulation_steps(global_batch_size: int, per_device_batch_size: int, processes: int,
                       mini_batches: int = 1) -> int:
    """`global_batch_size / (per_device_batch_size * processes * mini_batches)`, or a ConfigError saying what to change.

    `mini_batches` is PPO's optimizer steps per rollout: the global batch is then the rollout, and each of its
    `mini_batches` parts is one optimizer step.
    """
    if global_batch_size < 1:
        raise ConfigError(f"global_batch_size must be >= 1, got {global_batch_size}")
    per_step = per_device_batch_size * processes * mini_batches
    if global_batch_size % per_step:
        what = f"per_device_train_batch_size ({per_device_batch_size}) x processes ({processes})"
        if mini_batches > 1:
            what += f" x num_mini_batches ({mini_batches})"
        raise ConfigError(f"global_batch_size {global_batch_size} is not divisible by {what} = {per_step}; choose a "
                          "global_batch_size that is a multiple of it, or another per_device_train_batch_size.")
    return global_batch_size // per_step


def apply_global_batch_size(args, mini_batches: int = 1) -> None:
    """Set `args.gradient_accumulation_steps` from `args.global_batch_size` (unchanged when it is None), after
    checking that the processes the launcher started really train together (:func:`check_processes`).

    `args` is a TrainingArguments subclass with a `global_batch_size` field; call this right after parsing, before
    the trainer is built. `args.world_size` starts the process group `accelerate launch` prepared (the trainer would
    start it a moment later anyway), so the count is that of the real run.
    """
    check_processes(args)
    if args.global_batch_size is None:
        return
    steps = accumulation_steps(args.global_batch_size, args.per_device_train_batch_size, args.world_size, mini_batches)
    # A saved rlhf_kit_config.yaml holds both keys; it reruns as long as they still agree.
    if args.gradient_accumulation_steps not in (1, steps):
        raise ConfigError(f"global_batch_size {args.global_batch_size} with {args.world_size} process(es) means "
                          f"gradient_accumulation_steps {steps}, but it is set to {args.gradient_accumulation_steps}; "
                          "remove one of the two keys.")
    args.gradient_accumulation_steps = steps


def check_processes(args) -> None:
    """Fail when the launcher started several processes but transformers set each up to train alone.

    It happens on a machine without GPUs (accelerate 1.15: a MULTI_GPU profile with use_cpu: true starts the
    processes, but does not pass use_cpu on to them): each would train its own copy and overwrite the others' output.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != args.world_size:
        raise ConfigError(f"the launcher started {launched} processes, but each was set up to train alone (world size "
                          f"{args.world_size}). Without GPUs, set ACCELERATE_USE_CPU=1 in the environment or "
                          "use_cpu: true in the recipe config.")


def shard_on_cpu(trainer) -> bool:
    """Make an FSDP launch on CPUs (``accelerate_configs/cpu_fsdp2.yaml``) really shard. Returns whether it did.

    accelerate 1.16 turns every multi-process CPU run into MULTI_CPU (plain data parallel) and drops the FSDP plugin
    the launch asked for (``AcceleratorState`` enables FSDP only for accelerator devices), although FSDP2's
    ``fully_shard`` trains and generates over a CPU device mesh with gloo. So when the launch set ACCELERATE_USE_FSDP
    and the processes run on CPUs, install the plugin accelerate builds from the launch's FSDP_* settings: the
    trainer's ``accelerator.prepare`` then shards through the very code path it uses on GPUs. Call it on a built
    trainer (a transformers ``Trainer``: TRL's or rlhf-kit's PPO) before it trains. It can go when accelerate
    enables FSDP for MULTI_CPU itself.

    transformers resets the accelerator state whenever a copy of the training arguments sets up its devices (TRL's
    trainers make such copies), which would save sharded weights as if they were whole; a callback re-installs the
    plugin at every step and at the end of training.
    """
    from accelerate.utils import DistributedType, parse_flag_from_env

    if trainer.accelerator.state.distributed_type != DistributedType.MULTI_CPU or \
            not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return False
    _install_fsdp_plugin(trainer)
    trainer.add_callback(_StayShardedOnCpu(trainer))
    return True


def _install_fsdp_plugin(trainer) -> None:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.FSDP:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


class _StayShardedOnCpu(TrainerCallback):
    """Re-installs the FSDP plugin before each step, each checkpoint (saved after on_step_end) and the final save."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _reinstall(self, args, state, control, **kwargs):
        _install_fsdp_plugin(self.trainer)

    on_train_begin = on_step_begin = on_step_end = on_train_end = _reinstall


def parallelism(trainer) -> str:
    """How a trainer spread its model, for the stage record: 'fsdp2', 'deepspeed', 'ddp' or 'single', x processes."""
    from torch.distributed.fsdp import FSDPModule

    processes = trainer.accelerator.num_processes
    if any(isinstance(m, FSDPModule) for m in (trainer.model, trainer.model_wrapped)):
        engine = "fsdp2"
    elif trainer.is_deepspeed_enabled:
        engine = "deepspeed"
    else:
        engine = "ddp" if processes > 1 else "single"
    return f"{engine} x {processes}"


def end_processes() -> None:
    """Wait for every process, then tear the process group down: the last line of a launched recipe.

    The barrier first, so no process leaves while another still needs it. Does nothing in a single process.

    The barrier's work is kept until the process ends. gloo's barrier holds every collective still queued or running
    when it was issued (FSDP2's last all-gathers among them), and with them tensors whose Python objects only the
    holder can free, which takes the GIL. Released on a gloo worker thread once the interpreter has begun to finalize,
    that GIL acquire ends the thread inside a C++ destructor and aborts the whole process ("terminate called without
    an active exception", SIGABRT; pytorch/pytorch#190489): a finished run that exits as failed. Core dumps of such
    aborts showed exactly that path, the worker freeing this barrier's work. Kept alive, no worker ever frees it.
    """
    import ctypes

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        barrier = dist.barrier(async_op=True)
        barrier.wait()
        # A reference nobody releases (a module global would be released during finalization, maybe still first).
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(barrier))
        dist.destroy_process_group()
