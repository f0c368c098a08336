"""The fused LoRA computation (rlhf_kit.training.fused_lora) is PEFT's LoRA: the same outputs and gradients on PPO's
policy-and-critic module, with and without activation checkpointing, and PEFT's own forward wherever it does not
apply."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

from rlhf_kit.training.fused_lora import FusedLoraLinear, fuse_lora, unfuse_lora
from rlhf_kit.training.ppo.model import POLICY, build_policy_and_critic
from test_ppo_model import forward_and_backward, gradients, lora, policy_and_critic, tiny_lm

FUSED_NODE = "_LoRALinearBackward"


def assert_same_up_to_rounding(got: dict, want: dict, scale: float = 1e-5):
    """Each tensor within `scale` of its own largest entry: float32 rounding in another summation order, while a
    missing scale, a wrong adapter or a dropped term would be off by the size of the gradient itself."""
    assert got.keys() == want.keys()
    for name in want:
        gap, size = (got[name] - want[name]).abs().max(), want[name].abs().max()
        assert size > 0 and gap <= scale * size, f"{name}: off by {gap:.3g}, largest entry {size:.3g}"


def first_lora_layer(model) -> LoraLinear:
    return next(m for m in model.modules() if isinstance(m, LoraLinear))


@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere"])
def test_fused_policy_and_critic_compute_what_peft_computes(family):
    peft = build_policy_and_critic(tiny_lm(family), lora(), critic="lora")
    with torch.no_grad():
        peft.value_head.weight.normal_()  # the zero-initialized head would give the critic adapter no gradient
    fused = copy.deepcopy(peft)
    assert fuse_lora(fused) == 2 * 7  # 7 linear layers in each of 2 blocks, each holding both adapters
    want_logits, want_values, want = forward_and_backward(peft)
    got_logits, got_values, got = forward_and_backward(fused)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_values, want_values, rtol=1e-5, atol=1e-6)
    assert sum(".lora_A." in n for n in got) == 2 * 2 * 7  # both adapters
    assert_same_up_to_rounding(got, want)


def test_the_fused_computation_runs_and_unfuse_restores_peft():
    model = build_policy_and_critic(tiny_lm("llama"), lora(), critic="lora", fused_lora=True)
    layer = first_lora_layer(model)
    assert type(layer) is FusedLoraLinear
    x = torch.randn(2, 5, 64, requires_grad=True)
    assert layer(x).grad_fn.name() == FUSED_NODE
    state = model.state_dict()
    unfuse_lora(model)
    assert type(layer) is LoraLinear and layer(x).grad_fn.name() != FUSED_NODE
    assert model.state_dict().keys() == state.keys()
    assert not any(isinstance(m, FusedLoraLinear) for m in
                   build_policy_and_critic(tiny_lm("llama"), lora(), critic="lora").modules())


@pytest.mark.parametrize("critic_rank", [8, 16])
def test_activation_checkpointing_replays_the_fused_layers_with_their_own_adapter(critic_rank):
    def fused(checkpointing):
        model = policy_and_critic(critic_rank, checkpointing=checkpointing)
        fuse_lora(model)
        return gradients(model)

    plain, checkpointed = fused(False), fused(True)
    assert_same_up_to_rounding(checkpointed, plain, scale=1e-6)
    assert_same_up_to_rounding(plain, gradients(policy_and_critic(critic_rank, checkpointing=False)))


def fused_and_peft_layer(**lora_kwargs):
    model = get_peft_model(tiny_lm("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                        **lora_kwargs), adapter_name=POLICY)
    peft = first_lora_layer(model)
    fused = copy.deepcopy(peft)
    fuse_lora(fused)
    assert type(fused) is FusedLoraLinear
    return fused, peft


def test_peft_forward_runs_where_the_fused_computation_does_not_apply():
    x = torch.randn(2, 5, 64, requires_grad=True)
    # Dropout on the adapter's input, in training: PEFT's forward samples the mask.
    fused, peft = fused_and_peft_layer(lora_dropout=0.5)
    fused.train()
    assert fused(x).grad_fn.name() != FUSED_NODE
    fused.eval()  # dropout is the identity in eval mode
    assert fused(x).grad_fn.name() == FUSED_NODE
    torch.testing.assert_close(fused(x), peft.eval()(x))
    # Adapters disabled (PPO's reference pass): the base layer alone.
    fused, peft = fused_and_peft_layer()
    with torch.no_grad():
        fused.enable_adapters(False)
        assert torch.equal(fused(x), fused.base_layer(x))
    # A base in another dtype than its adapters (bf16 base, float32 LoRA weights): PEFT's casts.
    fused, peft = fused_and_peft_layer()
    for layer in (fused, peft):
        layer.base_layer.to(torch.bfloat16)
    x16 = x.detach().to(torch.bfloat16).requires_grad_()
    out = fused(x16)
    assert out.grad_fn.name() != FUSED_NODE
    assert torch.equal(out, peft(x16))
    # Mixed adapter batches (adapter_names=...) go to PEFT too.
    fused, peft = fused_and_peft_layer()
    names = [POLICY, "__base__"]
    torch.testing.assert_close(fused(x, adapter_names=names), peft(x, adapter_names=names))


def test_ppo_fuses_by_default_and_not_when_asked(tiny_sft, tmp_path):
    from test_ppo import make_trainer

    fused = make_trainer(tiny_sft, tmp_path / "fused").model
    assert {type(m) for m in fused.modules() if isinstance(m, LoraLinear)} == {FusedLoraLinear}
    plain = make_trainer(tiny_sft, tmp_path / "plain", fused_lora=False).model
    assert {type(m) for m in plain.modules() if isinstance(m, LoraLinear)} == {LoraLinear}


def test_the_output_can_be_changed_in_place_downstream():
    """Some architectures scale a projection's output in place; a view made inside the autograd Function could not be."""
    fused, peft = fused_and_peft_layer()
    x = torch.randn(2, 5, 64, requires_grad=True)
    out = fused(x)
    out.mul_(2.0)
    out.sum().backward()
    want = peft(x.detach().requires_grad_()) * 2.0
    torch.testing.assert_close(out, want)
