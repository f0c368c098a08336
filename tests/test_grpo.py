"""Stage 4, GRPO and RLOO: the reward functions score what the reward model was trained on, the missing-stop penalty
and the weights, and through the real recipes on the tiny SFT model, the held-out reward rises."""

import json

import pytest
import torch
from conftest import REPO, load_recipe, read_jsonl
from transformers import AutoTokenizer
from trl import RewardConfig, RewardTrainer

from rlhf_kit.config import ConfigError
from rlhf_kit.data.loading import load_data
from rlhf_kit.training.grpo import GRPOArguments, RLOOArguments, apply_sampling_global_batch
from rlhf_kit.model import load_tokenizer, stop_token_ids
from rlhf_kit.rewards import MissingStopPenalty, RewardSources, load_reward_functions

pytestmark = pytest.mark.usefixtures("single_thread")
TEST_PAIRS = read_jsonl(REPO / "data/preference/test.jsonl", limit=4)


def item_length(prompts, completions, item, **kwargs):
    """A reward function that reads an extra dataset column, as TRL hands them over."""
    return [float(len(i)) for i in item]


def test_reward_model_function_scores_the_tokens_reward_trainer_trained_on(tiny_reward, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward)
    funcs, weights, report = load_reward_functions(RewardSources(reward_model_path=tiny_reward), tokenizer)
    assert weights == [1.0] and report["gate"]["passed"]
    reward = funcs[0]
    rm = reward.reward_model

    # TRL's own tokenization of the pairs, as RewardTrainer prepared them for training.
    trainer = RewardTrainer(model=rm.model, processing_class=rm.tokenizer,
                            train_dataset=load_data(REPO / "data/preference", kind="preference", split="test")
                            .select(range(len(TEST_PAIRS))),
                            args=RewardConfig(output_dir=str(tmp_path), bf16=False, report_to="none"))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, example in zip(TEST_PAIRS, trainer.train_dataset):
        ids = example["chosen_ids"]
        assert im_end in ids[-2:]  # the end-of-turn token that closes the assistant turn is part of what was scored
        with torch.no_grad():
            raw = rm.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        # GRPO/RLOO call it with the prompt messages and the completion as an assistant message (plus extra kwargs).
        got = reward(prompts=[row["prompt"]], completions=[row["chosen"]], completion_ids=[[5, im_end]], item=["x"])
        assert got[0] == pytest.approx((raw - rm.offset) / rm.scale, abs=1e-5)


def test_missing_stop_penalty_by_hand():
    penalty = MissingStopPenalty([7, 9], 1.5)
    completion_ids = [[3, 4, 7], [3, 9], [3, 4, 5], [], [7]]
    assert penalty([None] * 5, [""] * 5, completion_ids=completion_ids) == [0.0, 0.0, -1.5, -1.5, 0.0]
    with pytest.raises(ValueError, match="completion_ids"):
        penalty(["p"], ["c"])
    with pytest.raises(ValueError, match="> 0"):
        MissingStopPenalty([7], 0.0)


def test_reward_functions_order_and_weights(tiny_sft):
    tokenizer = AutoTokenizer.from_pretrained(tiny_sft)
    sources = RewardSources(reward_funcs=["test_grpo:item_length"], eval_reward_funcs=["rlhf_kit.tasks.review:gold"],
                            missing_eos_penalty=1.0)
    stops = stop_token_ids(tokenizer, tiny_sft)
    funcs, weights, _ = load_reward_functions(sources, tokenizer, stop_ids=stops, weights=[0.5])
    assert [f.__name__ for f in funcs] == ["item_length", "missing_stop", "gold"]
    assert weights == [0.5, 1.0, 0.0]  # the penalty counts fully, the gold annotator is only measured
    assert funcs[1].stop_token_ids == set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    with pytest.raises(ValueError, match="no reward to optimize"):
        load_reward_functions(RewardSources(eval_reward_funcs=["rlhf_kit.tasks.review:gold"]), tokenizer)
    with pytest.raises(ValueError, match="reward_weights has 2 values for 1"):
        load_reward_functions(sources, tokenizer, stop_ids=stops, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="missing_eos_penalty needs the policy's stop tokens"):
        load_reward_functions(sources, tokenizer, weights=[0.5])


def run(name, sft, reward, out, **overrides):
    return load_recipe(name)(["--config", f"recipes/configs/{name}/tiny.yaml"], overrides={
        "model_name_or_path": sft, "reward_model_path": reward, "output_dir": str(out), "save_strategy": "no",
        **overrides})


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_recipe_raises_the_held_out_reward(name, tiny_sft, tiny_reward, tmp_path):
    out = tmp_path / name
    trainer = run(name, tiny_sft, tiny_reward, out, max_steps=20, eval_steps=20)
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    metrics = record["metrics"]
    # Held-out prompts, one completion each at the training temperature: the SFT policy (step 0) against the trained
    # one. The reward is the reward model's normalized score minus the missing-stop penalty; 20 updates take it from
    # about 0.1 to about 0.7 for both methods.
    assert metrics["eval_reward"] > metrics["eval_reward_at_start"] + 0.3, metrics
    assert metrics["eval_rewards/reward_model/mean"] > metrics["eval_rewards/reward_model/mean_at_start"], metrics
    # The training batches' mean reward rises too.
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    assert len(rewards) == 20 and sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    # The gold annotator is logged (weight 0), never optimized.
    assert "eval_rewards/gold/mean" in metrics and trainer.reward_weights.tolist() == [1.0, 1.0, 0.0]
    assert record["stage"] == name and record["parent"]["stage"] == "sft"
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    # The saved config runs again as it is: reward_weights stays what was configured.
    assert "reward_weights: null" in (out / "rlhf_kit_config.yaml").read_text()


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_recipe_stops_where_the_model_does(name, tiny_sft, tmp_path):
    """The SFT model's generation config keeps its base's EOS beside <|im_end|>: TRL's sampling and the missing-stop
    penalty must both end a completion there, as PPO and inference do."""
    tokenizer = load_tokenizer(tiny_sft)
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    trainer = run(name, tiny_sft, None, tmp_path / name, reward_funcs=["rlhf_kit.tasks.review:gold"], eval_reward_funcs=[],
                  missing_eos_penalty=1.0, max_steps=1, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=4, eval_strategy="no", eval_on_start=False,
                  eval_dataset_name="data/examples/prompts_standard.jsonl")
    assert trainer.eos_token_ids == stops
    assert [f.stop_token_ids for f in trainer.reward_funcs if isinstance(f, MissingStopPenalty)] == [set(stops)]
    assert stop_token_ids(tokenizer, tiny_sft) == stops


def test_bad_settings_fail_before_the_policy_loads(tiny_sft, tmp_path):
    # TRL's own config check, which parse_config reaches before any model or reward model loads.
    with pytest.raises(ValueError, match="at least 2 generations"):
        run("grpo", "no/such/model", "no/such/reward", tmp_path, num_generations=1, per_device_train_batch_size=4,
            eval_strategy="no", eval_on_start=False)
    with pytest.raises(ValueError, match="reward_weights has 3 values for 1"):
        run("rloo", tiny_sft, None, tmp_path, reward_funcs=["rlhf_kit.tasks.review:gold"], reward_weights=[1, 1, 1])


@pytest.mark.parametrize("config_class", [GRPOArguments, RLOOArguments])
def test_global_batch_size_sets_accumulation_and_the_generation_batch(config_class, tmp_path):
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, bf16=False,
                  report_to="none")
    args = config_class(global_batch_size=16, **common)
    apply_sampling_global_batch(args)
    # One process: 16 completions per optimizer step = 4 per micro-batch x 4 accumulation steps, one rollout of 16.
    assert (args.gradient_accumulation_steps, args.steps_per_generation, args.generation_batch_size) == (4, 4, 16)
    # An explicit generation batch is the user's choice and stays.
    args = config_class(global_batch_size=16, generation_batch_size=32, **common)
    apply_sampling_global_batch(args)
    assert (args.gradient_accumulation_steps, args.generation_batch_size) == (4, 32)
    with pytest.raises(ConfigError, match="not divisible by per_device_train_batch_size"):
        apply_sampling_global_batch(config_class(global_batch_size=6, **common))
