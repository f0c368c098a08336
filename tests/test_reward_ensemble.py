"""Reward-model ensembles (issue 20): K LoRA reward models on one base, trained by the real reward recipe, scored
conservatively, and watched during PPO (the members' disagreement, and the guard that stops a run on it)."""

import contextlib
import io
import json

import pytest
import torch
from conftest import PPO_SHORT, REPO, load_recipe, read_jsonl

from rlhf_kit.errors import UserError
from rlhf_kit.rewards import (
    EVAL_FILE,
    REWARD_FILE,
    RewardEnsemble,
    RewardModel,
    RewardModelFunction,
    RewardSources,
    aggregate_scores,
    disagreement,
    gate,
    load_reward_functions,
    load_reward_model,
    load_rewards,
)
from rlhf_kit.model import load_tokenizer
from rlhf_kit.training.ppo.trainer import guard_fires
from rlhf_kit.training.reward_model import RewardArguments, member_arguments, member_data, pair_samples

pytestmark = pytest.mark.usefixtures("single_thread")
TEST_PAIRS = read_jsonl(REPO / "data/preference/test.jsonl")
ENSEMBLE = {"use_peft": True, "ensemble_size": 3, "max_steps": 60, "per_device_train_batch_size": 16,
            "learning_rate": 3e-3, "warmup_steps": 0, "eval_strategy": "no", "save_strategy": "no",
            "logging_steps": 50, "disable_tqdm": True, "report_to": "none"}


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def samples(n=40):
    return [s for row in TEST_PAIRS[: n // 2] for s in pair_samples(row)]


@pytest.fixture(scope="module")
def ensemble_dir(tiny_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward-ensemble")
    quiet(load_recipe("reward"), ["--config", "recipes/configs/reward/tiny.yaml"],
          overrides={"model_name_or_path": tiny_sft, "output_dir": str(out), **ENSEMBLE})
    return out


# --- the aggregates and the guard, on hand-made numbers ---------------------------------------------------------
def test_aggregates_by_hand():
    members = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]])  # K=2 members, N=3 texts
    assert aggregate_scores(members, "mean").tolist() == [2.0, 0.0, 0.0]
    assert disagreement(members).tolist() == [1.0, 0.0, 2.0]  # population std: half the gap for two members
    assert aggregate_scores(members, "mean_minus_std", coef=0.5).tolist() == [1.5, 0.0, -1.0]
    assert aggregate_scores(members, "min").tolist() == [1.0, 0.0, -2.0]
    one = torch.tensor([[0.3, -1.0]])
    assert disagreement(one).tolist() == [0.0, 0.0]  # one member: no spread, and the mean is that member
    assert aggregate_scores(one, "mean_minus_std").tolist() == pytest.approx([0.3, -1.0])
    with pytest.raises(ValueError, match="one of"):
        aggregate_scores(members, "median")


def test_guard_fires_on_a_constructed_disagreement_rise():
    history = [0.20, 0.22, 0.25, 0.35, 0.41, 0.55]  # disagreement per update, rising as a policy over-optimizes
    fired = [guard_fires(history[0], value, 2.0) for value in history]
    assert fired == [False, False, False, False, True, True]  # 0.41 > 2 x 0.20
    assert not guard_fires(0.0, 0.0, 2.0) and guard_fires(0.0, 0.01, 2.0)  # members that agreed exactly


def test_each_member_gets_its_seed_and_with_bootstrap_its_own_resample(tmp_path):
    from datasets import Dataset

    pairs = Dataset.from_dict({"row": list(range(200))})
    args = RewardArguments(output_dir=str(tmp_path), ensemble_size=3, seed=7, report_to="none")
    members = member_arguments(args)
    assert [m.seed for m in members] == [7, 8, 9]
    assert [m.output_dir for m in members] == [str(tmp_path / f"member-{k}") for k in range(3)]
    assert all(member_data(pairs, args, m) is pairs for m in members)  # plain ensemble: every pair, own order

    args.ensemble_bootstrap = True
    draws = [member_data(pairs, args, m)["row"] for m in members]
    for draw in draws:
        assert len(draw) == 200 and set(draw) <= set(range(200))
        # Drawn with replacement: about 1 - 1/e = 63% of the pairs appear, some of them twice or more.
        assert 0.55 < len(set(draw)) / 200 < 0.72
    assert draws[0] != draws[1] != draws[2] != draws[0]
    assert member_data(pairs, args, members[1])["row"] == draws[1]  # the member's seed decides its draw
    args.ensemble_size = 1
    assert member_data(pairs, args, members[0]) is pairs  # one model: nothing to resample


# --- the ensemble trained by the recipe ------------------------------------------------------------------------
def test_ensemble_trains_k_members_on_one_base_and_reports_each(ensemble_dir):
    meta = json.loads((ensemble_dir / REWARD_FILE).read_text())
    assert meta["ensemble"]["members"] == ["member-0", "member-1", "member-2"]
    report = json.loads((ensemble_dir / EVAL_FILE).read_text())
    assert [m["member"] for m in report["members"]] == ["member-0", "member-1", "member-2"]
    assert report["pairs"] == len(TEST_PAIRS) and report["accuracy"] > 0.6
    accuracies = [m["accuracy"] for m in report["members"]]
    assert all(a > 0.6 for a in accuracies) and len(set(accuracies)) > 1  # other seeds, other models
    for member in meta["ensemble"]["members"]:
        assert (ensemble_dir / member / REWARD_FILE).is_file() and (ensemble_dir / member / EVAL_FILE).is_file()
    tokenizer = load_tokenizer(str(ensemble_dir))
    assert gate(str(ensemble_dir), tokenizer)["gate"]["passed"]


def test_ensemble_reload_gives_each_member_its_own_scores(ensemble_dir):
    ensemble = RewardEnsemble.from_pretrained(str(ensemble_dir))
    texts = samples()
    members = ensemble.score_members(texts)
    assert members.shape == (3, len(texts))
    again = RewardEnsemble.from_pretrained(str(ensemble_dir)).score_members(texts)
    assert torch.equal(members, again)  # save/reload: identical member scores
    for k, member in enumerate(sorted(p for p in ensemble_dir.glob("member-*"))):
        alone = RewardModel.from_pretrained(str(member)).score(texts)  # merged into its own copy of the base
        assert torch.allclose(members[k], alone, atol=1e-4), k
    assert not torch.allclose(members[0], members[1], atol=1e-2)
    # What PPO copies its critic from: the first member with its own normalization.
    assert torch.allclose(ensemble.critic_reference().score(texts), members[0], atol=1e-5)
    # The default aggregate is the stage's (mean); an override changes the scoring, not the members.
    assert torch.allclose(ensemble.score(texts), members.mean(0))
    conservative = load_reward_model(str(ensemble_dir), aggregate="min")
    assert torch.equal(conservative.score(texts), members.min(0).values)


def test_one_base_holds_the_whole_ensemble(ensemble_dir):
    ensemble = RewardEnsemble.from_pretrained(str(ensemble_dir))
    single = RewardModel.from_pretrained(str(ensemble_dir / "member-0"))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    lora = sum(p.numel() for n, p in ensemble.model.named_parameters() if "lora_" in n)
    assert count(ensemble.model) - lora < 1.05 * count(single.model)  # one base, not three


def test_reward_function_and_load_rewards_take_an_ensemble(ensemble_dir, tiny_sft):
    tokenizer = load_tokenizer(tiny_sft)
    rewards = load_rewards(RewardSources(reward_model_path=str(ensemble_dir), reward_aggregate="mean_minus_std",
                                         reward_aggregate_coef=2.0), tokenizer)
    assert isinstance(rewards.reward_model, RewardEnsemble)
    assert (rewards.reward_model.aggregate, rewards.reward_model.coef) == ("mean_minus_std", 2.0)
    prompts = [row["prompt"] for row in TEST_PAIRS[:6]]
    completions = [row["chosen"] for row in TEST_PAIRS[:6]]
    members = rewards.reward_model.score_members_for(prompts, completions)
    expected = members.mean(0) - 2.0 * disagreement(members)
    scores = RewardModelFunction(rewards.reward_model)(prompts=prompts, completions=completions)
    assert scores == pytest.approx(expected.tolist(), abs=1e-6)

    # GRPO, RLOO and best-of-N: the ensemble's score (weight 1) and its disagreement, measured only (weight 0).
    funcs, weights, report = load_reward_functions(RewardSources(reward_model_path=str(ensemble_dir)), tokenizer)
    assert [f.__name__ for f in funcs] == ["reward_model", "reward_model_std"] and weights == [1.0, 0.0]
    assert report["gate"]["passed"]
    assert funcs[0](prompts=prompts, completions=completions) == pytest.approx(members.mean(0).tolist(), abs=1e-6)
    spread = disagreement(members).tolist()
    assert funcs[1](prompts=prompts, completions=completions) == pytest.approx(spread, abs=1e-6)  # from the cache
    assert funcs[1](prompts=prompts[:3], completions=completions[:3]) == pytest.approx(spread[:3], abs=1e-6)


def test_an_aggregate_for_a_single_model_or_a_full_ensemble_is_refused(tiny_reward, tiny_sft, tmp_path):
    with pytest.raises(ValueError, match="needs a reward ensemble"):
        load_reward_model(tiny_reward, aggregate="min")
    with pytest.raises(ValueError, match="must be one of"):
        load_rewards(RewardSources(reward_model_path=tiny_reward, reward_aggregate="median"),
                     load_tokenizer(tiny_sft))
    with pytest.raises(ValueError, match="LoRA adapters on one shared base"):
        load_recipe("reward")(["--config", "recipes/configs/reward/tiny.yaml"], overrides={
            "model_name_or_path": tiny_sft, "output_dir": str(tmp_path), **ENSEMBLE, "use_peft": False})
    assert not (tmp_path / "member-0").exists()


# --- PPO with an ensemble: the disagreement is logged, and the guard stops the run ------------------------------
def test_ppo_logs_the_ensembles_disagreement_and_the_guard_stops_it(ensemble_dir, tiny_sft, tmp_path):
    main = load_recipe("ppo")
    base = {"model_name_or_path": tiny_sft, "reward_model_path": str(ensemble_dir), **PPO_SHORT,
            "reward_aggregate": "mean_minus_std", "logging_steps": 1}
    trainer = quiet(main, ["--config", "recipes/configs/ppo/tiny.yaml"],
                    overrides={**base, "output_dir": str(tmp_path / "watched"), "max_steps": 2})
    logs = [e for e in trainer.state.log_history if "objective/kl" in e]
    assert len(logs) == 2 and all(e["reward/rm_std"] > 0 for e in logs)
    assert all(e["reward/rm"] == pytest.approx(e["reward/rm_raw"]) for e in logs)

    # A guard below 1 fires at the first update that does not lower the disagreement: the run stops there, saved.
    with pytest.warns(RuntimeWarning, match="disagreement_guard"):
        stopped = quiet(main, ["--config", "recipes/configs/ppo/tiny.yaml"], overrides={
            **base, "output_dir": str(tmp_path / "guarded"), "disagreement_guard": 0.5})
    assert stopped.state.global_step == 1
    assert (tmp_path / "guarded" / "checkpoint-1").is_dir()

    with pytest.raises(UserError, match="reward ensemble"):
        quiet(main, ["--config", "recipes/configs/ppo/tiny.yaml"], overrides={
            **base, "reward_model_path": str(ensemble_dir / "member-0"), "reward_aggregate": None,
            "output_dir": str(tmp_path / "single"), "disagreement_guard": 2.0})
