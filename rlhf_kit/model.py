"""Loading tokenizers and LLaMA-style models: chat template, pad/stop tokens, dtype, bitsandbytes, LoRA.

Every stage loads through these functions so the tokenizer, chat template, pad and stop tokens agree from SFT to PPO.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import LoraConfig, TaskType
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl import ModelConfig, get_peft_config, get_quantization_config
from trl.chat_template_utils import add_response_schema, qwen3_template, supports_tool_calling

from rlhf_kit.config import MAKE_A_MODEL, ConfigError, ModelNotFoundError, check_model_source, looks_like_path
from rlhf_kit.errors import UserError

logger = logging.getLogger(__name__)
HEAD = "score"  # the one-output linear layer of transformers' *ForSequenceClassification models: the reward head

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"

# ChatML with `{% generation %}` markers around the assistant content *and* its <|im_end|>, so that
# assistant-only loss trains the model to emit the end-of-turn token (a model that never sees it as a
# target never learns to stop). The newline after <|im_end|> belongs to the template, not the model.
# Tools follow Qwen 2.5 / Hermes, so that TRL's `qwen3_template` response template parses the model's calls: the
# schemas end the system turn (a new one if the conversation has none), each call is a <tool_call> JSON object
# inside the assistant turn (trained: the model learns to call), and a result is a `tool` turn (not trained).
# Without `tools` and tool calls it renders exactly as before.
TOOLS_PREAMBLE = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n<tools>\n"
TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{%- set tools_text = namespace(value='') %}"
    "{%- for tool in tools %}"
    "{%- set tools_text.value = tools_text.value + ('\\n' if not loop.first else '') + (tool | tojson) %}"
    "{%- endfor %}"
    "{%- set tools_block = " + repr(TOOLS_PREAMBLE) + " + tools_text.value + " + repr(TOOLS_INSTRUCTIONS) + " %}"
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n' + tools_block + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{{- call['arguments'] if call['arguments'] is string else call['arguments'] | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif tools and loop.first and message['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + message['content'] + '\\n\\n' + tools_block + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)



def response_template_for(tokenizer: PreTrainedTokenizerBase) -> dict | None:
    """The response template that parses what a model with this chat template writes, tool calls included
    (`tokenizer.parse_response`), or None when nobody knows one.

    The tokenizer's own `response_template` first (transformers saves it in tokenizer_config.json, so a model that
    ships one, or was saved with one, keeps it); then rlhf-kit's ChatML, whose tool format is Qwen's (TRL's
    `qwen3_template` parses it); then the chat templates TRL recognizes (Llama 3.1/3.2, Qwen 2.5/3, ...).
    """
    own = getattr(tokenizer, "response_template", None)
    if own is not None:
        return own
    if tokenizer.chat_template == CHATML_TEMPLATE:
        return qwen3_template
    probe = SimpleNamespace(chat_template=tokenizer.chat_template)  # TRL sets the attribute; the tokenizer stays as is
    try:
        add_response_schema(probe)
    except ValueError:  # "Unrecognized chat template"
        return None
    return getattr(probe, "response_template", None)


def require_response_template(tokenizer: PreTrainedTokenizerBase) -> dict:
    """`response_template_for(tokenizer)`, set on the tokenizer (so `parse_response` and TRL read it, and a saved
    tokenizer keeps it); UserError, before anything is generated, when there is none or when the chat template
    drops tool calls or results (Llama 3.0's does): the model would go on without seeing them."""
    if not supports_tool_calling(tokenizer):
        raise UserError("tools: this model's chat template does not render tool calls and tool results (an assistant "
                        "turn's tool_calls, a tool message); give the model a template that does (rlhf-kit's ChatML, "
                        "Llama 3.1/3.2's, Qwen 2.5/3's)")
    template = response_template_for(tokenizer)
    if template is None:
        raise UserError("tools: this model's chat template is not one whose tool calls rlhf-kit can parse (it knows "
                        "its own ChatML and the templates TRL knows: Llama 3.1/3.2, Qwen 2.5/3, ...). Set "
                        "tokenizer.response_template to a response template for it (transformers' docs: chat "
                        "response parsing) and save the tokenizer with the model")
    tokenizer.response_template = template
    return template

@dataclass
class ModelArguments(ModelConfig):
    """TRL's `ModelConfig` plus what rlhf-kit adds: chat-token training and the tokenizer source.

    Quantization and LoRA settings are TRL's and are turned into configs by TRL (`get_quantization_config`,
    `get_peft_config`); `lora_config` only adds the chat-token rows and the reward head.
    """

    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to load (its main revision); defaults to model_name_or_path at model_revision."},
    )
    train_chat_tokens: bool = field(
        default=True,
        metadata={
            "help": "With LoRA, also train the embedding rows of the chat special tokens (<|im_start|>, <|im_end|>, "
            "pad). A base model has never seen them, so without this the adapter cannot learn to stop."
        },
    )
    # TRL defaults this to CAUSAL_LM, which a reward model (SEQ_CLS) would then silently override: unset here means
    # "the stage's own", and a value that disagrees with the stage is refused by `lora_config`.
    lora_task_type: str | None = field(
        default=None,
        metadata={"help": "PEFT task type of the adapter. Each stage sets its own (CAUSAL_LM; SEQ_CLS for the "
                          "reward model); a value given here must be that one."},
    )

    def __post_init__(self):
        target_modules = self.lora_target_modules
        super().__post_init__()
        # TRL 1.16 turns a one-item list into a plain string (meant for ["all-linear"]), but PEFT reads any other string
        # as a regex over the full module name, which "q_proj" never matches: keep that list a list.
        if isinstance(target_modules, list) and len(target_modules) == 1 and target_modules[0] != "all-linear":
            self.lora_target_modules = target_modules
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError(
                "load_in_4bit/load_in_8bit quantize the base weights, which then cannot be trained: set use_peft: true "
                "(QLoRA) or drop the quantization flag."
            )
        if self.load_in_4bit and self.dtype == "auto":
            # TRL's get_quantization_config uses dtype as the 4-bit compute dtype, and "auto" names none.
            raise ConfigError("load_in_4bit computes in dtype, which cannot be auto: set dtype: bfloat16 (or float16, "
                             "float32).")
        if self.lora_task_type is not None and self.lora_task_type not in list(TaskType):
            raise ConfigError(f"lora_task_type: {self.lora_task_type!r} is not a PEFT task type; leave it unset (each "
                             "stage sets its own: CAUSAL_LM, or SEQ_CLS for the reward model).")
        if isinstance(self.lora_target_parameters, str):  # PEFT takes a list only
            self.lora_target_parameters = [self.lora_target_parameters]


def load_tokenizer(name_or_path: str, revision: str = "main", trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    check_model_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as error:
        if Path(name_or_path).exists():
            raise
        # `outputs/sft` is both a relative path and a Hub id: say that neither was found.
        raise ModelNotFoundError(f"{name_or_path} is not a local directory (working directory {os.getcwd()}) and "
                                 f"could not be loaded from the Hub either: {error}\n{MAKE_A_MODEL}") from error


def load_model_tokenizer(args: ModelArguments, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer for the model `args` loads: `tokenizer_name_or_path` (its main revision), else the model's own
    at `model_revision`, the revision its weights load at (a pinned model must not get the tokenizer of `main`)."""
    if args.tokenizer_name_or_path not in (None, args.model_name_or_path):
        return load_tokenizer(args.tokenizer_name_or_path, trust_remote_code=trust_remote_code)
    if args.model_name_or_path is None:
        raise ValueError("model_name_or_path is not set: give a local model directory or a Hub model id.")
    return load_tokenizer(args.model_name_or_path, revision=args.model_revision, trust_remote_code=trust_remote_code)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give a base tokenizer a chat template, a pad token distinct from EOS and a stop token. Returns added tokens.

    Pad must differ from EOS: collators mask pad positions out of the labels, so pad == EOS would hide every EOS
    from the loss and the model would never learn to stop.
    """
    added: list[str] = []
    stops = {tokenizer.eos_token}
    own_template = tokenizer.chat_template is not None
    if not own_template:
        new = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new})
            added += new
        tokenizer.chat_template = CHATML_TEMPLATE
        # One stop token everywhere: generation, TRL's EOS appending for plain prompt/completion, PPO's stop check.
        tokenizer.eos_token = IM_END
        stops.add(IM_END)
    if tokenizer.pad_token is None or tokenizer.pad_token in stops:
        pad = unused_pad_token(tokenizer, stops)
        if pad is None:
            pad = PAD
            if PAD not in tokenizer.get_vocab():
                added.append(PAD)
                if own_template:  # a chat model, where a grown vocabulary costs a full embedding in the adapter
                    logger.warning("The tokenizer has no pad token and no reserved token to pad with: adding %s "
                                   "grows the embeddings by one row, so a LoRA adapter saves embed_tokens and "
                                   "lm_head in full.", PAD)
        tokenizer.add_special_tokens({"pad_token": pad})
    tokenizer.padding_side = "right"
    return added


# Tokens a family keeps for padding or leaves unused, in order of preference. Padding with one needs no new embedding
# row; a new row would make a "LoRA" adapter carry the whole embedding and head (about 2 GB at 8B in bf16). Llama 3.1+
# names one for padding; Llama 3.0 reserves 250 special tokens it never uses.
RESERVED_PADS = ("<|finetune_right_pad_id|>", PAD, "<pad>", "[PAD]", "<|reserved_special_token_0|>")


def unused_pad_token(tokenizer: PreTrainedTokenizerBase, stops: set[str]) -> str | None:
    """The tokenizer's own token to pad with, one of `RESERVED_PADS` that it has and that ends nothing; else None."""
    vocab = tokenizer.get_vocab()
    return next((t for t in RESERVED_PADS if t in vocab and t not in stops), None)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model=None, *, revision: str = "main") -> list[int]:
    """The token ids that end a response: the one answer for every generation path (PPO's sampling, truncation and
    missing-stop penalty, GRPO/RLOO through the generation config `load_model` writes, best-of-N, evaluation, chat,
    the exported generation config).

    The tokenizer's EOS and <|im_end|> (the chat template's end of turn) first, then the model's own EOS ids from its
    generation config and config, in order, without repeats. A model keeps its base's EOS (Llama 3's
    <|end_of_text|>): sampled, it ends the response at inference, so it must end it in training too. A model EOS that
    is the tokenizer's pad id is left out (padding would read as stopping).

    Args:
        model: the policy as a loaded model (or PeftModel), its config or generation config, or the directory or Hub
            id it loads from (an adapter directory stands for its base, which `load_model` merges it into); None for
            the tokenizer's ids alone.
        revision: the revision of a Hub id given as `model`.
    """
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    for eos in _model_eos_ids(model, revision):
        if eos != tokenizer.pad_token_id:
            ids.append(eos)
    return [i for i in dict.fromkeys(ids) if i is not None]


def _model_eos_ids(model, revision: str) -> list[int]:
    """The EOS ids a model declares in its generation config, then in its config."""
    if model is None:
        return []
    if isinstance(model, (str, Path)):
        sources = _saved_configs(str(model), revision)
    elif isinstance(model, (PretrainedConfig, GenerationConfig)):
        sources = [model.to_dict()]
    else:
        sources = [c.to_dict() for c in (getattr(model, "generation_config", None), getattr(model, "config", None))
                   if c is not None]
    ids = []
    for source in sources:
        eos = source.get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    return [i for i in ids if i is not None]


def _saved_configs(name_or_path: str, revision: str) -> list[dict]:
    """The generation config (when there is one) and config of a model directory or Hub id, as dicts, without
    loading weights or model code."""
    if is_adapter_dir(name_or_path):
        config = json.loads((Path(name_or_path) / "adapter_config.json").read_text())
        name_or_path, revision = adapter_base(name_or_path), config.get("revision") or "main"
    try:
        generation = [GenerationConfig.from_pretrained(name_or_path, revision=revision).to_dict()]
    except OSError:  # no generation_config.json: transformers derives it from the config, read next
        generation = []
    return generation + [PretrainedConfig.get_config_dict(name_or_path, revision=revision)[0]]


def chat_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    vocab = tokenizer.get_vocab()
    return sorted({vocab[t] for t in (IM_START, IM_END, PAD) if t in vocab})


def _dtype(name: str | None):
    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def load_model(
    args: ModelArguments,
    tokenizer: PreTrainedTokenizerBase,
    *,
    sequence_classification: bool = False,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM (or a one-output sequence-classification model) matching `tokenizer`.

    Grows the embeddings when `prepare_tokenizer` added tokens, and records pad and stop tokens in the model and
    generation configs so `generate()` stops where the trained model does.
    """
    if args.model_name_or_path is None:
        raise ValueError("model_name_or_path is not set: give a local model directory or a Hub model id.")
    args = dataclasses.replace(args, model_name_or_path=available_base(args.model_name_or_path, trust_remote_code))
    check_model_source(args.model_name_or_path)
    if is_adapter_dir(args.model_name_or_path):
        # The previous stage saved a LoRA adapter: this stage starts from base + adapter, merged.
        path = merged_model_dir(args.model_name_or_path, trust_remote_code=trust_remote_code)
        args = dataclasses.replace(args, model_name_or_path=str(path), model_revision="main")
    quant = get_quantization_config(args)
    if quant is not None and device_map is None:
        # bitsandbytes needs the weights placed at load time; one device per process under DDP.
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}
    kwargs = dict(
        revision=args.model_revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=args.attn_implementation,
        dtype=_dtype(args.dtype),
        quantization_config=quant,
        device_map=device_map,
        use_safetensors=True,
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if sequence_classification:
        config = AutoConfig.from_pretrained(args.model_name_or_path, revision=args.model_revision,
                                            trust_remote_code=trust_remote_code)
        from_causal_lm = not any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        with _quiet_new_head_report(from_causal_lm):
            model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    # The model's own EOS ids (its base's, as saved) stay stop tokens next to the chat template's end-of-turn token.
    stops = stop_token_ids(tokenizer, model)
    model.config.eos_token_id = stops[0]
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stops
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@contextmanager
def _quiet_new_head_report(active: bool):
    """Hide transformers' load report when it only says what loading a causal LM as a classifier always does.

    The checkpoint has no ``score`` head (it starts random: the reward stage trains it, or an adapter's trained head
    replaces it and `RewardModel` checks that) and an ``lm_head`` the classifier does not use. The report prints that
    as a warning table, "newly initialized" and all, the usual sign of a lost head. Any other key in it is still
    shown. (A filter, not a logger level: transformers runs its tensor-parallel plan check, and warns, when the level
    of transformers.modeling_utils is WARNING or above.)
    """
    log = logging.getLogger("transformers.modeling_utils")

    def only_head_keys(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        keys = [line.split("|")[0].strip() for line in message.splitlines()[2:] if "|" in line]
        rows = [k for k in keys if k and not set(k) <= set("-+")]
        return not rows or not all(k.startswith((f"{HEAD}.", "lm_head.")) for k in rows)

    if active:
        log.addFilter(only_head_keys)
    try:
        yield
    finally:
        log.removeFilter(only_head_keys)


def lora_config(
    args: ModelArguments,
    tokenizer: PreTrainedTokenizerBase,
    task_type: str = TaskType.CAUSAL_LM,
    *,
    tied_embeddings: bool = False,
    new_chat_template: bool = False,
) -> LoraConfig | None:
    """LoRA settings from `args` (TRL's `get_peft_config`), for the stage's `task_type`; `new_chat_template` says the
    base had no template and `prepare_tokenizer` gave it one.

    A base model has never produced <|im_start|>/<|im_end|>: pretraining only pushed their output logits down. So with
    a new template (and `train_chat_tokens`), their embedding rows are trained and lm_head is trained whole: TRL 1.16's
    fused LM-head loss reads `lm_head.weight` directly, so PEFT's per-row trainable tokens on lm_head would be ignored.
    Unset `lora_target_modules` means every linear layer ("all-linear"), not PEFT's per-architecture default.
    """
    if not args.use_peft:
        return None
    if args.lora_task_type is not None and args.lora_task_type != task_type:
        raise ConfigError(f"lora_task_type: {args.lora_task_type}, but this stage trains a {TaskType(task_type).value} "
                         "adapter; drop lora_task_type from the config (each stage sets its own).")
    trainable_tokens = None
    modules_to_save = list(args.lora_modules_to_save or [])
    if args.train_chat_tokens and new_chat_template and task_type == TaskType.CAUSAL_LM:
        if tied_embeddings:
            # PEFT would wrap the tied lm_head too, which TRL's fused loss cannot read (it fails on `.bias`).
            logger.warning("Tied embeddings: the chat tokens' rows are not trained separately; LoRA alone must "
                           "learn to emit <|im_end|>. Train longer or use a model with untied embeddings.")
        else:
            trainable_tokens = {"embed_tokens": chat_token_ids(tokenizer)}
            if "lm_head" not in modules_to_save:
                modules_to_save.append("lm_head")
    if task_type == TaskType.SEQ_CLS and HEAD not in modules_to_save:
        modules_to_save.append(HEAD)  # the new reward head must be trained and saved with the adapter
    config = get_peft_config(dataclasses.replace(
        args, lora_task_type=task_type, lora_target_modules=args.lora_target_modules or "all-linear",
        lora_modules_to_save=modules_to_save or None))
    config.trainable_token_indices = trainable_tokens  # read when PEFT wraps the model, like every other field
    return config


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(adapter_dir: str | Path) -> str:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path.")
    # A relative path means the directory the adapter was trained in; from anywhere else transformers would read it
    # as a Hub id and fail with "Repo id must be in the form ...". (A missing absolute path may be a merged cache
    # that available_base rebuilds.)
    if looks_like_path(base) and not Path(base).expanduser().is_absolute() and not Path(base).exists():
        raise ModelNotFoundError(
            f"{adapter_dir}/adapter_config.json names its base model by the relative path {base}, which does not "
            f"exist from the working directory {os.getcwd()}. It is relative to the directory the adapter was "
            f"trained in: run from there, or write the base's absolute path into base_model_name_or_path.")
    return base


# The merged copy of an adapter is cached outside it (its directory may be read-only, shared or on another disk), in
# the cache directory: $RLHF_KIT_CACHE, else the Hugging Face home ($HF_HOME). It sits at the adapter's absolute path
# under `<cache>/rlhf_kit_merged/`, so a merged base recorded by a later stage names the adapter it came from, and is
# rebuilt from it when the cache was cleared. A record says what it was built from (`merge_key`).
CACHE_ENV = "RLHF_KIT_CACHE"
MERGED_CACHE = "rlhf_kit_merged"
MERGE_RECORD = "rlhf_kit_merge.json"
# The base is loaded at its stored precision for merging; recorded so that merging another way would rebuild.
MERGE_DTYPE = "auto"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_weights_stamp(name_or_path: str) -> dict[str, list[int]] | None:
    """Size and modification time of a local base's weights and config (None for a Hub id: its revision says it).

    Cheap where hashing would not be (an 8B base is 16 GB), and enough to see a base rebuilt in place: PPO's base is
    the SFT stage's merged directory, which is rebuilt when SFT runs again.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return None
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin") or f.name == "config.json")
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def merge_key(adapter_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """Everything the merged model of `adapter_dir` is built from; a merged copy recorded with another key is stale.

    The adapter's weights and config by content (SHA-256), the base by name, revision and (when local) its files'
    size and time, the merge precision, and the vocabulary size the base's embeddings are grown to.
    """
    adapter_dir = Path(adapter_dir)
    weights = [adapter_dir / name for name in ADAPTER_WEIGHTS if (adapter_dir / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{adapter_dir} has adapter_config.json but no {' or '.join(ADAPTER_WEIGHTS)}: the "
                                "stage that wrote it did not finish. Run it again, or point to a complete output.")
    config_file = adapter_dir / "adapter_config.json"
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(adapter_dir)
    base = adapter_base(adapter_dir)
    return {
        "adapter": {f.name: _sha256(f) for f in [*weights, config_file]},
        "base_model": base,
        "base_revision": json.loads(config_file.read_text()).get("revision"),
        "base_files": _local_weights_stamp(base),
        "dtype": MERGE_DTYPE,
        "vocab_size": len(tokenizer),
    }


def is_fresh_merge(merged_dir: str | Path, key: dict) -> bool:
    """Whether `merged_dir` is a complete merge built from `key`. The record is written last, so a directory
    without it (an interrupted build, or a cache from before records) counts as missing."""
    record = Path(merged_dir) / MERGE_RECORD
    try:
        return json.loads(record.read_text()) == key
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def cache_dir() -> Path:
    """Where rlhf-kit caches models it derives (merged adapters): $RLHF_KIT_CACHE, else $HF_HOME."""
    from huggingface_hub import constants

    return Path(os.environ.get(CACHE_ENV) or constants.HF_HOME).expanduser()


def merged_cache_path(adapter_dir: str | Path) -> Path:
    """The merged model's directory in the cache: the adapter's absolute path, under `<cache>/rlhf_kit_merged/`."""
    absolute = Path(adapter_dir).expanduser().resolve()
    return cache_dir() / MERGED_CACHE / absolute.relative_to(absolute.anchor)


def merged_source(path: str | Path) -> Path | None:
    """The adapter directory that `path` is the merged cache of (found from the path alone, so also when the cache
    was deleted), or None. A cache from before the cache directory sits inside its adapter as `merged/`."""
    path = Path(path)
    if MERGED_CACHE in path.parts:
        return Path(path.anchor or "/", *path.parts[path.parts.index(MERGED_CACHE) + 1:])
    return path.parent if path.name == "merged" and is_adapter_dir(path.parent) else None


def available_base(name_or_path: str, trust_remote_code: bool = False) -> str:
    """`name_or_path`, or, when it is a merged cache that no longer exists but its adapter does, that cache rebuilt."""
    source = merged_source(name_or_path)
    if source is None or Path(name_or_path).is_dir() or not is_adapter_dir(source):
        return name_or_path
    return str(merged_model_dir(source, trust_remote_code=trust_remote_code))


def merged_model_dir(adapter_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Fold a causal-LM LoRA adapter into its base (in full precision) and cache the result (`merged_cache_path`).

    A new stage trains a new adapter on top of the previous stage's *merged* weights. Merging happens in 16/32-bit
    (never into 4-bit weights, which would round the adapter away); a QLoRA stage then re-quantizes the merged model.
    The cache is rebuilt whenever the adapter, its base or the tokenizer changed since (`merge_key`): an SFT run
    again into the same directory must not leave the next stage starting from the old weights.
    """
    from accelerate import PartialState

    adapter_dir = Path(adapter_dir)
    out = merged_cache_path(adapter_dir)
    available_base(adapter_base(adapter_dir), trust_remote_code)  # first: the key stamps the base's files
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    key = merge_key(adapter_dir, tokenizer)
    # Under `accelerate launch` every process gets here: the main one merges while the others wait, then they find
    # its result fresh and load it (several processes writing one directory at once would trample each other).
    with PartialState().main_process_first():
        if not is_fresh_merge(out, key):
            _build_merged(adapter_dir, out, key, tokenizer, trust_remote_code)
    return out


def _build_merged(adapter_dir: Path, out: Path, key: dict, tokenizer, trust_remote_code: bool) -> None:
    """Merge into a new sibling directory, then swap it in by renames: a kill at any point leaves either the
    previous `out` or none, never a half-written one under its name."""
    from peft import PeftModel

    out.parent.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(p.name for p in out.parent.glob(f"{out.name}.*") if p.is_dir())
    if leftovers:
        logger.warning("%s holds %s, left by an interrupted merge (or one still running): delete them once no other "
                       "run is merging this adapter, to free the disk space.", out.parent, ", ".join(leftovers))
    # Loading the adapter and new embedding rows draws from the global RNG; forked, so that a seeded run starts
    # from the same weights whether or not an earlier run already left this cache.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        base = AutoModelForCausalLM.from_pretrained(
            adapter_base(adapter_dir), dtype=MERGE_DTYPE, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    # Unique names: two unrelated runs merging the same adapter at once must not write into one directory.
    tmp = out.with_name(f"{out.name}.partial-{uuid.uuid4().hex[:8]}")
    old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGE_RECORD).write_text(json.dumps(key, indent=2))  # last: only a complete merge has it
        if out.exists():
            out.rename(old)  # out cannot be replaced in one rename while it is a non-empty directory
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
