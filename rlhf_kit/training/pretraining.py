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
from trl import pack_dataset

from rlhf_kit.model import IM_END, IM_START, PAD
from rlhf_kit.training.settings import StageSettings

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
PACKINGS = ("wrapped", "bfd_split")


@dataclass
class PretrainArguments:
    """What to pretrain: a new tiny model from scratch, or `base_model` continued on raw text."""

    dataset_name: str = field(default="data/pretrain", metadata={"help": "Raw-text data with a `text` column."})
    base_model: str | None = field(
        default=None, metadata={"help": "Continue pretraining this model instead of building a new one."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    packing: str = field(
        default="wrapped",
        metadata={"help": "How documents become blocks (TRL's pack_dataset): `wrapped` joins them and cuts every "
                  "block_size tokens, so a document may start in one block and end in the next; `bfd_split` keeps "
                  "each document that fits whole in one block (best-fit decreasing, blocks padded), so text that "
                  "refers back to its own document always sees what it refers to."},
    )
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
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}.")
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


def pack_blocks(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int,
                packing: str = "wrapped") -> Dataset:
    """Tokenize `text`, end each document with EOS and pack the documents into blocks of at most `block_size`.

    `wrapped` cuts the joined corpus every `block_size` tokens; `bfd_split` puts whole documents into blocks (a
    document longer than a block is cut into block-sized pieces first). Either way every token of the corpus is trained
    on: the final partial block is kept, and the collator pads short blocks with labels the loss ignores.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
    # One batch for the whole corpus: packing works within a map batch, and a wrapped cut must run across all of it.
    packed = pack_dataset(tokenized, block_size, strategy=packing,
                          map_kwargs={"batch_size": len(tokenized) or None, "desc": "Packing"})
    return packed.remove_columns([c for c in packed.column_names if c != "input_ids"])
