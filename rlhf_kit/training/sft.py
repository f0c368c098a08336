"""Stage 2 settings: TRL's SFTConfig with rlhf-kit's defaults, and the checks that must pass before a model loads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from rlhf_kit.training.distributed import GLOBAL_BATCH_HELP
from rlhf_kit.model import ModelArguments

# Formats (as detected by rlhf_kit.data.loading) that carry a separate completion or assistant turns.
CONVERSATION_FORMATS = {"messages"}
COMPLETION_FORMATS = {"prompt_completion", "prompt_completion_conversational"}


def default_bf16(bf16: bool | None, fp16: bool) -> bool:
    """bf16 when the hardware has it. TRL defaults bf16 to True, which transformers rejects on a CPU-only machine."""
    if bf16 is not None:
        return bf16
    return not fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class SFTArguments(SFTConfig):
    """TRL's `SFTConfig`; `assistant_only_loss` defaults to "yes for conversations" instead of "no"."""

    assistant_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Train only on assistant turns. Default: on for `messages` data (the prompt is not the model's to "
            "learn), off otherwise."
        },
    )
    global_batch_size: int | None = field(default=None, metadata={"help": GLOBAL_BATCH_HELP})

    def __post_init__(self):
        self.bf16 = default_bf16(self.bf16, self.fp16)
        super().__post_init__()
        if self.packing and self.max_length is None:
            raise ValueError("packing: true needs max_length (the length of a packed block).")
        if self.packing and self.packing_strategy == "wrapped" and self.assistant_only_loss:
            raise ValueError(
                "packing_strategy 'wrapped' cuts conversations at block edges, so assistant turns lose their "
                "context; use packing_strategy 'bfd' with assistant_only_loss."
            )


def resolve_loss_masking(args: SFTArguments, data_format: str, source: str) -> None:
    """Pick assistant-only / completion-only loss from the data format, or fail if the asked-for one cannot apply."""
    if args.assistant_only_loss is None:
        args.assistant_only_loss = data_format in CONVERSATION_FORMATS
    if args.assistant_only_loss and data_format not in CONVERSATION_FORMATS:
        raise ValueError(
            f"assistant_only_loss: true needs conversational `messages` data, but {source} is in the "
            f"'{data_format}' format. For prompt/completion data use completion_only_loss instead."
        )
    if args.completion_only_loss and data_format not in COMPLETION_FORMATS:
        raise ValueError(
            f"completion_only_loss: true needs prompt/completion data, but {source} is in the '{data_format}' format."
        )


def check_compatible(model_args: ModelArguments, args: SFTArguments, has_eval_data: bool) -> None:
    """Cross-config checks that otherwise surface only after the model is loaded (or never)."""
    if args.eval_strategy != "no" and not has_eval_data:
        raise ValueError(
            f"eval_strategy is '{args.eval_strategy}' but no evaluation split was found; set eval_dataset_name / "
            "dataset_test_split, or eval_strategy: 'no'."
        )
