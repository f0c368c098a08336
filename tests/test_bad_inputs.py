"""Bad inputs and interruptions, one case each, with what the user must see: a clear early error naming the file,
row, field or key and saying what to do, or (for what is handled rather than refused) the warning and the record
entry that report it. None of them may be silent. The cases are those of issue 15's adversarial review.
"""

import pytest  # noqa: F401


# ---- Early, whole-run validation: numeric settings, oversized rows, pipeline configs, unclear messages ----------
# (items 2, 3, 8, 10)
# Imported here, not at the top, so that each section's imports stay in its own lines.
import json  # noqa: E402

import yaml  # noqa: E402
from conftest import REPO, load_recipe, read_jsonl  # noqa: E402

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


def test_every_shipped_recipe_config_is_within_bounds():
    from rlhf_kit.config import check_bounds, check_precision, load_yaml, parse_config
    from rlhf_kit.stages import RECIPE_ARGUMENTS, recipe_arguments

    for recipe in RECIPE_ARGUMENTS:
        for path in sorted((REPO / "recipes/configs" / recipe).glob("*.yaml")):
            check_bounds(load_yaml(path))
            check_precision(load_yaml(path))
            if path.name.startswith("tiny"):  # the GPU configs ask for bf16, which transformers refuses on a CPU
                parse_config(*recipe_arguments(recipe), args=["--config", str(path)])


# ---- item 3: rows far beyond max_length are refused before tokenizing; rows cut or dropped for length are counted

def _sft_rows_with_a_huge_one(tmp_path, huge_row, chars):
    rows = read_jsonl(REPO / "data/sft/train.jsonl", limit=8)
    rows[huge_row - 1]["messages"][-1]["content"] = "x" * chars
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_oversized_row_is_refused_before_tokenizing_naming_file_row_and_fix(tmp_path, monkeypatch):
    from rlhf_kit.data import DataError, check_sources, load_data, row_char_limit

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

    from rlhf_kit.data import load_data
    from rlhf_kit.lengths import count_over_length
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

    from rlhf_kit.data import load_data

    monkeypatch.chdir(REPO)
    out = tmp_path / "reward"
    with contextlib.redirect_stdout(io.StringIO()), caplog.at_level("WARNING", logger="rlhf_kit.lengths"):
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

    from rlhf_kit.data import load_data
    from rlhf_kit.lengths import count_over_length
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
            "model_name_or_path": tiny_sft, "reward_model_path": None, "reward_funcs": ["rlhf_kit.task:gold"],
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
    from rlhf_kit.data import DataError, check_sources, load_data

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
    # `outputs/x` could be a Hub id too: the message says it is neither a local directory nor a loadable Hub model.
    with pytest.raises(OSError, match="outputs/no-such-sft is not a local directory .* Hub"):
        load_tokenizer("outputs/no-such-sft")


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


# ---- Security, network and processes: secrets, telemetry, signals, read-only inputs ------------------------------
# (items 7, 9, 11, 13)
