"""Best-of-N: more samples give a higher reward-model score on held-out prompts, the written dataset resumes exactly
and trains the SFT recipe, and `rlhf-kit best-of-n` runs the recipe."""

import json

import pytest
from conftest import REPO, load_recipe

from rlhf_kit.inference.best_of_n import best_of_n, evaluate_best_of_n, kl_bound
from rlhf_kit.cli import main as cli
from rlhf_kit.data.loading import detect_dataset_format, load_data
from rlhf_kit.inference.generation import load_policy
from rlhf_kit.rewards import RewardSources, load_reward_functions

pytestmark = pytest.mark.usefixtures("single_thread")
HELD_OUT = load_data(REPO / "data/prompts", kind="prompt", split="test")


def test_best_of_4_beats_best_of_1_on_held_out_prompts(tiny_sft, tiny_reward):
    policy = load_policy(tiny_sft)
    funcs, weights, _ = load_reward_functions(RewardSources(reward_model_path=tiny_reward), policy.tokenizer)
    prompts = HELD_OUT["prompt"][:48]
    settings = dict(reward_funcs=funcs, weights=weights, max_new_tokens=16, temperature=0.7, seed=0)
    one, four = best_of_n(policy, prompts, n=1, **settings), best_of_n(policy, prompts, n=4, **settings)
    assert all(len(p.completions) == 4 and p.scores[p.best] == max(p.scores) for p in four)
    mean = lambda picks: sum(p.components["reward_model"][p.best] for p in picks) / len(picks)  # noqa: E731
    # Normalized reward-model units (std 1 on the reference set); the expected gain of the max of 4 draws is ~1 std.
    assert mean(four) > mean(one) + 0.3, (mean(one), mean(four))

    row = evaluate_best_of_n(policy, prompts[:8], n=2, reward_model=funcs[0].reward_model, max_new_tokens=16)
    assert row.name == "best_of_2" and row.metrics["kl_to_reference"] == pytest.approx(kl_bound(2))
    assert kl_bound(1) == 0.0 and kl_bound(4) == pytest.approx(1.3863 - 0.75, abs=1e-4)


def run(sft, reward, out, **overrides):
    return load_recipe("best_of_n")(["--config", "recipes/configs/best_of_n/tiny.yaml"], overrides={
        "model_name_or_path": sft, "reward_model_path": reward, "output_dir": str(out), "num_prompts": 24, "n": 2,
        "batch_size": 8, **overrides})


def test_dataset_resumes_exactly_and_trains_the_sft_recipe(tiny_sft, tiny_reward, tmp_path):
    out = tmp_path / "bon"
    metrics = run(tiny_sft, tiny_reward, out)
    data = (out / "train.jsonl").read_text()
    assert metrics["rows"] == 24 and metrics["best_score"] >= metrics["mean_score"]
    assert "best/gold" in metrics  # the gold annotator is measured (weight 0) on the picks
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    assert record["stage"] == "best_of_n" and record["parent"]["stage"] == "sft"

    # Interrupted in the middle of chunk 3 (chunks are 8 // 2 = 4 prompts), with a half-written last row.
    lines = data.splitlines(keepends=True)
    (out / "train.jsonl").write_text("".join(lines[:10]) + lines[10][:20])
    resumed = run(tiny_sft, tiny_reward, out)
    assert resumed["new_rows"] == 14 and (out / "train.jsonl").read_text() == data

    # The output directory is an SFT dataset: conversational `messages`, one per prompt, read by the SFT recipe.
    dataset = load_data(str(out), kind="sft")
    assert len(dataset) == 24 and detect_dataset_format(dataset, "sft") == "messages"
    prompts = load_data(REPO / "data/prompts", kind="prompt")["prompt"][:24]
    assert [row["messages"][:-1] for row in dataset] == prompts
    trainer = load_recipe("sft")(["--config", "recipes/configs/sft/rft-tiny.yaml"], overrides={
        "model_name_or_path": tiny_sft, "dataset_name": str(out), "output_dir": str(tmp_path / "rft"),
        "max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no", "logging_steps": 1,
        "disable_tqdm": True})
    assert trainer.state.global_step == 2 and (tmp_path / "rft/adapter_model.safetensors").is_file()


def test_cli_runs_the_recipe(tiny_sft, tiny_reward, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli(["best-of-n", tiny_sft, "--config", "recipes/configs/best_of_n/tiny.yaml", "--reward_model_path",
                tiny_reward, "--output_dir", str(out), "--num_prompts", "4", "--n", "2"]) == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 4
    # A user error: one message, exit code 2, no traceback (tests/test_user_errors.py).
    assert cli(["best-of-n", tiny_sft, "--config", "recipes/configs/best_of_n/tiny.yaml", "--num_prompt", "4"]) == 2
    assert "Unknown command-line option '--num_prompt'" in capsys.readouterr().err
