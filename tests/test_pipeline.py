"""The one-command pipeline, shortened: every stage through its recipe, resume at stage level, and the report."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_SHAPE

from rlhf_kit.config import ConfigError
from rlhf_kit.pipeline import PipelineConfig, printable, report, run_pipeline, stage_command, stage_secrets
from rlhf_kit.rewards import EVAL_FILE

SHORT = {
    "pretrain": {**TINY_SHAPE, "vocab_size": 2048, "max_steps": 100, "per_device_train_batch_size": 16, "eval_strategy": "no",
                 "save_strategy": "no", "disable_tqdm": True},
    "sft": {"max_steps": 150, "use_peft": False, "learning_rate": 1e-3, "eval_strategy": "no", "save_strategy": "no",
            "disable_tqdm": True},
    "reward": {"max_steps": 80, "eval_strategy": "no", "save_strategy": "no", "disable_tqdm": True},
    "ppo": {"max_steps": 8, "learning_rate": 1e-3, "eval_on_start": False, "eval_strategy": "no", "save_strategy": "no"},
}
STAGES = {stage: f"recipes/configs/{stage}/tiny.yaml" for stage in SHORT}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The shortened pipeline, each stage launched as `rlhf-kit pipeline` launches it; returns its config, the
    stages' status and the folder holding each stage process's output (<recipe>.log)."""
    out, logs = tmp_path_factory.mktemp("pipeline"), tmp_path_factory.mktemp("pipeline-logs")
    config = PipelineConfig(
        output_dir=str(out),
        stages=STAGES,
        overrides=SHORT,
        evaluation={"num_prompts": 40, "max_new_tokens": 24, "temperature": 0.7, "task": "rlhf_kit.tasks.review"},
    )
    status = run_pipeline(config, run=_launch_logged(REPO, logs))
    return config, status, logs


def _launch_logged(cwd, logs):
    """Runs a stage's command with its output in logs/<recipe>.log, printed (for pytest to show) if the stage fails."""
    import subprocess

    def run(cmd, env):
        log = logs / f"{Path(cmd[cmd.index('--config') - 1]).stem}.log"
        with log.open("w") as f:
            code = subprocess.call(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if code:
            print(log.read_text()[-5000:])
        return code

    return run


def test_stages_hand_outputs_forward(tmp_path):
    config = PipelineConfig(output_dir=str(tmp_path), stages={
        "pretrain": "recipes/configs/pretrain/tiny.yaml", "sft": "recipes/configs/sft/tiny.yaml"},
        overrides={"sft": {"lora_target_modules": ["q_proj", "v_proj"]}})
    cmd = stage_command(config, "sft")
    assert cmd[cmd.index("--model_name_or_path") + 1] == str(tmp_path / "pretrain")
    assert cmd[cmd.index("--output_dir") + 1] == str(tmp_path / "sft")
    assert cmd[cmd.index("--lora_target_modules") + 1 : cmd.index("--lora_target_modules") + 3] == ["q_proj", "v_proj"]


def test_a_hub_token_override_goes_to_the_stage_environment_not_its_command_line(tmp_path):
    config = PipelineConfig(output_dir=str(tmp_path), stages={"sft": "recipes/configs/sft/tiny.yaml"},
                            overrides={"sft": {"hub_token": "hf_PLANTED", "max_steps": 3}})
    cmd = stage_command(config, "sft")
    assert "hf_PLANTED" not in " ".join(cmd) and cmd[cmd.index("--max_steps") + 1] == "3"
    assert stage_secrets(config, "sft") == {"HF_TOKEN": "hf_PLANTED"}
    logged = []
    run_pipeline(config, log=logged.append, run=lambda cmd, env: 0 if env["HF_TOKEN"] == "hf_PLANTED" else 1)
    assert "--max_steps 3" in logged[0] and "hf_PLANTED" not in logged[0]
    assert printable(["--hub_token", "hf_x", "--eos_token", "<eos>"]) == "--hub_token *** --eos_token <eos>"


def test_pipeline_config_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "x", "stage": {}}))
    with pytest.raises(ConfigError, match="Unknown config key 'stage'.*Did you mean 'stages'"):
        PipelineConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="Unknown pipeline stage"):
        PipelineConfig(stages={"dpo2": "recipes/configs/sft/tiny.yaml"})
    with pytest.raises(ConfigError, match="does not exist"):
        PipelineConfig(stages={"sft": "nope.yaml"})
    # A setting the report does not know fails before any stage runs, naming the file and the valid settings.
    path.write_text(yaml.safe_dump({"stages": {}, "evaluation": {"temprature": 0.7}}))
    with pytest.raises(ConfigError, match=r"p\.yaml: Unknown evaluation setting\(s\) \['temprature'\].*'temperature'"):
        PipelineConfig.from_yaml(path)


@pytest.mark.parametrize("evaluation, message", [
    ({"retrieve": "no/such/corpus"}, "evaluation retrieve: the corpus no/such/corpus does not exist"),
    ({"retrieve": "data/prompts", "top_k": 0}, "top_k must be a whole number >= 1"),
    ({"tools": ["no_such_tool_module"]}, "evaluation tools: .*no_such_tool_module"),
])
def test_retrieval_and_tool_settings_are_checked_before_any_stage_runs(evaluation, message):
    from rlhf_kit.pipeline import check_pipeline

    config = PipelineConfig(stages={"sft": "recipes/configs/sft/tiny.yaml"}, evaluation=evaluation)
    ran = []
    with pytest.raises(ConfigError, match=message):
        run_pipeline(config, run=lambda cmd, env: ran.append(cmd) or 0)
    assert not ran
    with pytest.raises(ConfigError, match=message):
        check_pipeline(config)


def test_pipeline_runs_and_rerun_skips_finished_stages(pipeline):
    config, status, _ = pipeline
    assert status == dict.fromkeys(STAGES, "ran")
    record = json.loads((config.stage_dir("ppo") / "rlhf_kit_stage.json").read_text())
    assert record["parent"]["stage"] == "sft"  # the lineage chain is recorded
    assert record["parent"]["parent"]["stage"] == "pretrain"

    def must_not_run(cmd, env):
        raise AssertionError(f"finished stage was run again: {cmd}")

    assert run_pipeline(config, run=must_not_run) == dict.fromkeys(STAGES, "skipped")


def test_each_stage_runs_through_accelerate_launch_and_prints_its_summary(pipeline):
    """`accelerate launch --config_file accelerate_config.yaml recipes/<stage>.py --config ...`, the command of the
    pipeline and of `rlhf-kit train`, in a process of its own as users run it: each recipe ends with its summary and
    leaves its outputs."""
    config, _, logs = pipeline
    printed = {stage: (logs / f"{stage}.log").read_text() for stage in STAGES}
    for stage in STAGES:
        assert f"== {stage} finished" in printed[stage], printed[stage][-3000:]
    assert "== reward model on 300 held-out pairs" in printed["reward"]  # the whole shipped test split
    assert (config.stage_dir("reward") / "model.safetensors").is_file()  # fully fine-tuned, as the config says
    assert (config.stage_dir("reward") / EVAL_FILE).is_file()
    assert (config.stage_dir("ppo") / "adapter_model.safetensors").is_file()
    assert (config.stage_dir("ppo") / "critic/value_head.safetensors").is_file()


def test_report_orders_base_sft_ppo(pipeline):
    config, _, _ = pipeline
    data = report(config)
    rows = data["rows"]
    # A few seconds of training teach the answer's shape and the stop token; reviewing the right item takes longer
    # (the full tiny pipeline reaches it), so the shortened run asserts on the shape.
    assert rows["sft"]["shape_rate"] > rows["base"]["shape_rate"] + 0.5
    assert rows["sft"]["stop_rate"] > rows["base"]["stop_rate"]
    assert rows["sft"]["kl_to_reference"] == 0.0
    # A few PPO updates against the reward model raise its score over the SFT policy's on held-out prompts.
    assert rows["ppo"]["reward_model_score"] > rows["sft"]["reward_model_score"]
    assert rows["ppo"]["kl_to_reference"] > 0
    assert (config.stage_dir("sft").parent / "report.md").read_text().startswith("# rlhf-kit pipeline report")


def test_report_adds_inference_rows_with_standard_errors_and_paired_gains(pipeline):
    """best-of-n of the SFT policy, the base model prompted as a document (raw, with and without few-shot examples)
    and every model with constrained decoding, each metric with its standard error, and the gains over the row each
    starts from with a paired SE."""
    import dataclasses

    from rlhf_kit.inference.best_of_n import kl_bound

    config, _, _ = pipeline
    config = dataclasses.replace(config, evaluation={
        **config.evaluation, "num_prompts": 16, "best_of_n": 2, "few_shot": "data/few_shot/review.jsonl",
        "constrained": True})
    data = report(config)
    rows = data["rows"]
    assert {"sft_best_of_2", "base_raw", "base_raw_3_shot", "base_constrained", "ppo_constrained"} <= set(rows)
    # Constrained decoding gives the answer's shape to every model, the barely trained base included.
    assert rows["base"]["shape_rate"] < 0.5
    assert all(rows[f"{m}_constrained"]["shape_rate"] == 1.0 for m in ("base", "sft", "ppo"))
    assert rows["sft_best_of_2"]["kl_to_reference"] == pytest.approx(kl_bound(2))
    for name in ("sft", "sft_best_of_2", "base_raw_3_shot"):
        assert 0 <= rows[name]["gold_score_se"] < 1 and "format_rate_se" in rows[name]
    gains = {(g["row"], g["column"]): g for g in data["gains"]}
    best = gains[("sft_best_of_2", "gold_score")]
    assert best["baseline"] == "sft"
    assert best["difference"] == pytest.approx(rows["sft_best_of_2"]["gold_score"] - rows["sft"]["gold_score"])
    assert gains[("base_raw_3_shot", "format_rate")]["difference"] == pytest.approx(
        rows["base_raw_3_shot"]["format_rate"] - rows["base_raw"]["format_rate"])
    md = (config.stage_dir("sft").parent / "report.md").read_text()
    assert "| sft_best_of_2 |" in md and " ± " in md and "sft_best_of_2 vs sft: gold_score" in md
    assert gains[("base_constrained", "shape_rate")]["difference"] > 0.5


def test_report_adds_retrieval_and_tool_rows_their_gains_recall_and_a_vote_over_whole_exchanges(pipeline):
    """The shop's questions on the pipeline's models: every trained policy with retrieval, and with retrieval and the
    calculator; exact-match gains over the row each adds to; recall@k of the retriever; and self-consistency sampled
    with both. (These review-task models have not learned the shop: the test checks the wiring, not the numbers.)"""
    import dataclasses

    config, _, _ = pipeline
    config = dataclasses.replace(config, evaluation={
        "prompts": "data/shop/prompts", "task": "rlhf_kit.tasks.shop", "num_prompts": 6, "max_new_tokens": 16,
        "retrieve": "data/shop/catalog.jsonl", "top_k": 3, "tools": ["rlhf_kit.inference.calculator"],
        "max_tool_rounds": 1, "vote_n": 2, "answer_pattern": "rlhf_kit.tasks.shop:answer_of"})
    data = report(config)
    rows = data["rows"]
    for name in ("sft", "ppo"):
        assert {f"{name}_retrieval", f"{name}_retrieval_tools"} <= set(rows)
        assert "tool_calls" in rows[f"{name}_retrieval_tools"] and "tool_calls" not in rows[f"{name}_retrieval"]
    assert "base_retrieval" not in rows  # a base model is not asked to read passages or call tools
    gains = {(g["row"], g["baseline"]) for g in data["gains"] if g["column"] == "exact_match"}
    assert {("sft_retrieval", "sft"), ("sft_retrieval_tools", "sft"), ("sft_retrieval_tools", "sft_retrieval")} <= gains
    assert data["retrieval"] == {"corpus": "data/shop/catalog.jsonl", "top_k": 3, "recall_at_k": 1.0}
    assert {"sft_retrieval_tools_one_sample", "sft_retrieval_tools_vote_of_2"} <= set(data["self_consistency"])
    md = (config.stage_dir("sft").parent / "report.md").read_text()
    assert "| sft_retrieval_tools |" in md and "recall@3 1.000" in md and "| exact_match | tool_calls |" in md


def test_rl_alternatives_and_rejection_sampling_are_wired_from_sft_and_reward(tmp_path):
    stages = {name: f"recipes/configs/{name}/tiny.yaml" for name in ("sft", "reward", "grpo", "rloo", "dpo",
                                                                      "best_of_n")}
    config = PipelineConfig(output_dir=str(tmp_path), stages={**stages, "rft": "recipes/configs/sft/rft-tiny.yaml"})
    assert config.ordered_stages() == ["sft", "reward", "grpo", "rloo", "dpo", "best_of_n", "rft"]

    def value(cmd, key):
        return cmd[cmd.index(f"--{key}") + 1]

    for stage in ("grpo", "rloo", "best_of_n"):
        cmd = stage_command(config, stage)
        assert cmd[cmd.index("--config") - 1].endswith(f"recipes/{stage}.py")
        assert value(cmd, "model_name_or_path") == str(tmp_path / "sft")
        assert value(cmd, "reward_model_path") == str(tmp_path / "reward")
    assert "--reward_model_path" not in stage_command(config, "dpo")
    rft = stage_command(config, "rft")  # the SFT recipe, on the best-of-N dataset, from the SFT model
    assert rft[rft.index("--config") - 1].endswith("recipes/sft.py")
    assert value(rft, "dataset_name") == str(tmp_path / "best_of_n")
    assert value(rft, "model_name_or_path") == str(tmp_path / "sft")
