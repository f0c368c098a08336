"""Stage 2 settings: TRL's SFTConfig with rlhf-kit's defaults, and the checks that must pass before a model loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from rlhf_kit.training.settings import StageSettings

# Formats (as detected by rlhf_kit.data.loading) that carry a separate completion or assistant turns.
CONVERSATION_FORMATS = {"messages"}
COMPLETION_FORMATS = {"prompt_completion", "prompt_completion_conversational"}


@dataclass
class SFTArguments(StageSettings, SFTConfig):
    """TRL's `SFTConfig`; `assistant_only_loss` defaults to "yes for conversations" instead of "no"."""

    assistant_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Train only on assistant turns. Default: on for `messages` data (the prompt is not the model's to "
            "learn), off otherwise."
        },
    )

    def __post_init__(self):
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
