"""The settings every training stage shares (rlhf_kit.training.settings) behave the same in every stage: the bf16
default follows the hardware, and an evaluation schedule without evaluation data fails before a model loads, with
one message."""

import pytest
import torch
import yaml
from conftest import REPO, load_recipe

from rlhf_kit.config import parse_config
from rlhf_kit.stages import TRAINING, recipe_arguments

# Every stage has rlhf-kit's settings; pretrain (a plain Trainer that evaluates when it has a test split) has no
# early eval-data check.
STAGES = [stage for stage in TRAINING if stage != "pretrain"]
HAS_BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def stage_settings(parsed):
    """The training arguments among a recipe's parsed config instances."""
    from transformers import TrainingArguments

    (args,) = [instance for instance in parsed if isinstance(instance, TrainingArguments)]
    return args


@pytest.mark.parametrize("stage", TRAINING)
def test_bf16_follows_the_hardware_in_every_stage(stage, tmp_path):
    tiny = REPO / "recipes/configs" / stage / "tiny.yaml"
    # The tiny configs run on any machine, so none fixes the precision: the default must be right on its own.
    assert "bf16" not in yaml.safe_load(tiny.read_text()), f"{tiny} sets bf16; the stage default should decide"
    parsed = parse_config(*recipe_arguments(stage), args=["--config", str(tiny), "--output_dir", str(tmp_path)])
    args = stage_settings(parsed)
    assert args.bf16 is HAS_BF16

    config_class = type(args)
    assert config_class(output_dir=str(tmp_path), report_to="none").bf16 is HAS_BF16
    assert config_class(output_dir=str(tmp_path), report_to="none", fp16=True, use_cpu=True).bf16 is False
    assert config_class(output_dir=str(tmp_path), report_to="none", bf16=True, use_cpu=True).bf16 is True


@pytest.mark.parametrize("stage", TRAINING)
def test_stage_configs_parse_without_deprecation_or_pinning_warnings(stage, tmp_path):
    """TRL's configs declare transformers' deprecated `gradient_checkpointing` (default on): its value arrives under
    `activation_checkpointing`, without the FutureWarning every run used to print; without an accelerator the
    DataLoader is not asked to pin memory (it warns that it cannot)."""
    import warnings

    tiny = REPO / "recipes/configs" / stage / "tiny.yaml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = parse_config(*recipe_arguments(stage), args=["--config", str(tiny), "--output_dir", str(tmp_path)])
        args = stage_settings(parsed)
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    written = yaml.safe_load(tiny.read_text()).get("activation_checkpointing")
    default = {f.name: f.default for f in type(args).__dataclass_fields__.values()}["gradient_checkpointing"]
    assert args.activation_checkpointing is args.gradient_checkpointing is (bool(default) if written is None else written)
    assert args.dataloader_pin_memory is torch.accelerator.is_available()


# The reward stage is not among them: without a test split it holds a share of its training pairs out
# (test_reward.py::test_a_single_preference_file_holds_out_pairs_for_the_report_and_the_gate); it fails this way
# only when the data is too small to spare any (the in-sample case there).
@pytest.mark.parametrize("stage", [stage for stage in STAGES if stage != "reward"])
def test_eval_schedule_without_eval_data_fails_before_a_model_loads_in_every_stage(stage, tmp_path):
    # The tiny configs evaluate (eval_strategy epoch / steps) on their data's test split, which is asked for by a
    # name the data does not have; the model does not exist, so only a check before loading can answer.
    main = load_recipe(stage)
    overrides = {"model_name_or_path": "no/such/model", "output_dir": str(tmp_path), "dataset_test_split": "nope"}
    with pytest.raises(ValueError) as error:
        main(["--config", f"recipes/configs/{stage}/tiny.yaml"], overrides=overrides)
    schedule = yaml.safe_load((REPO / "recipes/configs" / stage / "tiny.yaml").read_text())["eval_strategy"]
    assert str(error.value) == (f"eval_strategy is '{schedule}' but no evaluation split was found; set "
                                "eval_dataset_name / dataset_test_split, or eval_strategy: 'no'.")


def test_wrapping_a_model_in_lora_prints_no_dependency_deprecation_warning():
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` on every adapter it wraps (TRL does around
    generation): a process that imports rlhf_kit (every recipe and the CLI do, first) hides that one message, so a
    LoRA stage's console stays quiet, and nothing else. A fresh process: pytest resets warning filters per test."""
    import subprocess
    import sys

    script = """
import warnings
import rlhf_kit
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2)
get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
warnings.warn("`is_gradient_checkpointing` is deprecated: raised elsewhere", FutureWarning)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    lines = [line for line in done.stderr.splitlines() if "is_gradient_checkpointing" in line]
    assert len(lines) == 1 and "raised elsewhere" in lines[0], done.stderr  # only transformers' own is hidden
