"""PPO's policy-and-critic module on tiny random models of several families: the log-probs PPO trains on are the
ones `generate` samples from, and activation checkpointing gives both adapters the gradients of a plain backward."""

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

from rlhf_kit.training.ppo.rollout import left_pad
from rlhf_kit.training.ppo.losses import logprobs_from_logits
from rlhf_kit.training.ppo.model import CRITIC, POLICY, PolicyAndCritic, SampledLogprobs, build_policy_and_critic

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# Each family with what its head does after lm_head set far from identity, so skipping it shows.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {}),
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 2.0, "head_dim": 32}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0}),
    "cohere": ("CohereConfig", {"logit_scale": 3.0}),
}


def tiny_lm(family: str, seed: int = 0) -> nn.Module:
    config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**SHAPE, **extra)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def lora(r: int = 8) -> LoraConfig:
    # Random A and B (not B = 0): every LoRA weight then gets a non-zero gradient that checkpointing could get wrong.
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False,
                      task_type="CAUSAL_LM")


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_logprobs_are_what_generate_samples_from(family):
    """The log-probs of the tokens `generate` picks equal the policy's training forward on the same rows (adapter
    B = 0 at the start, so policy = base): the head's transforms (soft-capping, scaling) are not skipped."""
    lm = tiny_lm(family)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")  # B = 0
    model = build_policy_and_critic(lm, config, critic="lora").eval()
    prompts = [[5, 9, 17, 33, 7], [11, 4, 60]]
    query_ids, query_mask = left_pad(prompts, pad_token_id=0)
    steps = 6
    with torch.no_grad():
        out = lm.generate(input_ids=query_ids, attention_mask=query_mask, do_sample=False, max_new_tokens=steps,
                          min_new_tokens=steps, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        sampled = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, T, V)
        ids = out.sequences
        mask = torch.cat([query_mask, torch.ones(len(prompts), steps, dtype=query_mask.dtype)], dim=1)
        policy = model(ids, mask, steps, part="policy").float().log_softmax(-1)
        reference = model(ids, mask, steps, part="reference").float().log_softmax(-1)
    assert (policy - sampled).abs().max() < 1e-4
    assert (reference - sampled).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_the_logprobs_recorded_while_sampling_are_the_training_forwards(family):
    """PPO's rollout takes its old log-probs from `generate` (rollout_logprobs: sampler): at each step the recorder
    must score the token that step sampled, with the adapter active, the head's transforms and the temperature, as
    the training forward scores it; on left-padded rows of different lengths."""
    lm = tiny_lm(family)
    model = build_policy_and_critic(lm, lora(), critic="lora").eval()  # random B: the policy is not the base
    query_ids, query_mask = left_pad([[5, 9, 17, 33, 7], [11, 4, 60], [8, 8, 90, 21]], pad_token_id=0)
    steps, temperature = 7, 0.6
    model.lm.generation_config = transformers.GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=steps, pad_token_id=0,
        eos_token_id=None)  # as PPO's: no processor that bans a token (min_new_tokens would, and change the scores)
    recorder = SampledLogprobs(temperature)
    torch.manual_seed(0)
    with torch.no_grad():
        new = model(query_ids, query_mask, part="generate", logits_processor=[recorder])[:, query_ids.shape[1]:]
        recorded = recorder.logprobs(new)
        mask = torch.cat([query_mask, torch.ones_like(new)], dim=1)
        logits = model(torch.cat([query_ids, new], dim=1), mask, steps, part="policy")
    assert recorded.shape == new.shape == (3, steps)
    torch.testing.assert_close(recorded, logprobs_from_logits(logits, new, temperature), atol=1e-5, rtol=0)
    # Scored at the wrong step, the log-probs would be far off: the check above can tell.
    assert (recorded[:, 1:] - logprobs_from_logits(logits[:, :-1], new[:, 1:], temperature)).abs().max() > 0.1


def forward_and_backward(model: PolicyAndCritic) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward of a loss that depends on both the policy logits and the critic values: the logits,
    the values and the gradients."""
    model.train()
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    logits, values = model(ids, mask, 5)
    (logits.float().logsumexp(-1).sum() + values.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), values.detach(), grads


def gradients(model: PolicyAndCritic) -> dict[str, torch.Tensor]:
    return forward_and_backward(model)[2]


def policy_and_critic(critic_rank: int, checkpointing: bool) -> PolicyAndCritic:
    policy = get_peft_model(tiny_lm("llama"), lora(8), adapter_name=POLICY)
    torch.manual_seed(1)
    policy.add_adapter(CRITIC, lora(critic_rank))
    head = nn.Linear(64, 1)  # random, so the critic adapter gets a gradient at all
    model = PolicyAndCritic(policy, value_head=head)
    if checkpointing:
        model.enable_activation_checkpointing()
    return model


@pytest.mark.parametrize("critic_rank", [8, 16])
def test_activation_checkpointing_gives_both_adapters_their_own_gradients(critic_rank):
    """Backward recomputes each checkpointed layer; it must do so with the adapter that layer ran with. Before the
    fix the critic's gradients were 94-342% off with equal ranks and backward raised CheckpointError with unequal."""
    plain = gradients(policy_and_critic(critic_rank, checkpointing=False))
    checkpointed = gradients(policy_and_critic(critic_rank, checkpointing=True))
    assert plain.keys() == checkpointed.keys()
    for adapter in (POLICY, CRITIC):
        names = [n for n in plain if f".{adapter}." in n]
        assert len(names) == 2 * 7 * 2, f"expected A and B of 7 modules in 2 layers for {adapter}, got {len(names)}"
        for name in names:
            assert plain[name].abs().max() > 0, name
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(checkpointed["value_head.weight"], plain["value_head.weight"])


def test_reentrant_checkpointing_is_refused():
    model = policy_and_critic(8, checkpointing=False)
    with pytest.raises(ValueError, match="non-reentrant"):
        model.enable_activation_checkpointing({"use_reentrant": True})


def test_reference_pass_keeps_both_adapters_trainable():
    """PEFT's disable_adapter freezes the adapters; the next training forward must still reach both."""
    model = policy_and_critic(8, checkpointing=False)
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        model(ids, torch.ones_like(ids), 3, part="reference")
    assert all(p.requires_grad for p in model.trainable)
    grads = gradients(model)
    assert any(f".{CRITIC}." in n for n in grads) and any(f".{POLICY}." in n for n in grads)
