"""Parse a YAML config plus command-line overrides into typed dataclasses, strictly.

Every recipe calls `parse_config(ArgsA, ArgsB, ...)`. Precedence: dataclass default < YAML file < command line.
A key that no dataclass declares is an error that names it and suggests the closest valid key: TRL's own parser
warns and drops such keys, which turns a typo (`learning_rte`) into an hour of training with the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
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
    with path.open() as f:
        loaded = yaml.safe_load(f)
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


class _Parser(HfArgumentParser):
    def error(self, message):  # argparse would print usage and exit; a library raises.
        raise ConfigError(f"Invalid command-line value: {message}")


def parse_config(*dataclass_types: type, args: Sequence[str] | None = None, overrides: dict | None = None) -> tuple:
    """Build one instance of each dataclass from `--config file.yaml` and `--key value` overrides.

    `overrides` (a dict) sits between the YAML file and the command line; the pipeline uses it to hand one stage's
    output to the next. Returns the instances in the order of `dataclass_types`.
    """
    args = list(sys.argv[1:] if args is None else args)
    config_path, cli = _split_config_flag(args)
    values: dict[str, Any] = {}
    if config_path is not None:
        values.update(load_yaml(config_path))
        check_keys(list(values), dataclass_types, f"config file {config_path}")
    if overrides:
        check_keys(list(overrides), dataclass_types, "overrides")
        values.update(overrides)

    # allow_abbrev=False: argparse would otherwise accept `--learn` for `--learning_rate` without a word.
    parser = _Parser(dataclass_types, allow_abbrev=False)
    parser.set_defaults(**values)
    parsed = parser.parse_args_into_dataclasses(args=cli, return_remaining_strings=True)
    *instances, remaining = parsed
    unknown = [a for a in remaining if a.startswith("--")]
    if unknown:
        name = unknown[0][2:].split("=", 1)[0]
        raise ConfigError(
            f"Unknown command-line option '--{name}'.{_did_you_mean(name, field_names(*dataclass_types))}"
        )
    if remaining:
        raise ConfigError(f"Unexpected command-line values {remaining}: every value must follow a --key.")
    return tuple(instances)


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


def save_config(output_dir: str | Path, *instances: Any, name: str = "rlhf_kit_config.yaml") -> Path:
    """Write the resolved config next to the outputs, so a run can be reproduced from its own directory."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(*instances), sort_keys=True))
    return path
