"""Stage 4: PPO. Reward assembly on hand-built sequences, the first-update health checks, adapters and gradients,
accumulation invariance, and through the real recipe: the reward model's held-out score rises with bounded KL, the
policy saves as a standard PEFT adapter, and an interrupted run resumes where it stopped."""

import contextlib
import io
import json
import weakref

import pytest
import torch
from conftest import PPO_SHORT, REPO, Interrupt, load_recipe
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig

from rlhf_kit.config import field_names, parse_config
from rlhf_kit.data.loading import load_data
from rlhf_kit.model import ModelArguments, is_adapter_dir, is_fresh_merge, load_model, load_tokenizer, lora_config, \
    merge_key, merged_cache_path, stop_token_ids
from rlhf_kit.rewards import DEFAULT_MIN_ACCURACY, NO_REWARD, RewardModel, Rewards, RewardSources
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.training.ppo.rollout import Rollout, left_pad, truncate_at_stop
from rlhf_kit.training.ppo.trainer import PPOHealthError, PPOTrainer
from rlhf_kit.training.ppo.config import PPOConfig
from rlhf_kit.training.ppo.model import CRITIC, POLICY

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = load_data(REPO / "data/prompts", kind="prompt")
HELD_OUT = load_data(REPO / "data/prompts", kind="prompt", split="test")
PPO_FAST = {
    "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_mini_batches": 2, "num_ppo_epochs": 2,
    "response_length": 12, "logging_steps": 1, "save_strategy": "no", "eval_on_start": False,
    "disable_tqdm": True, "report_to": "none", "log_completions": 2,
}


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def reward_model(tiny_reward):
    return RewardModel.from_pretrained(tiny_reward)


def positivity(prompts, completions, item, **columns):
    """A reward function in TRL's signature; `item` is an extra dataset column."""
    texts = [c[-1]["content"] for c in completions]
    return [float(sum(w in t for w in ("great", "lovely", "fun")) + (i in t)) for t, i in zip(texts, item)]


def make_trainer(tiny_sft, tmp_path, reward_model=None, reward_funcs=(positivity,), model=None, train_dataset=PROMPTS,
                 missing_eos_penalty=None, **overrides):
    tokenizer = load_tokenizer(tiny_sft)
    model_args = ModelArguments(model_name_or_path=tiny_sft, use_peft=True, lora_r=8, lora_alpha=16,
                                train_chat_tokens=False)
    args = PPOConfig(output_dir=str(tmp_path / "ppo"), **{**PPO_FAST, "max_steps": 2, "seed": 0, **overrides})
    return PPOTrainer(model=model or load_model(model_args, tokenizer), args=args, processing_class=tokenizer,
                      train_dataset=train_dataset, eval_dataset=HELD_OUT.select(range(16)),
                      rewards=Rewards(reward_model, list(reward_funcs), missing_eos_penalty=missing_eos_penalty),
                      peft_config=lora_config(model_args, tokenizer))


def hand_rollout(trainer, rows):
    """A rollout whose responses are given token by token (stop tokens, pads and all)."""
    tokenizer = trainer.processing_class
    prompt = [{"role": "user", "content": "Review the tea."}]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    query_ids, query_mask = left_pad([prompt_ids] * len(rows), tokenizer.pad_token_id)
    ids, mask, stopped = truncate_at_stop(torch.tensor(rows), trainer.stop_token_ids, tokenizer.pad_token_id)
    return Rollout([prompt] * len(rows), {"item": ["tea"] * len(rows)}, query_ids, query_mask, ids, mask, stopped)


# ------------------------------------------------------------------------------------------------ reward assembly


def test_score_lands_on_last_real_token_and_missing_stop_is_penalized(tiny_sft, tmp_path):
    trainer = make_trainer(tiny_sft, tmp_path, missing_eos_penalty=1.5, kl_coef=0.1)
    tok = trainer.processing_class
    stop, pad = trainer.stop_token_ids[0], tok.pad_token_id
    a, b, c = tok.convert_tokens_to_ids(tok.tokenize("The tea is"))[:3]
    rollout = hand_rollout(trainer, [
        [a, b, stop, a, b],  # stops at 2; what follows the stop token is cut
        [a, stop, pad, pad, pad],  # stops at 1
        [stop, pad, pad, pad, pad],  # an empty answer: just the stop token
        [a, b, c, a, b],  # never stops: truncated at response_length
    ])
    assert rollout.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert rollout.stopped.tolist() == [True, True, True, False]
    assert trainer._decode(rollout)[1] == tok.decode([a])  # the stop token is not part of the judged text

    # Policy and reference disagree by 0.5 nats on every position, padding included: padding must stay 0.
    rollout.old_logprobs = torch.full((4, 5), -1.0)
    rollout.ref_logprobs = torch.full((4, 5), -1.5)
    trainer.assemble_rewards(rollout, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    mask = rollout.response_mask.float()
    expected = -0.1 * 0.5 * mask
    expected[0, 2] += 1.0
    expected[1, 1] += 2.0
    expected[2, 0] += 3.0
    expected[3, 4] += 4.0 - 1.5  # the penalty is subtracted, the reward model's judgement kept
    torch.testing.assert_close(rollout.rewards, expected)
    torch.testing.assert_close(rollout.kl, 0.5 * mask)
    torch.testing.assert_close(rollout.scores, torch.tensor([1.0, 2.0, 3.0, 2.5]))


def test_k3_kl_penalty_and_whitened_rewards(tiny_sft, tmp_path):
    trainer = make_trainer(tiny_sft, tmp_path, kl_estimator="k3", kl_coef=0.2, whiten_rewards=True)
    stop, pad = trainer.stop_token_ids[0], trainer.processing_class.pad_token_id
    rollout = hand_rollout(trainer, [[5, 6, stop], [5, stop, pad], [7, 8, 9]])
    rollout.old_logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0], [-0.2, -0.3, -0.4]])
    rollout.ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -3.0, 0.0], [-0.2, -0.3, -0.1]])
    trainer.assemble_rewards(rollout, torch.tensor([1.0, -1.0, 0.5]))
    d = rollout.old_logprobs - rollout.ref_logprobs
    k3 = (torch.exp(-d) - 1 + d) * rollout.response_mask
    torch.testing.assert_close(rollout.kl, k3)
    mask = rollout.response_mask.bool()
    raw = -0.2 * k3
    raw[0, 2] += 1.0
    raw[1, 1] += -1.0
    raw[2, 2] += 0.5
    # Whitening rescales the spread over real tokens and keeps the mean; padding stays 0.
    assert float(rollout.rewards[mask].mean()) == pytest.approx(float(raw[mask].mean()), abs=1e-6)
    assert float(rollout.rewards[mask].std()) == pytest.approx(1.0, abs=1e-4)
    assert float(rollout.rewards[~mask].abs().sum()) == 0


def test_gae_on_the_assembled_rewards(tiny_sft, tmp_path):
    trainer = make_trainer(tiny_sft, tmp_path, gamma=1.0, lam=1.0, kl_coef=0.0)
    stop, pad = trainer.stop_token_ids[0], trainer.processing_class.pad_token_id
    rollout = hand_rollout(trainer, [[5, 6, stop], [5, stop, pad]])
    rollout.old_logprobs = rollout.ref_logprobs = torch.zeros(2, 3)
    rollout.values = torch.tensor([[0.5, 0.25, 0.0], [1.0, 0.0, 9.0]])  # 9.0 sits on padding and must be ignored
    trainer.assemble_rewards(rollout, torch.tensor([2.0, -1.0]))
    trainer.compute_advantages(rollout)
    # gamma = lam = 1: returns are the reward-to-go, the score at the last real token.
    torch.testing.assert_close(rollout.returns, torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]))
    raw = torch.tensor([1.5, 1.75, 2.0, -2.0, -1.0])  # returns - values on real tokens
    torch.testing.assert_close(rollout.advantages[rollout.response_mask.bool()], (raw - raw.mean()) / raw.std())


def test_weighted_rewards_see_dataset_columns(tiny_sft, tmp_path, reward_model):
    def constant(prompts, completions, **columns):
        assert columns["item"] == ["tea"] * len(prompts)
        return [1.0] * len(prompts)

    trainer = make_trainer(tiny_sft, tmp_path, reward_model=reward_model, reward_funcs=[constant],
                           reward_weights=[0.5, 2.0])
    stop = trainer.stop_token_ids[0]
    rollout = hand_rollout(trainer, [[5, 6, stop], [7, stop, 0]])
    rollout.old_logprobs = rollout.ref_logprobs = torch.zeros(2, 3)
    rollout.completions = ["The tea is great.", "The tea is awful."]
    components = trainer.score(rollout)
    torch.testing.assert_close(components["rm"], (components["rm_raw"] - reward_model.offset) / reward_model.scale)
    torch.testing.assert_close(rollout.scores, 0.5 * components["rm"] + 2.0)


class TextOnlyJudge:
    """A reward model seen only through text, as one with another tokenizer is: it must get decoded completions."""

    offset, scale, model = 0.0, 1.0, None

    def __init__(self):
        self.seen = []

    def score_texts_for(self, prompts, completions, *, batch_size, normalize):
        self.seen += list(zip(prompts, completions))
        return torch.tensor([float("great" in c) for c in completions])


def test_plain_text_prompts_and_a_reward_model_with_another_tokenizer(tiny_sft, tmp_path):
    judge = TextOnlyJudge()
    plain = load_data(REPO / "data/examples/prompts_standard.jsonl", kind="prompt")
    trainer = make_trainer(tiny_sft, tmp_path, reward_model=judge, reward_funcs=[], train_dataset=plain, max_steps=1)
    quiet(trainer.train)
    assert len(judge.seen) == 16 and all(isinstance(p, str) and isinstance(c, str) for p, c in judge.seen)
    assert not any(t in c for _, c in judge.seen for t in ("<|im_end|>", "<|pad|>", "<|im_start|>"))
    assert "reward/rm" in trainer.state.log_history[-1]


# ------------------------------------------------------------------------------------------------ models


def test_adapters_dropout_and_sampling_setup(tiny_sft, tmp_path, reward_model):
    tokenizer = load_tokenizer(tiny_sft)
    model = load_model(ModelArguments(model_name_or_path=tiny_sft), tokenizer)
    model.config.attention_dropout = 0.3
    trainer = make_trainer(tiny_sft, tmp_path, reward_model=reward_model, model=model, temperature=0.6,
                           stop_token="<|im_end|>")
    wrapper = trainer.model
    assert set(wrapper.policy.peft_config) == {POLICY, CRITIC}
    assert all(m.p == 0 for m in wrapper.modules() if isinstance(m, torch.nn.Dropout))
    assert wrapper.lm.config.attention_dropout == 0
    assert all(m.attention_dropout == 0 for m in wrapper.modules() if hasattr(m, "attention_dropout"))
    generation = wrapper.lm.generation_config
    assert (generation.temperature, generation.top_k, generation.top_p, generation.do_sample) == (0.6, 0, 1.0, True)
    assert trainer.stop_token_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_a_response_ending_on_the_models_own_eos_counts_as_stopped(tiny_sft, tmp_path):
    """The SFT model keeps its base's EOS (<|endoftext|>) as a stop token beside <|im_end|> (generation_config.json):
    sampled, it ends the response at inference, so PPO must neither train on past it nor penalize it as endless."""
    tokenizer = load_tokenizer(tiny_sft)
    im_end, base_eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token_id == im_end and base_eos in GenerationConfig.from_pretrained(tiny_sft).eos_token_id
    trainer = make_trainer(tiny_sft, tmp_path, missing_eos_penalty=1.5, kl_coef=0.0)
    assert trainer.stop_token_ids == [im_end, base_eos]
    assert trainer.model.lm.generation_config.eos_token_id == [im_end, base_eos]
    assert stop_token_ids(tokenizer, tiny_sft) == trainer.stop_token_ids  # the stop set every other path uses

    a, b = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("The tea"))[:2]
    rollout = hand_rollout(trainer, [[a, base_eos, b, b], [a, im_end, b, b], [a, b, a, b]])
    assert rollout.stopped.tolist() == [True, True, False]
    assert rollout.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert trainer._decode(rollout)[:2] == [tokenizer.decode([a])] * 2
    rollout.old_logprobs = rollout.ref_logprobs = torch.zeros(3, 4)
    trainer.assemble_rewards(rollout, torch.ones(3))
    torch.testing.assert_close(rollout.scores, torch.tensor([1.0, 1.0, -0.5]))  # only the endless one pays


def test_critic_starts_as_the_reward_model(tiny_sft, tmp_path, reward_model):
    """The reward model is a LoRA adapter on the SFT model: the critic gets its adapter and its head (normalized)."""
    trainer = make_trainer(tiny_sft, tmp_path, reward_model=reward_model)
    head = reward_model.model.score
    torch.testing.assert_close(trainer.model.value_head.weight, head.weight / reward_model.scale)
    sample = [{"role": "user", "content": "Review the tea."}, {"role": "assistant", "content": "The tea is fun."}]
    ids = torch.tensor([reward_model.encode(sample) + [0]])  # values are read at the state before the last token
    values = trainer.model.values(ids, torch.ones_like(ids), 1)
    torch.testing.assert_close(values[:, 0].detach(), reward_model.score([sample]), atol=1e-4, rtol=1e-4)
    # Without a reward model to copy, the critic starts fresh: value 0 everywhere.
    fresh = make_trainer(tiny_sft, tmp_path / "fresh").model.values(ids, torch.ones_like(ids), 3)
    assert float(fresh.abs().max()) == 0


def test_each_forward_trains_only_its_own_adapter(tiny_sft, tmp_path):
    wrapper = make_trainer(tiny_sft, tmp_path).model
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    for which, expect in (("policy_logits", f".{POLICY}."), ("values", f".{CRITIC}.")):
        wrapper.zero_grad(set_to_none=True)
        getattr(wrapper, which)(ids, mask, 3).float().sum().backward()
        got = {n for n, p in wrapper.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got and all(expect in n or (which == "values" and n.startswith("value_head")) for n in got), got
    assert all(p.requires_grad for p in wrapper.trainable)


def test_old_and_reference_logprobs_are_the_training_forward_at_the_sampling_temperature(tiny_sft, tmp_path):
    trainer = make_trainer(tiny_sft, tmp_path, temperature=0.5)
    rollout = trainer.rollout(PROMPTS[:4])
    # The reference is the SFT model itself, loaded separately; the fresh policy adapter equals it.
    reference = AutoModelForCausalLM.from_pretrained(tiny_sft)
    ids, mask = rollout.input_ids, rollout.attention_mask
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    width = rollout.response_ids.shape[1]
    expected = torch.log_softmax(logits[:, -width - 1 : -1] / 0.5, -1).gather(-1, rollout.response_ids[..., None])[..., 0]
    real = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.ref_logprobs[real], expected[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.old_logprobs[real], expected[real], atol=1e-5, rtol=0)


def test_rollout_logprobs_come_from_the_sampler_in_float32_and_from_a_forward_pass_otherwise(tiny_sft, tmp_path):
    """'auto' in float32: the log-probs generate recorded are the rollout's old log-probs (one forward pass fewer),
    equal to what the training forward gives ('recompute', which also logs how far the sampler's were). In bf16,
    where cached decoding and a full forward differ by more than PPO's clipping should see, 'auto' recomputes."""
    rollouts = {}
    for mode in ("auto", "recompute"):
        trainer = make_trainer(tiny_sft, tmp_path / mode, temperature=0.5, rollout_logprobs=mode)
        assert trainer._recompute_logprobs == (mode == "recompute")
        torch.manual_seed(0)
        rollouts[mode] = trainer.rollout(PROMPTS[:8])
    sampled, recomputed = rollouts["auto"], rollouts["recompute"]
    assert torch.equal(sampled.response_ids, recomputed.response_ids)
    real = sampled.response_mask.bool()
    assert real.sum() > 40
    assert torch.equal(sampled.old_logprobs, sampled.sampler_logprobs)
    assert not torch.equal(recomputed.old_logprobs, recomputed.sampler_logprobs)  # two computations, not one copied
    torch.testing.assert_close(sampled.old_logprobs[real], recomputed.old_logprobs[real], atol=1e-5, rtol=0)
    recomputed.kl = torch.zeros_like(recomputed.old_logprobs)
    recomputed.scores = torch.zeros(len(recomputed))
    assert 0 < trainer._rollout_metrics(recomputed)["rollout/sampler_logprob_gap"] < 1e-5

    tokenizer = load_tokenizer(tiny_sft)
    bf16 = load_model(ModelArguments(model_name_or_path=tiny_sft, dtype="bfloat16"), tokenizer)
    assert make_trainer(tiny_sft, tmp_path / "bf16", model=bf16)._recompute_logprobs
    with pytest.raises(ValueError, match="rollout_logprobs: sampler"):
        PPOConfig(output_dir=str(tmp_path), rollout_logprobs="sampler", generation_backend="vllm")


# ------------------------------------------------------------------------------------------------ health checks


def test_health_check_stops_on_dropout(tiny_sft, tmp_path):
    trainer = make_trainer(tiny_sft, tmp_path)
    for module in trainer.model.modules():  # as if something switched dropout back on after setup
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    with pytest.raises(PPOHealthError, match="ratio is not 1.*dropout"):
        trainer.train()


def test_health_check_stops_when_policy_starts_away_from_reference(tiny_sft, tmp_path):
    trainer = make_trainer(tiny_sft, tmp_path)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if f"lora_B.{POLICY}" in name:
                param.normal_(0, 0.5)
    with pytest.raises(PPOHealthError, match="differs from the reference"):
        trainer.train()


def test_pad_must_differ_from_stop_token(tiny_sft, tmp_path):
    tokenizer = load_tokenizer(tiny_sft)
    tokenizer.pad_token = tokenizer.eos_token
    args = PPOConfig(output_dir=str(tmp_path), **PPO_FAST)
    with pytest.raises(ValueError, match="pad token .* also a stop token"):
        PPOTrainer(model=None, args=args, processing_class=tokenizer, train_dataset=PROMPTS,
                   rewards=Rewards(funcs=[positivity]))


def test_warns_when_kl_climbs_without_reward_and_when_responses_collapse(tiny_sft, tmp_path):
    trainer = make_trainer(tiny_sft, tmp_path)
    stop = trainer.stop_token_ids[0]
    varied = hand_rollout(trainer, [[5 + i, stop] for i in range(8)])
    varied.scores, varied.completions = torch.randn(8), [f"answer {i}" for i in range(8)]
    with pytest.warns(RuntimeWarning, match="drifting without earning reward"):
        for step in range(10):  # KL climbs 0.5 nats per update, the score stays put
            metrics = {"objective/scores": 0.0, "objective/kl": 0.5 * step, "objective/response_length": 2.0}
            trainer._warn_on_trends(metrics, varied)
    same = hand_rollout(trainer, [[5, stop]] * 8)
    same.scores, same.completions = torch.zeros(8), ["The tea is fun."] * 8
    with pytest.warns(RuntimeWarning, match="responses collapsed"):
        trainer._warn_on_trends({"objective/scores": 0.0, "objective/kl": 0.0, "objective/response_length": 2.0}, same)


# ------------------------------------------------------------------------------------------------ the update


def test_8_rows_at_once_and_4_rows_x_2_accumulated_give_the_same_update(tiny_sft, tmp_path):
    """8 sequences x 1 micro-batch and 4 x 2 accumulated give the same update (token-weighted micro-batches).

    Plain SGD at learning rate 1, so each weight moves by exactly its gradient: the updates agree to about 1e-8 where
    the largest is 0.1, and weighting the two micro-batches equally instead moves them apart by up to 7e-4. (Adam's
    first step, g / (|g| + eps), turns float32 rounding in gradients that are all but 0 into steps of up to 4e-4 of
    the learning rate, as large as the check itself.)"""
    updates = []
    for size, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        trainer = make_trainer(tiny_sft, tmp_path / f"{size}", per_device_train_batch_size=size,
                               gradient_accumulation_steps=accumulation, num_mini_batches=1, num_ppo_epochs=1,
                               max_steps=1, optim="sgd", learning_rate=1.0)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        quiet(trainer.train)
        updates.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert max(update.abs().max() for update in updates[0].values()) > 0.01  # the update moved the weights
    for name, update in updates[0].items():
        torch.testing.assert_close(updates[1][name], update, atol=1e-6, rtol=1e-4, msg=name)


def test_update_takes_a_step_per_mini_batch_per_epoch_over_every_row_once(tiny_sft, tmp_path):
    """num_ppo_epochs x num_mini_batches optimizer steps per update; in each epoch the mini-batches (of
    batch_size / num_mini_batches rows, accumulated over micro-batches) split the rollout, each row used once."""
    epochs, mini_batches, micro, accumulation = 3, 2, 2, 2
    trainer = make_trainer(tiny_sft, tmp_path, num_ppo_epochs=epochs, num_mini_batches=mini_batches,
                           per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation)
    size = trainer.args.batch_size
    assert size == mini_batches * accumulation * micro == 8
    trainer._setup_training(None)
    rollout = trainer.rollout(PROMPTS[:size])
    trainer.score(rollout)
    trainer.compute_advantages(rollout)

    # Watch which rollout rows each micro-batch takes and when the optimizer steps.
    steps, pending = [], []
    select, step = rollout.select, trainer.optimizer.step
    rollout.select = lambda rows: pending.append(rows.tolist()) or select(rows)

    def counted_step(*args, **kwargs):
        steps.append(list(pending))
        pending.clear()
        return step(*args, **kwargs)

    trainer.optimizer.step = counted_step
    trainer.update(rollout)
    assert len(steps) == epochs * mini_batches and not pending
    assert all(len(micro_batches) == accumulation and all(len(m) == micro for m in micro_batches)
               for micro_batches in steps)
    rows = [sum(micro_batches, []) for micro_batches in steps]  # each optimizer step's mini-batch
    assert all(len(set(r)) == size // mini_batches for r in rows)
    orders = [sum(rows[e * mini_batches : (e + 1) * mini_batches], []) for e in range(epochs)]
    assert all(sorted(order) == list(range(size)) for order in orders)  # every row once per epoch
    assert len({tuple(order) for order in orders}) > 1  # reshuffled between epochs


def test_micro_batches_of_a_mini_batch_take_rows_of_like_length(tiny_sft, tmp_path):
    """Each micro-batch is cut to its longest row, so the update groups the mini-batch's rows by length: shortest
    first. Grouped as they were shuffled, the short rows would be padded to the long ones in every micro-batch."""
    trainer = make_trainer(tiny_sft, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           num_mini_batches=1, num_ppo_epochs=4, rollout_logprobs="recompute")
    tok = trainer.processing_class
    stop, a = trainer.stop_token_ids[0], tok.convert_tokens_to_ids(tok.tokenize("The tea"))[0]
    trainer._setup_training(None)
    rollout = hand_rollout(trainer, [[a] * n + [stop] + [a] * (7 - n) for n in (5, 1, 7, 2)])
    lengths = rollout.response_mask.sum(1).tolist()
    assert lengths == [6, 2, 8, 3]
    rollout.completions = trainer._decode(rollout)
    with torch.no_grad():
        trainer._score_logprobs_and_values(rollout)
    trainer.score(rollout)
    trainer.compute_advantages(rollout)
    taken, select = [], rollout.select
    rollout.select = lambda rows: taken.append(sorted(rows.tolist())) or select(rows)
    trainer.update(rollout)
    assert taken == [[1, 3], [0, 2]] * 4  # every epoch: the two short rows (widths 3), then the two long (8)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_first_micro_batch_gets_its_rollout_values_from_its_training_forward_pass(tiny_sft, tmp_path,
                                                                                      reward_model, checkpointing):
    """Until the first optimizer step the policy is the one that sampled, so the training forward pass of an
    update's first micro-batch also gives that micro-batch's rollout values: the critic runs without gradients only
    on the other rows. The step is the one computed with a pass of its own for every value (plain SGD at rate 1, as
    in the accumulation test above: the updates agree to rounding), with activation checkpointing too: its backward
    pass, which replays the forward, comes after the rollout's other passes. Once the update has used that pass's
    outputs nothing keeps them alive: with a real vocabulary the logits alone can take a gigabyte."""
    updates = {}
    for shared in (True, False):
        torch.manual_seed(0)
        # The value head starts from the reward model's head: values that are not all 0 from the start.
        trainer = make_trainer(tiny_sft, tmp_path / str(shared), reward_model=reward_model,
                               per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2,
                               num_ppo_epochs=2, max_steps=1, optim="sgd", learning_rate=1.0,
                               activation_checkpointing=checkpointing)
        calls, forward = [], trainer.model.forward

        def counted(ids, mask, width=None, part="both", **kwargs):
            calls.append((part, len(ids), torch.is_grad_enabled()))
            return forward(ids, mask, width, part=part, **kwargs)

        trainer.model.forward = counted
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        if shared:
            score, update, logits, alive = trainer._score_logprobs_and_values, trainer.update, [], []

            def scoring(rollout, plan=None):
                score(rollout, plan)
                logits.append(weakref.ref(plan.first_outputs[0]))

            def updating(rollout, plan=None):
                stats = update(rollout, plan)
                alive.append(logits[-1]() is not None)  # still inside train(), which called both
                return stats

            trainer._score_logprobs_and_values, trainer.update = scoring, updating
            quiet(trainer.train)
            assert alive == [False]
        else:  # the same steps, every value from a pass without gradients
            trainer._setup_training(None)
            rollout = trainer.sample(trainer._prompt_batch(0))
            plan = trainer._update_plan(rollout)
            trainer._score_logprobs_and_values(rollout)
            trainer.score(rollout)
            trainer.compute_advantages(rollout)
            trainer.update(rollout, plan)
        updates[shared] = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters() if p.requires_grad}
        passes = {(part, grad): sum(rows for p, rows, g in calls if (p, g) == (part, grad))
                  for part, grad in (("values", False), ("both", True))}
        # 8 rows: 2 epochs x 2 optimizer steps x 2 micro-batches of 2 rows, each with a training forward pass.
        assert passes == {("values", False): 6 if shared else 8, ("both", True): 16}
    assert max(update.abs().max() for update in updates[False].values()) > 0.01  # the update moved the weights
    for name, update in updates[False].items():
        torch.testing.assert_close(updates[True][name], update, atol=1e-6, rtol=1e-4, msg=name)


def test_logs_every_health_metric_and_sample_completions(tiny_sft, tmp_path, reward_model):
    trainer = make_trainer(tiny_sft, tmp_path, reward_model=reward_model, reward_funcs=[], adaptive_kl=True,
                           kl_target=0.01, kl_horizon=100, max_steps=3)
    quiet(trainer.train)
    logs = [e for e in trainer.state.log_history if "objective/kl" in e]
    assert [e["step"] for e in logs] == [1, 2, 3]
    for key in ("reward/rm_raw", "reward/rm", "objective/kl", "objective/kl_coef", "policy/entropy", "policy/clipfrac",
                "value/clipfrac", "policy/approx_kl", "loss/value", "loss/policy", "value/explained_variance",
                "objective/response_length", "objective/stop_rate", "learning_rate", "episode"):
        assert all(key in e for e in logs), key
    assert logs[0]["objective/kl"] == pytest.approx(0, abs=1e-6)  # a fresh adapter is the reference
    assert logs[-1]["objective/kl_coef"] != logs[0]["objective/kl_coef"]  # the adaptive controller moved
    samples = [json.loads(line) for line in (tmp_path / "ppo/completions.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"prompt", "completion", "score", "stopped"} <= set(samples[0])


# ------------------------------------------------------------------------------------------------ the recipe


def run_ppo(tiny_sft, tiny_reward, out, callbacks=None, **overrides):
    settings = {"model_name_or_path": tiny_sft, "reward_model_path": tiny_reward, "output_dir": str(out), **overrides}
    return quiet(load_recipe("ppo"), ["--config", "recipes/configs/ppo/tiny.yaml"], overrides=settings,
                 callbacks=callbacks)


def test_save_model_writes_the_adapter_and_tokenizer_only(tiny_sft, tmp_path):
    """PPO's save is its own (`PPOTrainer._save`), not Trainer's: a standard PEFT adapter and the tokenizer, and no
    pickled training_args.bin (the recipe saves the config as YAML; the other stages delete Trainer's in write_stage).
    The README.md there is PEFT's placeholder, which `publish_stage` replaces with rlhf-kit's card."""
    trainer = make_trainer(tiny_sft, tmp_path)
    trainer.save_model(str(tmp_path / "saved"))
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= files
    assert "training_args.bin" not in files
    assert is_adapter_dir(tmp_path / "saved")


def test_ppo_raises_held_out_reward_with_bounded_kl(tiny_sft, tiny_reward, tmp_path):
    out = tmp_path / "ppo"
    # A short run: twice the shipped learning rate, as the shortened pipeline test.
    trainer = run_ppo(tiny_sft, tiny_reward, out, max_steps=25, learning_rate=1e-3, save_strategy="no",
                      eval_strategy="no")
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    metrics = record["metrics"]
    # Held-out prompts, one sample each at the training temperature: the SFT policy (step 0) against the PPO policy.
    assert metrics["eval_reward/rm"] > metrics["eval_reward/rm_at_start"] + 0.5, metrics
    assert metrics["eval_kl"] < 10.0, metrics
    assert metrics["eval_kl_at_start"] == pytest.approx(0.0, abs=1e-4)
    assert record["stage"] == "ppo" and record["parent"]["stage"] == "sft"

    # The policy is a standard PEFT adapter on the merged SFT weights; the critic sits in critic/.
    assert (out / "adapter_model.safetensors").is_file() and (out / "critic/value_head.safetensors").is_file()
    assert (out / "README.md").is_file() and (out / "completions.jsonl").is_file()
    assert (out / "trainer_state.json").is_file()
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    rollout = trainer.rollout(HELD_OUT[:4])
    expected = response_logprobs(reloaded, rollout, trainer.args.temperature)
    real = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.old_logprobs[real], expected[real], atol=1e-5, rtol=0)


def response_logprobs(model, rollout, temperature):
    """(B, T) log-probs of the rollout's response tokens under a plain transformers model, computed independently of
    the trainer (positions counted over real tokens, as `generate` counts them)."""
    with torch.no_grad():
        logits = model.eval()(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                              position_ids=(rollout.attention_mask.cumsum(1) - 1).clamp(min=0)).logits
    width = rollout.response_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, -width - 1 : -1] / temperature, -1)
    return logprobs.gather(-1, rollout.response_ids[..., None])[..., 0]


def test_ppo_from_a_lora_sft_adapter_starts_from_the_merged_sft_model(tiny_base, sft_straight, tmp_path):
    """The SFT recipe's default output is a LoRA adapter: PPO merges it into its base, trains a new policy adapter on
    the merged weights, and its reference (the adapter disabled) is the SFT model, so the KL starts at 0."""
    sft_dir = sft_straight  # the LoRA SFT run the resume tests compare against; read, never written, here
    assert is_adapter_dir(sft_dir)
    out = tmp_path / "ppo"
    trainer = run_ppo(str(sft_dir), "", out, reward_funcs=["rlhf_kit.tasks.review:gold"], eval_reward_funcs=[],
                      max_steps=2, per_device_train_batch_size=8, response_length=8, learning_rate=1e-2,
                      save_strategy="no", eval_strategy="no", eval_on_start=True,
                      eval_dataset_name="data/examples/prompts_standard.jsonl")
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    metrics = record["metrics"]
    assert metrics["eval_kl_at_start"] == pytest.approx(0.0, abs=1e-4)  # and the health check passed
    assert metrics["eval_kl"] > 1e-3  # it trained away from the reference

    # The policy adapter records the merged SFT model, built from the adapter as it is now, as its base.
    merged = merged_cache_path(sft_dir)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(merged)
    assert is_fresh_merge(merged, merge_key(sft_dir))
    trained = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [name for name in trained if "lora_B" in name]
    assert lora_b and all(trained[name].abs().max() > 0 for name in lora_b)  # each B started at 0

    # The reference log-probs are those of base + SFT adapter, merged in memory with plain peft.
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), sft_dir).merge_and_unload()
    rollout = trainer.rollout(HELD_OUT[:4])
    expected = response_logprobs(sft_model, rollout, trainer.args.temperature)
    real = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.ref_logprobs[real], expected[real], atol=1e-5, rtol=0)

    # The saved config runs again: it parses into the recipe's dataclasses, the reward sources' keys included, and
    # the stage record keeps them as flat keys. (Last: a new TrainingArguments resets accelerate's state.)
    *_, sources = parse_config(*recipe_arguments("ppo"), args=["--config", str(out / "rlhf_kit_config.yaml")])
    assert sources == RewardSources(reward_model_path="", reward_funcs=["rlhf_kit.tasks.review:gold"],
                                    missing_eos_penalty=1.0)
    assert record["config"]["reward_funcs"] == ["rlhf_kit.tasks.review:gold"]


def test_resume_after_interruption_matches_uninterrupted_run(tiny_sft, tiny_reward, ppo_straight, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_ppo(tiny_sft, tiny_reward, out, callbacks=[Interrupt(at_step=3)], **PPO_SHORT)
    ckpt = out / "checkpoint-2"
    assert ckpt.is_dir() and not (out / "checkpoint-4").exists()
    for name in ("adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/value_head.safetensors",
                 "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "ppo_state.json", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "ppo_state.json").read_text())["data_batch"] == 2

    resumed = run_ppo(tiny_sft, tiny_reward, out, **PPO_SHORT)  # the same command again
    def steps(log_history):
        return {e["step"]: e for e in log_history if "objective/kl" in e}

    straight = steps(json.loads((ppo_straight / "trainer_state.json").read_text())["log_history"])
    assert sorted(steps(resumed.state.log_history)) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "policy/clipfrac"):
            assert steps(resumed.state.log_history)[step][key] == pytest.approx(straight[step][key], rel=1e-4,
                                                                                abs=1e-6), key
    # The record describes the whole run, not only the updates after the resume (issue 15, item 4).
    def record_loss(out):
        return json.loads((out / "rlhf_kit_stage.json").read_text())["metrics"]["train_loss"]

    assert record_loss(out) == pytest.approx(record_loss(ppo_straight), rel=1e-4)


def test_a_full_critic_is_a_whole_model_saved_in_critic(tiny_sft, tiny_reward, tmp_path):
    out = tmp_path / "full"
    trainer = run_ppo(tiny_sft, tiny_reward, out, critic="full", max_steps=2, eval_on_start=False, save_strategy="no",
                      eval_strategy="no")
    assert trainer.model.critic is not None and trainer.model.value_head is None
    assert (out / "critic/model.safetensors").is_file()


@pytest.mark.parametrize("recipe", ["ppo", "grpo", "rloo", "best_of_n"])
def test_every_rl_recipe_parses_its_reward_sources_from_one_dataclass(recipe):
    """The reward keys (reward_model_path, reward_funcs, the gate, ...) are declared once, in RewardSources: the same
    keys, help and defaults for every method. PPO once declared its own copy, with the gate's threshold as a literal
    and help texts that had drifted."""
    classes = recipe_arguments(recipe)
    assert RewardSources in classes
    others = [c for c in classes if c is not RewardSources]
    assert not set(field_names(RewardSources)) & set(field_names(*others))
    parsed = dict(zip(classes, parse_config(*classes, args=["--config", f"{REPO}/recipes/configs/{recipe}/tiny.yaml"])))
    assert parsed[RewardSources].min_reward_accuracy == DEFAULT_MIN_ACCURACY
    assert parsed[RewardSources].reward_model_path == "outputs/tiny-reward"


def test_ppo_and_grpo_refuse_a_stage_without_reward_with_one_message(tiny_base, tmp_path):
    tokenizer = load_tokenizer(tiny_base)
    for recipe in ("ppo", "grpo"):
        with pytest.raises(ValueError) as error:
            load_recipe(recipe)(["--config", f"recipes/configs/{recipe}/tiny.yaml"], overrides={
                "model_name_or_path": tiny_base, "reward_model_path": None, "output_dir": str(tmp_path / recipe)})
        assert str(error.value) == NO_REWARD, recipe
    with pytest.raises(ValueError) as error:  # the trainer on its own, with only evaluation rewards
        PPOTrainer(model=None, args=PPOConfig(output_dir=str(tmp_path), **PPO_FAST), processing_class=tokenizer,
                   train_dataset=PROMPTS, rewards=Rewards(eval_funcs=[positivity]))
    assert str(error.value) == NO_REWARD
