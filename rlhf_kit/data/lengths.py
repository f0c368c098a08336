"""Rows the trainer will cut or drop for length, counted per source file before training and recorded.

TRL's SFTTrainer and DPOTrainer truncate sequences longer than `max_length` tokens and its RewardTrainer drops pairs
longer than it, all without a word; PPO drops prompts longer than `max_prompt_length`. `count_over_length` tokenizes
each training file's rows as those trainers render them (a conversation through the chat template, a prompt with the
generation prompt; plain text with EOS appended, prompt + completion concatenated) and counts the rows over the
limit; `length_metrics` turns the counts into stage-record metrics and warns.

    counts = count_over_length(data_args.dataset_name, "sft", "train", tokenizer, args.max_length)
    metrics.update(length_metrics(counts, args.max_length, action="truncated"))
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf_kit.data.loading import load_files
from rlhf_kit.data.tool_calls import parse_tools

logger = logging.getLogger(__name__)

_BATCH = 1000


def count_over_length(sources, kind: str, split: str, tokenizer: PreTrainedTokenizerBase,
                      max_length: int | None) -> dict[str, tuple[int, int]]:
    """{file: (rows, rows over max_length)} for every file of `sources` ("sft", "preference" or "prompt" data); a
    preference row counts when either of its sequences is over. Empty when max_length is None (nothing is cut)."""
    if max_length is None:
        return {}
    counts = {}
    for name, dataset, _ in load_files(sources, kind, split):
        over = 0
        for start in range(0, len(dataset), _BATCH):
            rows = dataset[start : start + _BATCH]
            tools = [parse_tools(row_tools) for row_tools in rows["tools"]] if "tools" in rows else None
            lengths = [_lengths(tokenizer, sequences, prompt=kind == "prompt", tools=tools)
                       for sequences in _sequences(rows, kind, tokenizer.eos_token)]
            over += sum(max(pair) > max_length for pair in zip(*lengths))
        counts[name] = (len(dataset), over)
    return counts


def _sequences(batch: dict[str, list], kind: str, eos: str) -> list[list]:
    """The sequences the trainer tokenizes for each row of a batch: one list for SFT, chosen and rejected for pairs."""
    def joined(column: str) -> list:
        prompts = batch.get("prompt") or [None] * len(batch[column])  # None: an implicit prompt
        return [c if p is None else p + c for p, c in zip(prompts, batch[column])]

    if kind == "preference":
        return [_with_eos(joined("chosen"), eos), _with_eos(joined("rejected"), eos)]
    if kind == "prompt":
        return [batch["prompt"]]
    if "messages" in batch:
        return [batch["messages"]]
    if "completion" in batch:
        return [_with_eos(joined("completion"), eos)]
    return [_with_eos(batch["text"], eos)]


def _with_eos(texts: list, eos: str) -> list:
    # TRL appends EOS to plain text that lacks it; conversations end with the chat template's own end of turn.
    return [t + eos if isinstance(t, str) and not t.endswith(eos) else t for t in texts]


def _lengths(tokenizer: PreTrainedTokenizerBase, sequences: list, prompt: bool,
             tools: list[list[dict] | None] | None = None) -> list[int]:
    if tools is not None and any(tools) and sequences and isinstance(sequences[0], list):
        # each row lists its own tools in the prompt (TRL renders them from the `tools` column): one row at a time
        return [len(tokenizer.apply_chat_template(conversation, tools=row_tools, tokenize=True, return_dict=True,
                                                  add_generation_prompt=prompt)["input_ids"])
                for conversation, row_tools in zip(sequences, tools)]
    if sequences and isinstance(sequences[0], list):
        ids = tokenizer.apply_chat_template(sequences, tokenize=True, return_dict=True,
                                            add_generation_prompt=prompt)["input_ids"]
    else:
        ids = tokenizer(text=sequences)["input_ids"]
    return [len(i) for i in ids]


def length_metrics(counts: dict[str, tuple[int, int]], max_length: int | None, action: str) -> dict[str, Any]:
    """Stage-record metrics `<action>_rows/<file>` (0 included: the file was checked), with a warning per file whose
    rows the trainer will `action` ("truncated" or "dropped")."""
    metrics: dict[str, Any] = {}
    for name, (rows, over) in counts.items():
        metrics[f"{action}_rows/{name}"] = over
        if over:
            logger.warning("%s: %d of %d rows are longer than max_length=%d tokens and will be %s by the trainer; "
                           "raise max_length or shorten those rows to keep them whole", name, over, rows, max_length,
                           action)
    return metrics
