"""Bad inputs and interruptions, one case each, with what the user must see: a clear early error naming the file,
row, field or key and saying what to do, or (for what is handled rather than refused) the warning and the record
entry that report it. None of them may be silent. The cases are those of issue 15's adversarial review.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PPO_SHORT, REPO, SFT_SHORT, TINY_SHAPE, StepRecorder, load_recipe, losses, read_jsonl
from safetensors.torch import load_file

from rlhf_kit.checkpoints import checkpoint_problem
from rlhf_kit.pipeline import PipelineConfig, run_pipeline
from rlhf_kit.runs import STAGE_FILE, resume_checkpoint


# ---- Early, whole-run validation: numeric settings, oversized rows, pipeline configs, unclear messages ----------
# (items 2, 3, 8, 10)

# Each case: the recipe whose config dataclasses parse, the command line after its tiny YAML, and what the message
# must name. parse_config is what every recipe runs first, before data or models load.
NUMERIC_CASES = [
    ("sft", ["--max_steps", "-5"], ["max_steps", "-5", "-1 to train for num_train_epochs"]),
    ("sft", ["--save_steps", "0"], ["save_steps", "fraction"]),
    ("ppo", ["--per_device_train_batch_size", "0"], ["per_device_train_batch_size", "integer >= 1"]),
    ("ppo", ["--global_batch_size", "0"], ["global_batch_size", "integer >= 1"]),
    ("sft", ["--lora_r", "0"], ["lora_r", "integer >= 1"]),
    ("sft", ["--max_length", "0"], ["max_length", "integer >= 1"]),
    ("reward", ["--max_length", "0"], ["max_length", "integer >= 1"]),
    ("sft", ["--learning_rate", "-1e-3"], ["learning_rate", "-0.001", "> 0"]),  # a negative number is a value
    ("dpo", ["--learning_rate=-1e-3"], ["learning_rate", "-0.001"]),
    ("ppo", ["--kl_coef", "-1"], ["kl_coef", ">= 0"]),
    ("ppo", ["--temperature", "-0.5"], ["temperature", "> 0"]),
    ("ppo", ["--min_reward_accuracy", "1.5"], ["min_reward_accuracy", "[0, 1]"]),
    ("grpo", ["--lora_dropout", "1"], ["lora_dropout", "[0, 1)"]),
    ("reward", ["--seed", "-1"], ["seed", "numpy"]),
    ("sft", ["--num_train_epochs", "nan"], ["num_train_epochs", "> 0"]),
    ("sft", ["--bf16", "true", "--dtype", "float16"], ["bf16", "float16", "bfloat16"]),
    ("dpo", ["--fp16", "true", "--dtype", "bfloat16"], ["fp16", "bfloat16"]),
]


@pytest.mark.parametrize("recipe,argv,fragments", NUMERIC_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_numeric_setting_out_of_range_is_refused_by_key(recipe, argv, fragments):
    from rlhf_kit.config import ConfigError, parse_config
    from rlhf_kit.stages import recipe_arguments

    with pytest.raises(ConfigError) as error:
        parse_config(*recipe_arguments(recipe), args=["--config", f"{REPO}/recipes/configs/{recipe}/tiny.yaml", *argv])
    for fragment in fragments:
        assert fragment in str(error.value)


def test_numeric_bounds_apply_to_yaml_values_and_keep_meaningful_negatives(tmp_path):
    from rlhf_kit.config import ConfigError, load_yaml, parse_config
    from rlhf_kit.stages import recipe_arguments

    config = load_yaml(REPO / "recipes/configs/sft/tiny.yaml")
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({**config, "save_steps": 0}))
    with pytest.raises(ConfigError, match="'save_steps' is 0"):
        parse_config(*recipe_arguments("sft"), args=["--config", str(path)])
    # -1 is transformers' "unset" for max_steps: train for num_train_epochs.
    *_, args = parse_config(*recipe_arguments("sft"), args=["--config", str(path), "--save_steps", "0.5",
                                                            "--max_steps", "-1"])
    assert args.max_steps == -1 and args.save_steps == 0.5


def test_recipe_refuses_a_bad_number_before_loading_data_or_model():
    from rlhf_kit.config import ConfigError

    # The model path does not exist and the data would take seconds: the number is refused first.
    with pytest.raises(ConfigError, match="max_steps"):
        load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml", "--max_steps", "-5",
                            "--model_name_or_path", "./no/such/model"])


# ---- item 3: rows far beyond max_length are refused before tokenizing; rows cut or dropped for length are counted

def _sft_rows_with_a_huge_one(tmp_path, huge_row, chars):
    rows = read_jsonl(REPO / "data/sft/train.jsonl", limit=8)
    rows[huge_row - 1]["messages"][-1]["content"] = "x" * chars
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_oversized_row_is_refused_before_tokenizing_naming_file_row_and_fix(tmp_path, monkeypatch):
    from rlhf_kit.data.loading import DataError, check_sources, load_data, row_char_limit

    monkeypatch.chdir(REPO)
    path = _sft_rows_with_a_huge_one(tmp_path, huge_row=5, chars=1_000_000)
    for read in (lambda: load_data(str(path), kind="sft", max_chars=row_char_limit(128)),
                 lambda: check_sources(str(path), kind="sft", max_chars=row_char_limit(128))):
        with pytest.raises(DataError) as error:
            read()
        message = str(error.value)
        for fragment in (str(path), "row 5", "'messages'", "1,000", "max_length"):
            assert fragment in message
    # The recipe refuses it from its max_length (128 in the tiny SFT config), before the (missing) model loads.
    with pytest.raises(DataError, match="row 5"):
        load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml", "--dataset_name", str(path),
                            "--eval_strategy", "no", "--model_name_or_path", "./no/such/model"])
    # A row within the limit loads: the limit is far above what max_length tokens hold.
    assert len(load_data(str(path), kind="sft", max_chars=row_char_limit(100_000))) == 8


def test_sft_truncation_count_matches_what_the_trainer_tokenizes(tiny_sft, tmp_path, monkeypatch):
    """The per-file count of rows SFT truncates, against the lengths TRL's SFTTrainer itself tokenizes (with no
    max_length, so nothing is cut), and in the stage record and summary."""
    import contextlib
    import io

    from trl import SFTConfig, SFTTrainer

    from rlhf_kit.data.loading import load_data
    from rlhf_kit.data.lengths import count_over_length
    from rlhf_kit.model import load_tokenizer

    monkeypatch.chdir(REPO)
    tokenizer = load_tokenizer(tiny_sft)
    data = load_data("data/sft", kind="sft")
    uncut = SFTTrainer(model=tiny_sft, processing_class=tokenizer, train_dataset=data,
                       args=SFTConfig(output_dir=str(tmp_path / "uncut"), max_length=None, report_to="none",
                                      bf16=False, use_cpu=True))
    lengths = [len(ids) for ids in uncut.train_dataset["input_ids"]]
    max_length = sorted(lengths)[len(lengths) // 2]  # about half the rows are longer
    expected = sum(n > max_length for n in lengths)
    assert 0 < expected < len(lengths)
    assert count_over_length("data/sft", "sft", "train", tokenizer, max_length) == {
        "data/sft/train.jsonl": (len(lengths), expected)}

    out = tmp_path / "sft"
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml"], overrides={
            "model_name_or_path": tiny_sft, "output_dir": str(out), "use_peft": False, "max_steps": 1,
            "max_length": max_length, "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True})
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    assert record["metrics"]["truncated_rows/data/sft/train.jsonl"] == expected
    assert f"truncated_rows/data/sft/train.jsonl  {expected}" in summary.getvalue()


def test_reward_drop_count_matches_the_pairs_the_trainer_drops(tiny_sft, tmp_path, monkeypatch, caplog):
    import contextlib
    import io

    from rlhf_kit.data.loading import load_data

    monkeypatch.chdir(REPO)
    out = tmp_path / "reward"
    with contextlib.redirect_stdout(io.StringIO()), caplog.at_level("WARNING", logger="rlhf_kit.data.lengths"):
        trainer = load_recipe("reward")(["--config", "recipes/configs/reward/tiny.yaml"], overrides={
            "model_name_or_path": tiny_sft, "output_dir": str(out), "max_steps": 1, "max_length": 40,
            "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "disable_tqdm": True})
    dropped = len(load_data("data/preference", kind="preference")) - len(trainer.train_dataset)
    assert dropped > 0
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    assert record["metrics"]["dropped_rows/data/preference/train.jsonl"] == dropped
    assert f"data/preference/train.jsonl: {dropped} of" in caplog.text and "dropped by the trainer" in caplog.text


def test_ppo_drop_count_matches_the_prompts_the_trainer_drops(tiny_sft, tmp_path, monkeypatch, single_thread):
    import contextlib
    import io

    from rlhf_kit.data.loading import load_data
    from rlhf_kit.data.lengths import count_over_length
    from rlhf_kit.model import load_tokenizer

    monkeypatch.chdir(REPO)
    tokenizer = load_tokenizer(tiny_sft)
    lengths = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                   ["input_ids"]) for p in load_data("data/prompts", kind="prompt")["prompt"]]
    limit = sorted(lengths)[len(lengths) * 3 // 4]  # about a quarter of the prompts are longer
    assert count_over_length("data/prompts", "prompt", "train", tokenizer, limit)["data/prompts/train.jsonl"][1] > 0
    out = tmp_path / "ppo"
    with contextlib.redirect_stdout(io.StringIO()), pytest.warns(UserWarning, match="prompts longer than"):
        trainer = load_recipe("ppo")(["--config", "recipes/configs/ppo/tiny.yaml"], overrides={
            "model_name_or_path": tiny_sft, "reward_model_path": None, "reward_funcs": ["rlhf_kit.tasks.review:gold"],
            "output_dir": str(out), "max_steps": 1, "max_prompt_length": limit, "per_device_train_batch_size": 4,
            "num_mini_batches": 1, "num_ppo_epochs": 1, "eval_on_start": False, "eval_strategy": "no",
            "save_strategy": "no"})
    dropped = len(lengths) - len(trainer.train_dataset)
    assert dropped > 0
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    assert record["metrics"]["dropped_rows/data/prompts/train.jsonl"] == dropped


# ---- item 10: messages that name the file, line and byte, the missing path, the expected shape

def _latin1_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "plain ascii"}, {"text": "caf\u00e9"}]
    path.write_bytes(b"\n".join(json.dumps(r, ensure_ascii=False).encode("latin-1") for r in rows) + b"\n")
    return path


def test_non_utf8_data_names_file_line_and_byte(tmp_path):
    from rlhf_kit.data.loading import DataError, check_sources, load_data

    path = _latin1_jsonl(tmp_path)
    for read in (lambda: load_data(str(path), kind="text"), lambda: check_sources(str(path), kind="text")):
        with pytest.raises(DataError) as error:
            read()
        message = str(error.value)
        assert str(path) in message and "line 2" in message and "0xe9" in message and "UTF-8" in message


def test_missing_local_model_path_says_it_does_not_exist(tmp_path):
    from rlhf_kit.model import ModelArguments, load_model, load_tokenizer
    from rlhf_kit.rewards import RewardModel, gate

    missing = str(tmp_path / "no-such-sft")
    for load in (lambda: load_tokenizer(missing), lambda: load_model(ModelArguments(model_name_or_path=missing), None),
                 lambda: load_tokenizer("./outputs/no-such-sft")):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load()
    with pytest.raises(FileNotFoundError, match=r"reward_model_path: .*no-such-rm does not exist"):
        gate(str(tmp_path / "no-such-rm"), None)
    with pytest.raises(FileNotFoundError, match="no-such-rm does not exist"):
        RewardModel.from_pretrained(str(tmp_path / "no-such-rm"))


def test_an_adapter_whose_relative_base_is_not_found_from_here_says_so(tiny_base, tmp_path, monkeypatch, capsys):
    """The main job's adapters name their base as the stage was given it, `outputs/tiny/pretrain`: relative to the
    directory they were trained in. From anywhere else transformers read that as a Hub id and failed with "Repo id
    must be in the form 'repo_name' or 'namespace/repo_name'"; the command now says which file names which path,
    and loads the adapter from the directory it was trained in."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_kit.cli import main as cli
    from rlhf_kit.errors import DEBUG_ENV

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    trained_in = tmp_path / "project"
    (trained_in / "outputs/tiny").mkdir(parents=True)
    (trained_in / "outputs/tiny/pretrain").symlink_to(tiny_base)
    adapter = trained_in / "outputs/tiny/sft"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "outputs/tiny/pretrain"}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Review the tea."}) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["generate", str(adapter), "--prompts", str(prompts), "--output", str(tmp_path / "out.jsonl"),
            "--max_new_tokens", "4"]
    capsys.readouterr()  # the setup's own loading bars
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("rlhf-kit generate: "), err
    assert (f"{adapter}/adapter_config.json names its base model by the relative path outputs/tiny/pretrain, which "
            f"does not exist from the working directory {elsewhere}") in err, err
    monkeypatch.chdir(trained_in)
    assert cli(argv) == 0 and len(read_jsonl(tmp_path / "out.jsonl")) == 1


def test_a_hub_shaped_path_under_a_local_directory_is_refused_as_a_path_before_any_hub_lookup(tmp_path, monkeypatch):
    """`outputs/sfr` next to an `outputs/` directory is a mistyped path: looked up on the Hub it cost 58 s of
    connection retries on an offline machine before the error. Without such a directory it is still a Hub id, and
    the message says it is neither a local directory nor a loadable Hub model."""
    import transformers

    from rlhf_kit.data.errors import DataError
    from rlhf_kit.data.loading import load_data
    from rlhf_kit.model import load_tokenizer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="outputs/no-such-sft is not a local directory .* Hub"):
        load_tokenizer("outputs/no-such-sft")

    (tmp_path / "outputs").mkdir()
    (tmp_path / "data").mkdir()

    def looked_up(*args, **kwargs):
        raise AssertionError(f"looked up {args[0]} on the Hub")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", looked_up)
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer("outputs/no-such-sft")
    assert "outputs/no-such-sft does not exist" in str(error.value)
    assert "read as a path because outputs/ is a directory here" in str(error.value)
    with pytest.raises(DataError, match="data/no-such-set: file or directory not found"):
        load_data("data/no-such-set", kind="text")


@pytest.mark.parametrize("values,fragments", [
    ({"stages": ["sft"]}, ["stages must be a mapping of stage name to its recipe config file", "sft: recipes/"]),
    ({"stages": {"sft": "recipes/configs/sft/tiny.yaml"}, "overrides": {"sft": ["max_steps", 3]}},
     ["overrides must be a mapping", "learning_rate"]),
    ({"stages": {}, "evaluation": ["num_prompts"]}, ["evaluation must be a mapping"]),
])
def test_pipeline_config_of_the_wrong_shape_says_what_is_expected(tmp_path, monkeypatch, values, fragments):
    from rlhf_kit.config import ConfigError
    from rlhf_kit.pipeline import PipelineConfig

    monkeypatch.chdir(REPO)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError) as error:
        PipelineConfig.from_yaml(path)
    for fragment in [str(path), *fragments]:
        assert fragment in str(error.value)


# ---- item 8: the pipeline checks every stage before the first one runs

def _preference_file(tmp_path, bad_row):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
    rows[bad_row - 1]["rejected"] = "good"
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PIPELINE_CASES = [
    # a typo in the last stage's overrides
    (lambda tmp: {"overrides": {"ppo": {"kl_coeff": 0.1}}}, ["stage 'ppo'", "kl_coeff", "Did you mean 'kl_coef'"]),
    # an out-of-range number in the last stage
    (lambda tmp: {"overrides": {"ppo": {"max_steps": -5}}}, ["stage 'ppo'", "max_steps", "-5"]),
    # a typo in the last stage's YAML file
    (lambda tmp: {"stages": {"ppo": _yaml_with(tmp, "ppo", learning_rte=1e-5)}},
     ["stage 'ppo'", "learning_rte", "Did you mean 'learning_rate'"]),
    # a bad row in the reward stage's data, behind SFT
    (lambda tmp: {"overrides": {"reward": {"dataset_name": str(_preference_file(tmp, bad_row=3))}}},
     ["stage 'reward'", "pairs.jsonl", "row 3", "identical"]),
    # a data file that does not exist
    (lambda tmp: {"overrides": {"reward": {"dataset_name": str(tmp / "missing.jsonl")}}},
     ["stage 'reward'", "missing.jsonl", "not found"]),
    # a reward model that neither exists nor is produced by an earlier stage
    (lambda tmp: {"stages": {"reward": None}, "overrides": {"ppo": {"reward_model_path": str(tmp / "rm")}}},
     ["stage 'ppo'", "reward_model_path", "does not exist", "no earlier stage"]),
    # a contradiction between two settings of the last stage
    (lambda tmp: {"overrides": {"ppo": {"bf16": True, "dtype": "float16"}}}, ["stage 'ppo'", "half precisions"]),
    # evaluation prompts that cannot be read
    (lambda tmp: {"evaluation": {"prompts": str(tmp / "nope")}}, ["evaluation prompts", "nope", "not found"]),
]


def _yaml_with(tmp_path, recipe, **extra):
    from rlhf_kit.config import load_yaml

    path = tmp_path / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump({**load_yaml(REPO / f"recipes/configs/{recipe}/tiny.yaml"), **extra}))
    return str(path)


def _tiny_pipeline(tmp_path, change):
    from rlhf_kit.pipeline import PipelineConfig

    stages = {s: f"recipes/configs/{s}/tiny.yaml" for s in ("pretrain", "sft", "reward", "ppo")}
    stages.update(change.get("stages", {}))
    return PipelineConfig(output_dir=str(tmp_path / "out"), stages={k: v for k, v in stages.items() if v},
                          overrides=change.get("overrides", {}), evaluation=change.get("evaluation", {}))


@pytest.mark.parametrize("change,fragments", PIPELINE_CASES)
def test_pipeline_refuses_a_bad_later_stage_before_the_first_stage_runs(tmp_path, monkeypatch, change, fragments):
    from rlhf_kit.config import ConfigError
    from rlhf_kit.pipeline import run_pipeline

    monkeypatch.chdir(REPO)
    config = _tiny_pipeline(tmp_path, change(tmp_path))
    ran = []
    with pytest.raises(ConfigError) as error:
        run_pipeline(config, run=lambda cmd: ran.append(cmd) or 0)
    assert ran == []
    for fragment in fragments:
        assert fragment in str(error.value)


def test_pipeline_check_accepts_inputs_that_earlier_stages_produce(tmp_path, monkeypatch):
    from rlhf_kit.pipeline import PipelineConfig, check_pipeline

    monkeypatch.chdir(REPO)
    # Every recipe of the pipeline; sft, reward and best_of_n outputs feed the later stages (rft's data included).
    stages = {s: f"recipes/configs/{s}/tiny.yaml" for s in ("pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo",
                                                              "best_of_n")}
    config = PipelineConfig(output_dir=str(tmp_path / "absent"), stages={**stages,
                            "rft": "recipes/configs/sft/rft-tiny.yaml"}, evaluation={"num_prompts": 10})
    check_pipeline(config)


def test_cli_pipeline_config_error_is_one_message_without_traceback(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": ["sft"]}))
    done = subprocess.run([sys.executable, "-m", "rlhf_kit.cli", "pipeline", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    # (bitsandbytes may print a line about optional kernels on import; the kit's message is one line of its own)
    [message] = [line for line in done.stderr.splitlines() if line.startswith("rlhf-kit pipeline: ")]
    assert str(path) in message and "stages must be a mapping" in message


def test_cli_pipeline_refuses_a_later_stage_typo_in_process(tmp_path, monkeypatch, capsys):
    from rlhf_kit import cli

    monkeypatch.chdir(REPO)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": {
        "sft": "recipes/configs/sft/tiny.yaml", "ppo": "recipes/configs/ppo/tiny.yaml"},
        "overrides": {"ppo": {"learning_rate": -1e-5}}}))
    assert cli.main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stage 'ppo'" in err and "learning_rate" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing ran


# ---- Half-written outputs and interrupted runs: --force, resumed records, partial checkpoints, stage records -----
# (items 1, 4, 5, 6)


SFT_TINY = str(REPO / "recipes/configs/sft/tiny.yaml")
def _sft(tiny_base, out, callbacks=None, **overrides):
    return load_recipe("sft")(["--config", SFT_TINY], callbacks=callbacks, overrides={
        "model_name_or_path": tiny_base, "output_dir": str(out), **SFT_SHORT, **overrides})


def _record(out):
    return json.loads((out / STAGE_FILE).read_text())


def _cut(ckpt, how):
    """Leave `ckpt` as a save cut off part-way (a kill, a full disk) would."""
    if how == "no trainer state":  # killed before the last file
        (ckpt / "trainer_state.json").unlink()
    elif how == "truncated trainer state":
        state = ckpt / "trainer_state.json"
        state.write_text(state.read_text()[:40])
    else:  # a weights, optimizer or RNG file cut short, trainer_state.json written
        file = ckpt / how
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


CUTS = ["no trainer state", "truncated trainer state", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth"]


@pytest.mark.parametrize("how", CUTS)
def test_a_cut_off_checkpoint_is_named_incomplete_and_skipped(sft_straight, tmp_path, how):
    for step in (2, 4):
        shutil.copytree(sft_straight / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    assert checkpoint_problem(tmp_path / "checkpoint-4") is None
    _cut(tmp_path / "checkpoint-4", how)
    assert checkpoint_problem(tmp_path / "checkpoint-4")  # a reason, not None
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*checkpoint-4: .*newest complete checkpoint"):
        assert resume_checkpoint(str(tmp_path), None) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match=r"checkpoint-4 is incomplete: .*earlier checkpoint"):
        resume_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path / "checkpoint-4"))


def test_sft_resumes_past_a_cut_off_checkpoint_and_matches_the_uninterrupted_run(tiny_base, sft_straight, tmp_path):
    out = tmp_path / "resumed"
    for step in (2, 4):
        shutil.copytree(sft_straight / f"checkpoint-{step}", out / f"checkpoint-{step}")
    _cut(out / "checkpoint-4", "adapter_model.safetensors")
    steps = StepRecorder()
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*checkpoint-4"):
        resumed = _sft(tiny_base, out, callbacks=[steps])
    assert steps.steps == [3, 4, 5, 6]  # from checkpoint-2
    assert losses(resumed.state.log_history) == pytest.approx(losses(_history(sft_straight)), rel=1e-4)
    torch.testing.assert_close(load_file(out / "adapter_model.safetensors"),
                               load_file(sft_straight / "adapter_model.safetensors"))
    # Item 4: the record's train_loss is the whole run's, as in the uninterrupted run.
    assert _record(out)["metrics"]["train_loss"] == pytest.approx(_record(sft_straight)["metrics"]["train_loss"],
                                                                  rel=1e-4)


def test_sft_full_disk_names_the_checkpoint_and_the_rerun_resumes_past_it(tiny_base, sft_straight, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "sft"
    monkeypatch.setattr(torch, "save", _disk_full_at("checkpoint-4/optimizer.pt"))
    with pytest.raises(OSError, match=r"No space left .*checkpoint-4: it needs about [\d.,]+ MiB and .* free"):
        _sft(tiny_base, out)
    monkeypatch.undo()
    assert checkpoint_problem(out / "checkpoint-4")  # the weights were written, the optimizer and the state not
    steps = StepRecorder()
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*checkpoint-4: no trainer_state.json"):
        _sft(tiny_base, out, callbacks=[steps])  # the same command again, with space
    assert steps.steps == [3, 4, 5, 6] and checkpoint_problem(out / "checkpoint-4") is None
    torch.testing.assert_close(load_file(out / "adapter_model.safetensors"),
                               load_file(sft_straight / "adapter_model.safetensors"))


def _disk_full_at(suffix):
    """torch.save that fails as a full disk does when it writes a file ending in `suffix`."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    return save


def _history(out):
    return json.loads((out / "checkpoint-6/trainer_state.json").read_text())["log_history"]


def test_ppo_full_disk_names_the_checkpoint_and_the_rerun_resumes_and_matches(tiny_sft, tiny_reward, ppo_straight,
                                                                              tmp_path, monkeypatch):
    ppo = load_recipe("ppo")

    def run(out):
        return ppo(["--config", str(REPO / "recipes/configs/ppo/tiny.yaml")], overrides={
            **PPO_SHORT, "model_name_or_path": tiny_sft, "reward_model_path": tiny_reward, "output_dir": str(out)})

    out = tmp_path / "resumed"
    monkeypatch.setattr(torch, "save", _disk_full_at("checkpoint-4/optimizer.pt"))
    with pytest.raises(OSError, match=r"No space left .*checkpoint-4: it needs about [\d.,]+ MiB and .* free"):
        run(out)
    monkeypatch.undo()
    # The half-written checkpoint never took the name a resume looks for.
    assert checkpoint_problem(out / "checkpoint-2") is None and not (out / "checkpoint-4").exists()
    assert (out / "tmp-checkpoint-4").is_dir()

    run(out)  # the same command again, with space: from checkpoint-2
    assert not (out / "tmp-checkpoint-4").exists() and checkpoint_problem(out / "checkpoint-4") is None
    torch.testing.assert_close(load_file(out / "adapter_model.safetensors"),
                               load_file(ppo_straight / "adapter_model.safetensors"))
    assert _record(out)["metrics"]["train_loss"] == pytest.approx(
        _record(ppo_straight)["metrics"]["train_loss"], rel=1e-4)


def test_a_truncated_stage_record_is_named_and_the_stage_reruns(tmp_path):
    config = PipelineConfig(output_dir=str(tmp_path), stages={"sft": SFT_TINY})
    config.stage_dir("sft").mkdir()
    (config.stage_dir("sft") / STAGE_FILE).write_text('{"stage": "sft", "compl')  # a write cut off
    ran = []
    with pytest.warns(UserWarning, match=rf"{STAGE_FILE} is truncated or corrupt .*treating the stage as unfinished"):
        status = run_pipeline(config, run=lambda cmd, env: ran.append(cmd) or 0)
    assert status == {"sft": "ran"} and len(ran) == 1


def test_pipeline_force_trains_the_stage_from_scratch_and_the_record_matches(tiny_base, tmp_path):
    def config(learning_rate):
        return PipelineConfig(output_dir=str(tmp_path), accelerate_config=str(REPO / "accelerate_config.yaml"),
                              stages={"sft": SFT_TINY}, overrides={"sft": {
                                  **SFT_SHORT, "save_total_limit": 2, "model_name_or_path": tiny_base, "max_steps": 4,
                                  "learning_rate": learning_rate}})

    sft = tmp_path / "sft"
    run_pipeline(config(1e-3), run=lambda cmd, env: subprocess.call(cmd, cwd=REPO, env=env))
    before = load_file(sft / "adapter_model.safetensors")

    def run_from_scratch(cmd, env):  # what the forced stage starts from: nothing of the previous run
        assert not sft.exists()
        return subprocess.call(cmd, cwd=REPO, env=env)

    log = []
    assert run_pipeline(config(3e-3), force=True, log=log.append, run=run_from_scratch) == {"sft": "ran"}
    assert any("--force: removing the previous output" in line for line in log)
    history = json.loads((sft / "checkpoint-4/trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    assert {e["learning_rate"] for e in history if "loss" in e} == {3e-3}  # trained at the new rate
    after = load_file(sft / "adapter_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    record = _record(sft)
    assert record["config"]["learning_rate"] == 3e-3 and record["metrics"]["train_loss"] > 0


# ---- Security, network and processes: secrets, telemetry, signals, read-only inputs ------------------------------
# (items 7, 9, 11, 13)


def _children_of(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]  # the fields after "(command name)"
        if state != "Z":
            parents[int(entry)] = int(ppid)
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_pipeline_stops_its_running_stage(tmp_path, signum):
    """Item 9: the stage (accelerate's launcher and the training process under it) goes down with the pipeline,
    which says it stopped and exits non-zero; before, the stage went on training in the background."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "stages": {"pretrain": "recipes/configs/pretrain/tiny.yaml"},
        "overrides": {"pretrain": {**TINY_SHAPE, "max_steps": 100000, "eval_strategy": "no", "save_strategy": "no"}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # a file, not a pipe: an orphaned stage would hold a pipe open
        pipeline = subprocess.Popen([sys.executable, "-m", "rlhf_kit.cli", "pipeline", str(config)], cwd=REPO,
                                    env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    stage = []
    try:
        # Starting is two interpreters importing torch (the launcher, the recipe): seconds, but over a minute on a
        # loaded 2-core runner (seen with the suite's two workers). The limit only stops a hang; this suite's other
        # subprocess limits are 300 s too.
        deadline = time.monotonic() + 300
        while len(stage) < 2 and time.monotonic() < deadline:  # the launcher, then the training process it starts
            time.sleep(0.2)
            stage = _children_of(pipeline.pid)
        assert len(stage) >= 2, "the stage never started"
        pipeline.send_signal(signum)
        pipeline.wait(timeout=30)
        gone_by = time.monotonic() + 10
        while any(map(_alive, stage)) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not [pid for pid in stage if _alive(pid)], "the stage outlived the pipeline"
        assert pipeline.returncode == 128 + signum
        err = log.read_text()
        assert f"stopped by {signal.Signals(signum).name}" in err and "again to resume" in err
        assert "Traceback" not in err.split("stopped by")[-1]
    finally:
        for pid in [pipeline.pid, *stage]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


PLANTED = "hf_PLANTEDsecret123"
# Put first on PYTHONPATH as `sitecustomize`, so every process of a run (launcher, recipe, threads) records each
# connection attempt and DNS lookup it makes, and is refused: nothing leaves the machine even when a test fails.
NETWORK_GUARD = '''
import os, socket, traceback

def _refuse(what):
    with open(os.environ["NETWORK_LOG"], "a") as f:
        f.write(f"{what}\\n{''.join(traceback.format_stack(limit=25))}\\n")
    raise OSError(f"network refused by the test: {what}")

def _connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(f"connect {address}")
    return _unguarded_connect(self, address)

_unguarded_connect = socket.socket.connect
socket.socket.connect = _connect
socket.getaddrinfo = lambda host, *args, **kwargs: _refuse(f"getaddrinfo {host}")
'''


@pytest.fixture(scope="module")
def guarded_pipeline(tmp_path_factory):
    """The real `rlhf-kit pipeline` through every stage (shrunk to a few steps, each saving checkpoints), with a
    planted Hub token (as pipeline overrides, and in the SFT stage's own YAML) and offline mode NOT set, every
    connection attempt recorded and refused. Returns the run's directory, its captured log and its network log."""
    root = tmp_path_factory.mktemp("guarded")
    (root / "guard").mkdir()
    (root / "guard" / "sitecustomize.py").write_text(NETWORK_GUARD)
    sft_yaml = root / "sft.yaml"
    sft_yaml.write_text((REPO / "recipes/configs/sft/tiny.yaml").read_text() + f"hub_token: {PLANTED}\n")
    quick = {"eval_strategy": "no", "save_strategy": "steps", "disable_tqdm": True, "report_to": "none"}
    config = {
        "output_dir": str(root / "out"),
        "stages": {"pretrain": "recipes/configs/pretrain/tiny.yaml", "sft": str(sft_yaml),
                   "reward": "recipes/configs/reward/tiny.yaml", "ppo": "recipes/configs/ppo/tiny.yaml"},
        "overrides": {
            "pretrain": {**quick, **TINY_SHAPE, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 8,
                         "hub_token": PLANTED},
            "sft": {**quick, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 8, "max_length": 64},
            "reward": {**quick, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 8, "max_length": 64,
                       "reference_pairs": 16, "hub_token": PLANTED},
            "ppo": {**quick, "max_steps": 2, "save_steps": 1, "eval_on_start": False, "per_device_train_batch_size": 4,
                    "response_length": 8, "allow_weak_reward_model": True, "hub_token": PLANTED},
        },
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in offline}
    env.update(PYTHONPATH=f"{root / 'guard'}:{REPO}", NETWORK_LOG=str(root / "network.log"), HF_HOME=str(root / "hf"),
               RLHF_KIT_CACHE=str(root / "cache"))
    with open(root / "pipeline.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "rlhf_kit.cli", "pipeline", str(root / "pipeline.yaml")],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    assert code == 0, (root / "pipeline.log").read_text()[-3000:]
    return root


def test_planted_token_reaches_no_file_checkpoint_or_log(guarded_pipeline):
    """Item 11: not in any stage output, checkpoint (training_args.bin is a pickle: searched as bytes), cache or the
    pipeline's log; before, every checkpoint-*/training_args.bin held it and the log printed it."""
    root = guarded_pipeline
    checkpoints = list((root / "out").glob("*/checkpoint-*"))
    assert {c.parent.name for c in checkpoints} == {"pretrain", "sft", "reward", "ppo"}
    assert (root / "cache" / "rlhf_kit_merged").is_dir()  # the merged SFT model is searched too
    inputs = {root / "pipeline.yaml", root / "sft.yaml"}  # where the user wrote it
    leaks = [str(f.relative_to(root)) for f in root.rglob("*")
             if f.is_file() and f not in inputs and PLANTED.encode() in f.read_bytes()]
    assert leaks == []
    assert "hub_token is ignored and kept out of every saved file" in (root / "pipeline.log").read_text()


def test_run_on_local_files_makes_no_network_call(guarded_pipeline):
    """Item 13: with every model and data set local and offline mode unset, no process of the run opens a
    connection; before, datasets' download count and TRL's telemetry reached for the Hub."""
    log = guarded_pipeline / "network.log"
    assert not log.exists(), log.read_text()[:3000]


def _bitsandbytes_fetches_hub_kernels() -> bool:
    """bitsandbytes asks the Hub for its CPU kernel at import only with `kernels` installed, on AVX512-BF16 CPUs."""
    import importlib.util
    if importlib.util.find_spec("kernels") is None or importlib.util.find_spec("bitsandbytes") is None:
        return False
    from bitsandbytes.functional import has_avx512bf16
    return bool(has_avx512bf16())


@pytest.mark.skipif(not _bitsandbytes_fetches_hub_kernels(), reason="bitsandbytes fetches no Hub kernel here")
def test_importing_the_stack_after_rlhf_kit_opens_no_connection_and_prints_nothing(tmp_path):
    """transformers 5.25 imports bitsandbytes, which fetched kernels-community/quantization-bitsandbytes from the Hub
    at import (a publisher check, then a download of compiled code) and printed two warnings; after `import
    rlhf_kit` nothing reaches the network or the console, and the Hub setting is left as the user had it."""
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(NETWORK_GUARD)
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
    env = {k: v for k, v in os.environ.items() if k not in offline}
    env.update(PYTHONPATH=f"{tmp_path / 'guard'}:{REPO}", NETWORK_LOG=str(tmp_path / "network.log"),
               HF_HOME=str(tmp_path / "hf"))
    script = ("import sys, rlhf_kit, transformers, peft\n"
              "from huggingface_hub import constants\n"
              "assert 'bitsandbytes' in sys.modules\n"
              "print('offline', constants.HF_HUB_OFFLINE)")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "network.log").exists(), (tmp_path / "network.log").read_text()[:2000]
    assert done.stdout.strip() == "offline False" and done.stderr == ""


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(directory)): (f.stat().st_size, f.stat().st_mtime_ns) for f in directory.rglob("*")}


def test_read_only_sft_adapter_feeds_the_reward_stage(tiny_base, tmp_path, monkeypatch):
    """Item 7: the merged SFT model is cached in the cache directory ($RLHF_KIT_CACHE), nothing is written inside the
    input directory, and the reward adapter's recorded base names the SFT adapter it derives from; before, the
    reward stage wrote `<sft>/merged` and failed on a read-only SFT directory (root ignores the mode bits, so the
    test checks that the directory is left exactly as it was)."""
    import contextlib
    import io

    from conftest import load_recipe

    from rlhf_kit.model import merged_source

    sft, cache = tmp_path / "sft", tmp_path / "cache"
    monkeypatch.setenv("RLHF_KIT_CACHE", str(cache))
    quick = {"eval_strategy": "no", "save_strategy": "no", "disable_tqdm": True, "max_length": 64,
             "per_device_train_batch_size": 8, "report_to": "none"}
    with contextlib.redirect_stdout(io.StringIO()):
        load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml"],
                           overrides={**quick, "model_name_or_path": tiny_base, "output_dir": str(sft), "max_steps": 2})
    before = _snapshot(sft)
    for path in [sft, *sft.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            load_recipe("reward")(["--config", "recipes/configs/reward/tiny.yaml"], overrides={
                **quick, "model_name_or_path": str(sft), "output_dir": str(tmp_path / "reward"), "max_steps": 2,
                "reference_pairs": 16, "use_peft": True})
    finally:
        for path in [sft, *sft.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert _snapshot(sft) == before
    base = json.loads((tmp_path / "reward" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_relative_to(cache) and Path(base).is_dir()
    assert merged_source(base) == sft.resolve()


class _RunsCode:
    """Pickled, it calls os.mkdir(path) when loaded: what a crafted checkpoint file could do with any code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_crafted_ppo_checkpoint_cannot_run_code_on_resume(tiny_sft, tiny_reward, ppo_straight, tmp_path):
    """Item 12: PPO's resume reads its RNG state (and optimizer, scheduler) with weights_only=True, so a pickle that
    runs code is refused instead of run."""
    out = tmp_path / "ppo"
    shutil.copytree(ppo_straight / "checkpoint-2", out / "checkpoint-2")
    marker = tmp_path / "code-ran"
    torch.save({"torch": _RunsCode(marker)}, out / "checkpoint-2/rng_state_0.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_recipe("ppo")(["--config", str(REPO / "recipes/configs/ppo/tiny.yaml")], overrides={
            **PPO_SHORT, "model_name_or_path": tiny_sft, "reward_model_path": tiny_reward, "output_dir": str(out)})
    assert not marker.exists()
