"""DPO settings: TRL's DPOConfig with rlhf-kit's defaults, and the checks that must pass before a model loads.

With LoRA (the default in rlhf-kit's configs) TRL's DPOTrainer needs no second model: the reference is the policy
with its adapter disabled, i.e. the SFT model the adapter was added to (an SFT adapter is merged into its base
first, so "adapter disabled" means "the SFT policy", never the pre-SFT base).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from rlhf_kit.training.distributed import GLOBAL_BATCH_HELP
from rlhf_kit.model import ModelArguments
from rlhf_kit.training.sft import default_bf16


@dataclass
class DPOArguments(DPOConfig):
    """TRL's `DPOConfig`; bf16 defaults to "when the hardware has it" instead of always."""

    global_batch_size: int | None = field(default=None, metadata={"help": GLOBAL_BATCH_HELP})

    def __post_init__(self):
        self.bf16 = default_bf16(self.bf16, self.fp16)
        super().__post_init__()


def check_dpo_setup(model_args: ModelArguments, args: DPOArguments, has_eval_data: bool) -> None:
    """Cross-config checks that otherwise surface only after the model is loaded (or never)."""
    if args.eval_strategy != "no" and not has_eval_data:
        raise ValueError(f"eval_strategy is '{args.eval_strategy}' but no evaluation split was found; set "
                         "eval_dataset_name / dataset_test_split, or eval_strategy: 'no'.")
    if model_args.use_peft and args.sync_ref_model:
        raise ValueError("sync_ref_model (TR-DPO) moves the reference towards the policy, but with LoRA the reference "
                         "is the base with the adapter disabled; set use_peft: false or sync_ref_model: false.")
