"""Stage 1: a byte-level BPE tokenizer and a tiny LLaMA trained from scratch, or continued pretraining of a real model.

The tiny model is a normal Hugging Face directory (config.json, model.safetensors, tokenizer files), so every
later stage loads it exactly as it would load a Hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast, TrainingArguments

from rlhf_kit.model import IM_END, IM_START, PAD
from rlhf_kit.training.settings import StageSettings

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]


@dataclass
class PretrainArguments:
    """What to pretrain: a new tiny model from scratch, or `base_model` continued on raw text."""

    dataset_name: str = field(default="data/pretrain", metadata={"help": "Raw-text data with a `text` column."})
    base_model: str | None = field(
        default=None, metadata={"help": "Continue pretraining this model instead of building a new one."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size (new tokenizer only)."})
    hidden_size: int = field(default=128)
    intermediate_size: int = field(default=384)
    num_hidden_layers: int = field(default=4)
    num_attention_heads: int = field(default=4)
    num_key_value_heads: int = field(default=2)
    max_position_embeddings: int = field(default=512)
    tie_word_embeddings: bool = field(
        default=False,
        metadata={"help": "Untied by default: with tied weights PEFT wraps lm_head for the trainable chat-token rows, "
                  "which TRL's fused LM-head loss (TRL 1.16) cannot read."},
    )

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if self.block_size > self.max_position_embeddings:
            raise ValueError(
                f"block_size ({self.block_size}) exceeds max_position_embeddings ({self.max_position_embeddings})."
            )



@dataclass
class PretrainTrainingArguments(StageSettings, TrainingArguments):
    """transformers' TrainingArguments with the settings every rlhf-kit stage shares (bf16 when the hardware has it,
    global_batch_size, no pinned memory without an accelerator)."""

def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Byte-level BPE (as in GPT-2 / LLaMA-3): every string is encodable, no unknown token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # A base tokenizer: no chat template. SFT adds ChatML, reusing the reserved <|im_start|>/<|im_end|> ids.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, additional_special_tokens=[IM_START, IM_END]
    )


def tiny_llama_config(args: PretrainArguments, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pack_blocks(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int) -> Dataset:
    """Tokenize `text`, join documents with EOS and cut into `block_size` blocks.

    The final partial block is kept (shorter) rather than dropped, so every token of the corpus is trained on.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
    stream = [t for row in tokenized["input_ids"] for t in row]
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    return Dataset.from_dict({"input_ids": blocks})
