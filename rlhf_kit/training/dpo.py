"""DPO settings: TRL's DPOConfig with rlhf-kit's defaults, and the checks that must pass before a model loads.

With LoRA (the default in rlhf-kit's configs) TRL's DPOTrainer needs no second model: the reference is the policy
with its adapter disabled, i.e. the SFT model the adapter was added to (an SFT adapter is merged into its base
first, so "adapter disabled" means "the SFT policy", never the pre-SFT base).
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig

from rlhf_kit.model import ModelArguments
from rlhf_kit.training.settings import StageSettings, check_eval_data


@dataclass
class DPOArguments(StageSettings, DPOConfig):
    """TRL's `DPOConfig` with rlhf-kit's stage settings (bf16 when the hardware has it, global_batch_size)."""


def check_dpo_setup(model_args: ModelArguments, args: DPOArguments, has_eval_data: bool) -> None:
    """Cross-config checks that otherwise surface only after the model is loaded (or never)."""
    check_eval_data(args, has_eval_data)
    if model_args.use_peft and args.sync_ref_model:
        raise ValueError("sync_ref_model (TR-DPO) moves the reference towards the policy, but with LoRA the reference "
                         "is the base with the adapter disabled; set use_peft: false or sync_ref_model: false.")
