"""Export a stage's output for use without rlhf-kit: the LoRA adapter, a merged model, GGUF files, a model card.

    from rlhf_kit.publish.export import ExportArguments, export
    export(ExportArguments(model_path="outputs/tiny-sft", formats=["adapter", "merged", "gguf"]))

The output directory is laid out as a Hub model repository, so `rlhf_kit.publish.hub.push_folder` uploads it as it is
(the names of rlhf-kit's own files are in `rlhf_kit.runs`):

    README.md                                 model card: Hub metadata, lineage, how to load and chat
    rlhf_kit_stage.json, rlhf_kit_config.yaml the stage record (the lineage) and training config, copied
    rlhf_kit_export.yaml                      this export's settings
    config.json, model*.safetensors, ...      the merged model, with tokenizer, chat template, generation config
    adapter/                                  the LoRA adapter in PEFT's layout (at the root when not merged)
    <name>-f16.gguf, <name>-q8_0.gguf         GGUF files for llama.cpp-based tools

Merging always reloads the base in 16/32-bit and folds the adapter into those weights. A QLoRA adapter is never
merged into the 4-bit weights it was trained against: rounding W + BA back to 4 bits would erase most of BA.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_kit.config import CONFIG_FILE, ConfigError, looks_like_path, save_config
from rlhf_kit.errors import UserError
from rlhf_kit.model import (HEAD, IM_END, ModelArguments, adapter_base, is_adapter_dir, load_model, merged_model_dir,
                    merged_source)
from rlhf_kit.publish.model_card import write_card
from rlhf_kit.rewards import write_reward_files
from rlhf_kit.runs import EVAL_FILE, EXPORT_FILE, REWARD_FILE, STAGE_FILE, StageOutput
from rlhf_kit.stages import TRAINING

logger = logging.getLogger(__name__)

FORMATS = ("adapter", "merged", "gguf")
KNOWN_STAGES = TRAINING
REPO_ID_HELP = ("a Hub repository id is <namespace>/<name>: letters, digits, '-', '_' and '.', at most 96 "
                "characters each, not starting or ending with '-' or '.'")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# GGUF type -> (ggml tensor type, llama.cpp file type). Only types the `gguf` package can quantize in numpy.
GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
              "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}


class ExportError(UserError):
    """A stage output that cannot be exported as asked; the message says what to do instead."""


@dataclass
class ExportArguments:
    """What to export from which stage output, and where to publish it."""

    model_path: str | None = field(default=None, metadata={"help": "A stage's output_dir (SFT, reward, PPO, ...)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write; default <model_path>-export."})
    formats: list[str] = field(default_factory=lambda: ["adapter", "merged"],
                               metadata={"help": f"Any of {list(FORMATS)}."})
    gguf_types: list[str] = field(default_factory=lambda: ["f16", "q8_0"],
                                  metadata={"help": f"GGUF files to write, any of {list(GGUF_TYPES)}."})
    dtype: str = field(default="auto", metadata={"help": "Merged weights' dtype; auto keeps the base's."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors shard of the merged model."})
    base_model_path: str | None = field(
        default=None, metadata={"help": "A local copy of the adapter's base, if the recorded one moved or is offline."})
    base_model_id: str | None = field(
        default=None, metadata={"help": "Hub id of the model the adapter applies to (for PPO: the SFT model merged, "
                                "once pushed): written into the exported adapter_config.json and the card."})
    model_name: str | None = field(default=None, metadata={"help": "Title and GGUF file names; default: the folder."})
    license: str = field(default="other", metadata={"help": "Hub license id for the card (check the base's)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier export in output_dir."})
    trust_remote_code: bool = field(default=False)
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the export to hub_model_id afterwards."})
    hub_model_id: str | None = field(default=None, metadata={"help": "<namespace>/<name> to push to."})
    hub_private_repo: bool = field(default=True, metadata={"help": "Create the repository private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})
    commit_message: str | None = field(default=None)
    dry_run: bool = field(default=False, metadata={"help": "With push_to_hub: list what would be uploaded."})

    def __post_init__(self):
        if not self.model_path:
            raise ConfigError("model_path is not set: give the output_dir of a finished stage, e.g. outputs/tiny-sft.")
        if self.output_dir is None:
            self.output_dir = f"{str(self.model_path).rstrip('/')}-export"
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ConfigError(f"formats {self.formats}: choose one or more of {list(FORMATS)}.")
        unknown = [t for t in self.gguf_types if t not in GGUF_TYPES]
        if unknown or ("gguf" in self.formats and not self.gguf_types):
            raise ConfigError(f"gguf_types {self.gguf_types}: choose one or more of {list(GGUF_TYPES)}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype '{self.dtype}': choose one of {list(DTYPES)} (merging is never done in 4/8-bit).")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub: true needs hub_model_id: <namespace>/<name>.")
        if self.hub_model_id:
            check_repo_id(self.hub_model_id)


def check_repo_id(repo_id: str) -> None:
    """A malformed Hub id fails when the config is parsed, not after the export (hub.py's push checks with it too)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"hub_model_id '{repo_id}' is malformed: {REPO_ID_HELP}.") from None


# ---------------------------------------------------------------------------------------------------------------
# The stage output
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSource:
    """A finished stage's output checked for export: the directory as read once, and the base its adapter applies to."""

    output: StageOutput
    base: str | None  # local directory or Hub id; None for a full model

    @property
    def path(self) -> Path:
        return self.output.path

    @property
    def stage(self) -> str:
        return self.output.stage

    @property
    def adapter(self) -> bool:
        return self.output.adapter_dir == "."

    @property
    def reward(self) -> bool:  # a one-output sequence-classification reward model (with its REWARD_FILE)
        return self.output.reward


def check_stage_output(output: StageOutput, base_model_path: str | None = None) -> ExportSource:
    """Check that `output` is a finished stage's output and find the base its adapter applies to. Loads no weights."""
    path, record = output.path, output.record
    if record is None:
        raise ExportError(f"{path} is not an rlhf-kit stage output (it has no {STAGE_FILE}). Pass a stage's "
                          "output_dir; a checkpoint-N directory is not one, export the finished stage instead.")
    if record.get("stage") not in KNOWN_STAGES:
        raise ExportError(f"{path}/{STAGE_FILE} names the unknown stage '{record.get('stage')}'; known stages are "
                          f"{list(KNOWN_STAGES)}.")
    if not record.get("complete", False):
        raise ExportError(f"the {record['stage']} stage in {path} did not finish; run it again to the end first.")
    adapter = output.adapter_dir == "."
    if not adapter and not output.has_model:
        raise ExportError(f"{path} holds neither a LoRA adapter (adapter_config.json) nor a model (config.json).")
    if "tokenizer_config.json" not in output.files:
        raise ExportError(f"{path} has no tokenizer; every stage saves one with its output, was this one moved?")
    if adapter:
        task = output.adapter_config.get("task_type")
        if (task == "SEQ_CLS") != output.reward:
            raise ExportError(f"{path}: the adapter's task_type is {task} but the stage is '{record['stage']}'; "
                              "the stage record and the adapter come from different runs.")
    return ExportSource(output, base=_resolve_base(output, base_model_path) if adapter else None)


def _resolve_base(output: StageOutput, override: str | None) -> str:
    """The adapter's base: `override`, else the recorded one (checked for availability only when it is needed)."""
    if override:
        if not Path(override).is_dir() and looks_like_path(override):
            raise FileNotFoundError(f"base_model_path {override} does not exist.")
        return override
    recorded = output.adapter_config.get("base_model_name_or_path")
    if not recorded:
        raise ExportError(f"{output.path}/adapter_config.json names no base_model_name_or_path; pass base_model_path.")
    # The reward stage records its base as an absolute path; adapter_config.json may hold a relative one.
    absolute = output.reward_meta.get("base_model")
    return absolute if absolute and Path(absolute).is_dir() else recorded


class BaseModelUnavailable(ExportError):
    """The adapter's base is neither a local directory nor obtainable from the Hub (offline, not cached)."""


def _merged_cache_parent(base: str) -> Path | None:
    """An SFT output's merged cache (the base of PPO and reward adapters), when deleted, is rebuilt from the SFT
    adapter."""
    source = merged_source(base)
    return source if source is not None and not Path(base).is_dir() and is_adapter_dir(source) else None


def _base_config(source: ExportSource):
    """The base's config, or an error saying what to do when it is neither local nor obtainable from the Hub."""
    base = source.base
    if (parent := _merged_cache_parent(base)) is not None:
        return AutoConfig.from_pretrained(adapter_base(parent))  # the merged cache keeps its base's shape
    try:
        return AutoConfig.from_pretrained(base)
    except OSError as err:
        where = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if constants.is_offline_mode()
                 else "nor can it be downloaded from the Hub")
        raise BaseModelUnavailable(
            f"base model '{base}' of the adapter in {source.path} is not available: it is not a directory here, "
            f"and {where}. Pass base_model_path: <a local copy of the model the adapter was trained on>"
            + ("" if looks_like_path(base) else f", or download it while online (`hf download {base}`)") + ".") from err


def _local_base(source: ExportSource) -> str:
    if (parent := _merged_cache_parent(source.base)) is not None:
        return str(merged_model_dir(parent))
    _base_config(source)
    return source.base


def check_adapter_fits(source: ExportSource, vocab_size: int) -> None:
    """Compare every tensor of the adapter with the base's shapes, on a weightless (meta) copy of the base.

    PEFT loads an adapter into the wrong model without a word when the layer names happen to match (a 1B adapter on
    an 8B base fails deep inside a matmul; one with fewer layers silently leaves the rest untouched).
    """
    from safetensors import safe_open

    config = _base_config(source)
    if source.reward:
        config.num_labels = 1
    if getattr(config, "quantization_config", None):
        raise ExportError(f"the base '{source.base}' is a pre-quantized checkpoint; merging into 4/8-bit weights "
                          "would round the adapter away. Pass base_model_path: <the unquantized original>.")
    auto = AutoModelForSequenceClassification if source.reward else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    modules = dict(model.named_modules())
    vocab = max(vocab_size, config.get_text_config().vocab_size)
    embeddings = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    rows = {n for n, p in model.named_parameters() if any(p is e for e in embeddings)}
    problems = []
    indices = source.output.adapter_config.get("trainable_token_indices") or {}
    for layer, ids in (indices.items() if isinstance(indices, dict) else [("embeddings", indices)]):
        if ids and max(ids) >= vocab:
            problems.append(f"trainable_token_indices[{layer}] reaches id {max(ids)}, the base has {vocab} tokens")
    with safe_open(str(source.path / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            problem = _misfit(key.removeprefix("base_model.model."), shape, params, modules, rows, vocab)
            if problem:
                problems.append(problem)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:5])
        if len(problems) > 5:
            listed += f"\n  ... and {len(problems) - 5} more"
        raise ExportError(f"the adapter in {source.path} does not fit its base '{source.base}':\n{listed}\nIt was "
                          "trained on another model: pass base_model_path: <the model it was trained on>.")


def _misfit(name, shape, params, modules, vocab_rows, vocab) -> str | None:
    for suffix, side in ((".lora_A.weight", "in"), (".lora_B.weight", "out"), (".lora_embedding_A", "in"),
                         (".lora_embedding_B", "out"), (".lora_magnitude_vector.weight", "out"),
                         (".lora_magnitude_vector", "out"),
                         (".token_adapter.trainable_tokens_delta", "embedding")):
        if name.endswith(suffix):
            module = modules.get(name.removesuffix(suffix))
            if module is None:
                return f"{name}: the base has no module {name.removesuffix(suffix)}"
            size_in = getattr(module, "in_features", getattr(module, "num_embeddings", None))
            size_out = getattr(module, "out_features", getattr(module, "embedding_dim", None))
            if suffix == ".lora_embedding_A":
                size_in = vocab
            want, got = {"in": (size_in, shape[-1]), "out": (size_out, shape[0]),
                         "embedding": (size_out, shape[-1])}[side]
            return None if want == got else f"{name}: size {got}, the base's layer has {want}"
    want = params.get(name)
    if want is None:
        return f"{name}: the base has no such parameter"
    if name in vocab_rows:
        want = (vocab, *want[1:])  # embedding rows grow with the tokens added for the chat template
    return None if want == shape else f"{name}: shape {shape}, the base's is {want}"


# ---------------------------------------------------------------------------------------------------------------
# Adapter and merged model
# ---------------------------------------------------------------------------------------------------------------


def export_adapter(source: ExportSource, out: Path, tokenizer, base_model_id: str | None = None) -> Path:
    """Copy the adapter as plain PEFT saves it (byte for byte: the weights are the trained ones) with its tokenizer."""
    if not source.adapter:
        raise ExportError(f"the {source.stage} stage in {source.path} trained the full model: there is no adapter to "
                          "export. Use formats: [merged].")
    if not (source.path / "adapter_model.safetensors").is_file():
        raise ExportError(f"{source.path} has no adapter_model.safetensors; re-save the adapter with safetensors.")
    out.mkdir(parents=True, exist_ok=True)
    config = dict(source.output.adapter_config)
    if base_model_id:
        config["base_model_name_or_path"] = base_model_id
    elif looks_like_path(base := config["base_model_name_or_path"]) or Path(base).expanduser().is_dir():
        # A relative path with one slash (`outputs/tiny-sft`) reads as a Hub id to PEFT: it fails wherever the
        # adapter is downloaded, and even here from another working directory.
        where = "absolute" if Path(base).expanduser().is_absolute() else "relative (to the directory training ran in)"
        logger.warning("The exported adapter names its base by the %s local path %s, which nobody who downloads it "
                       "has. Set base_model_id to the base's Hub id (export: base_model_id: <namespace>/<name>; "
                       "rlhf-kit push: --base_model_id; for a PPO or reward adapter, the SFT model merged, once "
                       "pushed), or export or push formats: [merged].", where, base)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(source.path / "adapter_model.safetensors", out / "adapter_model.safetensors")
    tokenizer.save_pretrained(out)
    if source.reward:
        for name in (REWARD_FILE, EVAL_FILE):
            if name in source.output.files:
                shutil.copyfile(source.path / name, out / name)
    return out


def load_merged(source: ExportSource, tokenizer, dtype: str = "auto", trust_remote_code: bool = False):
    """The stage's model as one set of 16/32-bit weights: the base reloaded unquantized with the adapter folded in.

    `load_model` grows the embeddings for added chat tokens and writes pad and stop tokens into the config and
    generation config, exactly as training loaded it. The merge is checked against the unmerged model on a probe.
    """
    path = _local_base(source) if source.adapter else str(source.path)
    args = ModelArguments(model_name_or_path=path, dtype=dtype)
    model = load_model(args, tokenizer, sequence_classification=source.reward, trust_remote_code=trust_remote_code)
    model.eval()
    if not source.adapter:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(source.path)).eval()
    probe = _probe(tokenizer, model.device)
    with torch.no_grad():
        before = model(**probe).logits.float()
        model = model.merge_and_unload()
        after = model(**probe).logits.float()
    error = (after - before).abs().max().item() / max(1.0, before.abs().max().item())
    if error > (1e-4 if model.dtype == torch.float32 else 3e-2):
        raise ExportError(f"merging the adapter of {source.path} changed the outputs by {error:.2g} (relative); "
                          "export formats: [adapter] instead, and report this with your peft version.")
    if source.reward:
        _check_reward_head(model, source.path)
    return model


def _probe(tokenizer, device) -> dict[str, torch.Tensor]:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, how are you?"},
                                             {"role": "assistant", "content": "Fine, thanks."}], tokenize=True,
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer("Hello, how are you?")["input_ids"]
    return {"input_ids": torch.tensor([ids], device=device), "attention_mask": torch.ones(1, len(ids), device=device,
                                                                                       dtype=torch.long)}


def _check_reward_head(model, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        saved = {k.split(".")[-1]: f.get_tensor(k) for k in f.keys() if k.split(".")[-2:-1] == [HEAD]}
    if not saved:
        raise ExportError(f"{path} has no trained `score` head in its adapter; merging would keep a random head.")
    for name, tensor in saved.items():
        loaded = getattr(model.score, name, None)
        if loaded is None or not torch.equal(loaded.detach().cpu().to(tensor.dtype), tensor):
            raise ExportError(f"the merged reward head score.{name} differs from the one saved in {path}.")


def save_merged(model, tokenizer, source: ExportSource, out: Path, max_shard_size: str = "5GB") -> Path:
    """An ordinary transformers directory: sharded safetensors, tokenizer with chat template, generation config;
    a reward model also gets its normalization (rlhf_kit_reward.json) and held-out report."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    if source.reward:
        meta = {**source.output.reward_meta, "adapter": False, "quantization": {},
                "dtype": str(model.dtype).removeprefix("torch.")}
        meta.pop("base_model", None)
        write_reward_files(out, meta, source.output.reward_report)
    return out


# ---------------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------------

# LLaMA-3's pre-tokenizer split (tokenizer.json), which llama.cpp calls "llama-bpe".
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_gguf(model_dir: str | Path, path: str | Path, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write the LLaMA model in `model_dir` (a merged export) as one GGUF file, as llama.cpp's converter would.

    Tensors are read and written one at a time, so memory stays at about one tensor whatever the model size.
    1-D tensors (norms) stay float32; a matrix whose rows do not split into whole quantization blocks falls back
    to float16, as in llama.cpp.
    """
    import gguf

    model_dir, path = Path(model_dir), Path(path)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama" or config.architectures != ["LlamaForCausalLM"]:
        raise ExportError(f"GGUF export writes LLaMA causal LMs; {model_dir} is {config.architectures}. Use "
                          "llama.cpp's convert_hf_to_gguf.py on the merged export for other architectures (reward "
                          "models have no GGUF form llama.cpp can chat with).")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    qtype, ftype = (getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type][0]),
                    getattr(gguf.LlamaFileType, GGUF_TYPES[gguf_type][1]))
    writer = gguf.GGUFWriter(str(path), "llama")
    _gguf_hyperparameters(writer, config, name or model_dir.name, ftype)
    _gguf_tokenizer(writer, tokenizer, config.vocab_size)
    plan = _gguf_plan(model_dir, config, qtype)
    for item in plan:
        writer.add_tensor_info(item["name"], item["shape"], item["np_dtype"], item["nbytes"], raw_dtype=item["raw"])
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item in plan:
        writer.write_tensor_data(item["load"]())
    writer.close()
    return path


def _gguf_hyperparameters(writer, config, name: str, ftype) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = _rope(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(ftype)
    if ftype not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope(config) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or {})  # transformers 5; 4.x had rope_theta + rope_scaling
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", "default")
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise ExportError(f"rope_type '{rope['rope_type']}' has no GGUF writer here (default, linear and llama3 "
                          "do); convert the merged export with llama.cpp's convert_hf_to_gguf.py.")
    return rope


def _llama3_rope_factors(config) -> np.ndarray:
    """Per-frequency scaling of LLaMA-3.1's rope, which llama.cpp reads from a `rope_freqs` tensor
    (same formula as transformers' `_compute_llama3_parameters` and llama.cpp's converter)."""
    rope = _rope(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_context / high, 1.0,
                       np.where(wavelen > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _gguf_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model["type"] != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise ExportError("GGUF export writes byte-level BPE tokenizers (GPT-2 / LLaMA-3 style); this tokenizer is "
                          f"{model['type']} (byte_fallback={model.get('byte_fallback')}). Convert the merged export "
                          "with llama.cpp's convert_hf_to_gguf.py instead.")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} rows.")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # embedding rows no token uses (vocab padded to a multiple)
    types = [gguf.TokenType.UNUSED] * n_vocab
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_gguf_pre_tokenizer(pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id,
                          tokenizer.eos_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            add(token_id)
    # llama.cpp stops at EOS and at the end-of-turn token; with the ChatML template both are <|im_end|>.
    if IM_END in vocab:
        writer.add_eot_token_id(vocab[IM_END])
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        # `{% generation %}` marks the trained tokens for transformers; llama.cpp's Jinja engine does not know the tag
        # and it renders nothing, so it is dropped.
        writer.add_chat_template(re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tokenizer.chat_template))


def _gguf_pre_tokenizer(pre: dict) -> str:
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and parts[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT and not parts[1].get("use_regex")):
        return "llama-bpe"
    raise ExportError(f"this tokenizer's pre-tokenizer ({pre.get('type')}) is neither GPT-2's nor LLaMA-3's, so "
                      "llama.cpp would split text differently. Convert the merged export with llama.cpp's "
                      "convert_hf_to_gguf.py, which recognizes more tokenizers.")


def _gguf_plan(model_dir: Path, config, qtype) -> list[dict[str, Any]]:
    """One entry per GGUF tensor: its name, stored shape/dtype/size, and how to load and convert it (lazily)."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    files = sorted(model_dir.glob("*.safetensors"))
    plan = []
    for file in files:
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        for key in keys:
            if key.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from rope_theta by every runtime
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ExportError(f"{file.name}: tensor {key} has no GGUF name for LLaMA.")
            if name == "output.weight" and config.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            plan.append(_gguf_entry(name, shapes[key], qtype, _loader(file, key, config)))
    if _rope(config)["rope_type"] == "llama3":
        factors = _llama3_rope_factors(config)
        plan.append(_gguf_entry("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32, lambda: factors))
    return plan


def _loader(file: Path, key: str, config):
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            tensor = f.get_tensor(key).float().numpy()
        # llama.cpp applies rotary embeddings to interleaved pairs (x0, x1), (x2, x3)...; transformers rotates the
        # two halves of each head. llama.cpp's converter reorders each head's q/k rows to match (transformers'
        # GGUF loader undoes it on load); k has num_key_value_heads heads.
        if ".self_attn.q_proj." in key:
            tensor = _permute_rotary(tensor, config.num_attention_heads)
        elif ".self_attn.k_proj." in key:
            tensor = _permute_rotary(tensor, config.num_key_value_heads)
        return tensor

    return load


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    # (n_head * head_dim, ...) -> per head (2, head_dim / 2) halves -> (head_dim / 2, 2) interleaved pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_entry(name: str, shape: tuple[int, ...], qtype, load) -> dict[str, Any]:
    import gguf

    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if len(shape) == 1:
        qtype = F32
    elif qtype not in (F32, F16) and shape[-1] % block:
        qtype = F16
    if qtype == F32:
        return {"name": name, "shape": shape, "np_dtype": np.dtype(np.float32), "raw": None,
                "nbytes": 4 * math.prod(shape), "load": lambda: load().astype(np.float32)}
    if qtype == F16:
        return {"name": name, "shape": shape, "np_dtype": np.dtype(np.float16), "raw": None,
                "nbytes": 2 * math.prod(shape), "load": lambda: load().astype(np.float16)}
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return {"name": name, "shape": byte_shape, "np_dtype": np.dtype(np.uint8), "raw": qtype,
            "nbytes": math.prod(byte_shape), "load": lambda: gguf.quantize(load(), qtype)}


# ---------------------------------------------------------------------------------------------------------------
# The whole export
# ---------------------------------------------------------------------------------------------------------------


def layout(formats: list[str]) -> dict[str, str]:
    """Where each artifact goes in the output directory (= the Hub repository): the merged model at the root, so
    `from_pretrained(repo)` loads it; the adapter at the root too when it is the only model, else in adapter/."""
    return {"merged": ".", "gguf": ".", "adapter": "adapter" if "merged" in formats else "."}


def export(args: ExportArguments, output: StageOutput | None = None) -> dict[str, list[str]]:
    """Write `args.formats` of the stage in `args.model_path` to `args.output_dir`, with the card and configs.

    `output` is that stage output when the caller has read it already (a push does). Returns {artifact: [files
    relative to output_dir]}. Every check that needs no weights runs first.
    """
    output = output or StageOutput.read(args.model_path)
    source = check_stage_output(output, base_model_path=args.base_model_path)
    if "adapter" in args.formats and not source.adapter:
        raise ExportError(f"the {source.stage} stage in {source.path} trained the full model: there is no adapter to "
                          "export. Use formats: [merged] (and gguf).")
    if "gguf" in args.formats and source.reward:
        raise ExportError("a reward model has no GGUF form llama.cpp can chat with; export it as adapter or merged.")
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=args.trust_remote_code)
    if source.adapter:
        try:
            check_adapter_fits(source, len(tokenizer))
        except BaseModelUnavailable as err:
            if args.formats != ["adapter"]:
                raise
            # Copying an adapter needs no base; whoever loads it does.
            logger.warning("Exporting the adapter without checking it against its base: %s", err)
    out = _prepare_output_dir(Path(args.output_dir), source.path, args.overwrite)
    where, name = layout(args.formats), args.model_name or source.path.resolve().name
    save_config(out, args, name=EXPORT_FILE)  # first: it marks the directory as an export (see overwrite)

    before = _files(out)
    written: dict[str, list[str]] = {}
    if "adapter" in args.formats:
        export_adapter(source, out / where["adapter"], tokenizer, base_model_id=args.base_model_id)
        written["adapter"] = sorted(set(_files(out)) - set(before))
    if "merged" in args.formats or "gguf" in args.formats:
        merged_dir = out if "merged" in args.formats else out / ".merged-for-gguf"
        model = load_merged(source, tokenizer, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        done = set(_files(out))
        save_merged(model, tokenizer, source, merged_dir, args.max_shard_size)
        del model
        if "merged" in args.formats:
            written["merged"] = sorted(set(_files(out)) - done)
        try:
            for gguf_type in args.gguf_types if "gguf" in args.formats else []:
                path = write_gguf(merged_dir, out / f"{name}-{gguf_type}.gguf", gguf_type, name=name)
                written.setdefault("gguf", []).append(path.name)
        finally:
            if merged_dir != out:
                shutil.rmtree(merged_dir, ignore_errors=True)

    for file in (STAGE_FILE, CONFIG_FILE):
        if file in source.output.files:
            shutil.copyfile(source.path / file, out / file)
    write_card(StageOutput.read(out))
    return written


def _prepare_output_dir(out: Path, source: Path, overwrite: bool) -> Path:
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ExportError(f"output_dir {out} is inside the stage output {source}; export next to it instead.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"output_dir {out} is not empty; choose another one or set overwrite: true.")
        if not (out / EXPORT_FILE).is_file():
            raise ExportError(f"output_dir {out} is not empty and holds no earlier export ({EXPORT_FILE}); refusing "
                              "to delete it. Choose another output_dir.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
