"""The memory preflight: parameter counts against published ones, the byte arithmetic on a hand-computed case,
sharding by profile, and `rlhf-kit plan` on every shipped training config without loading a model."""

import dataclasses

import pytest
import yaml
from conftest import REPO

from rlhf_kit import cli
from rlhf_kit.config import ConfigError
from rlhf_kit.plan import GIB, SHAPES, STAGES, Shape, Sharding, estimate, model_shape
from rlhf_kit.stages import recipe_arguments


def test_parameter_counts_match_the_published_ones():
    assert SHAPES["8b"].params == 8_030_261_248  # Llama-3.1-8B
    assert SHAPES["1b"].params == 1_235_814_400  # Llama-3.2-1B (tied embeddings)
    assert SHAPES["70b"].params == 70_553_706_496  # Llama-3.1-70B
    # PEFT's count for r=16 on all seven linear layers of an 8B LLaMA.
    assert SHAPES["8b"].lora_params(16, "all-linear") == 41_943_040
    assert SHAPES["8b"].lora_params(16, ["q_proj", "v_proj"]) == 32 * ((4096 + 4096) + (4096 + 1024)) * 16
    assert model_shape("meta-llama/Llama-3.1-8B") is SHAPES["8b"]
    with pytest.raises(ValueError, match="config.json"):
        model_shape("someone/mystery-model")


def test_bytes_of_a_hand_computed_full_finetune():
    """hidden 4, intermediate 8, 1 layer, 2 heads of width 2 (1 kv head: kv width 2), vocab 10, tied.

    Parameters: q 4x4 + k 4x2 + v 4x2 + o 4x4 + gate 4x8 + up 4x8 + down 8x4 = 144, two norms 8, embedding 40,
    final norm 4: 196. fp32 full fine-tuning: weights 196 x 4 = 784, gradients 784, AdamW 2 x 784 = 1568.
    One sequence of 2 tokens: activations 2 x (11 x 4 + 3 x 2 + 4 x 8 = 82) x 4 = 656; logits 2 x 10 x 4 x 2 = 160.
    """
    shape = Shape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, vocab=10, tied=True)
    assert shape.params == 196
    config = {"dtype": "float32", "use_peft": False, "per_device_train_batch_size": 1, "max_length": 2,
              "gradient_checkpointing": False}
    parts = estimate(config, "sft", shape=shape).parts
    assert parts == {"weights": 784, "gradients": 784, "optimizer": 1568, "activations": 656, "logits": 160}
    # Gradient checkpointing keeps one hidden state per layer (2 x 4 x 4 = 32) plus one layer recomputed (656).
    assert estimate({**config, "gradient_checkpointing": True}, "sft", shape=shape).parts["activations"] == 32 + 656
    # A reward model scores with a 1-wide head (no vocab logits) and sees chosen and rejected: twice the activations.
    reward = estimate(config, "reward", shape=shape).parts
    assert reward["logits"] == 0 and reward["activations"] == 2 * 656


def test_profiles_divide_what_they_shard():
    config = {"model_name_or_path": "meta-llama/Llama-3.1-8B", "dtype": "bfloat16", "use_peft": False,
              "per_device_train_batch_size": 1, "max_length": 1024, "gradient_checkpointing": True}
    one = estimate(config, "sft").parts
    profile = lambda name: Sharding.from_profile(REPO / "accelerate_configs" / f"{name}.yaml", gpus=8)  # noqa: E731
    ddp, zero2, zero3 = (estimate(config, "sft", profile(n)).parts for n in ("ddp", "zero2", "zero3"))
    assert ddp == one
    assert zero2["weights"] == one["weights"] and zero2["gradients"] == one["gradients"] / 8
    # DeepSpeed's optimizer state for bf16 weights: fp32 master copy + two fp32 moments = 12 bytes, over 8 GPUs.
    assert zero2["optimizer"] == SHAPES["8b"].params * 12 / 8
    assert zero3["weights"] == one["weights"] / 8 and zero3["activations"] == one["activations"]
    assert estimate(config, "sft", profile("zero3_offload")).parts["optimizer"] == 0
    assert estimate(config, "sft", profile("fsdp2")).parts["weights"] == one["weights"] / 8
    # Bytes a parameter of full bf16 fine-tuning: the plain Trainer keeps AdamW's moments in bf16 (2 + 2 + 4), while
    # DeepSpeed adds an fp32 master copy and fp32 moments (2 + 2 + 12), the well-known 16.
    state = lambda p: (p["weights"] + p["gradients"] + p["optimizer"]) / SHAPES["8b"].params  # noqa: E731
    assert state(one) == 8
    assert state(estimate(config, "sft", Sharding(gpus=1, master_copy=True)).parts) == 16


@pytest.mark.parametrize("stage", STAGES)
def test_a_default_written_out_plans_the_same_as_left_out(stage):
    """The plan reads a missing key as the recipe does: the default of the recipe's dataclass, not a copy of it.

    Before, the plan kept its own defaults, and they had drifted: gradient checkpointing off (TRL's configs: on), 256
    response tokens for GRPO/RLOO (512), 8 generations for RLOO (2), a bfloat16 model under bf16 (float32 unless
    dtype says otherwise).
    """
    shape = Shape(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, vocab=512, tied=False)
    types = recipe_arguments(stage)
    defaults = {f.name: f.default for t in types for f in dataclasses.fields(t)
                if f.init and f.default is not dataclasses.MISSING and isinstance(f.default, (bool, int, float, str))}
    for config in ({"bf16": True}, {"bf16": True, "use_peft": True}):
        config = {k: v for k, v in config.items() if k in defaults}
        left_out = estimate(config, stage, shape=shape).parts
        assert estimate({**defaults, **config}, stage, shape=shape).parts == left_out, config
    with pytest.raises(ConfigError, match="Unknown config key 'lora_rank'.*Did you mean 'lora_r'"):
        estimate({"lora_rank": 8}, "sft", shape=shape)


def shipped_training_configs():
    return sorted(p for stage in STAGES for p in (REPO / "recipes/configs" / stage).glob("*.yaml"))


def test_plans_every_shipped_training_config_without_loading_a_model(monkeypatch, capsys):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("plan loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_loading)
    configs = shipped_training_configs()
    assert len(configs) >= 8
    for config in configs:
        model = yaml.safe_load(config.read_text()).get("model_name_or_path", "")
        # Tiny configs start from outputs/ of earlier stages, absent in a fresh checkout: plan them for a 1B.
        override = ["--model", "meta-llama/Llama-3.2-1B"] if str(model).startswith("outputs/") else []
        assert cli.main(["plan", str(config), *override]) == 0, config
        out = capsys.readouterr().out
        assert "peak" in out and "GiB" in out, out


def test_says_whether_it_fits_the_visible_gpus(monkeypatch, capsys):
    config = str(REPO / "recipes/configs/sft/llama-8b-qlora.yaml")
    monkeypatch.setattr("rlhf_kit.plan.visible_gpus", lambda: [])
    assert cli.main(["plan", config]) == 0
    assert "no GPU visible" in capsys.readouterr().out
    monkeypatch.setattr("rlhf_kit.plan.visible_gpus", lambda: [("Test GPU", 24 * GIB)])
    assert cli.main(["plan", config]) == 0  # QLoRA 8B at these settings: the config says 24 GB is enough
    assert "Test GPU: 24.0 GiB -> fits" in capsys.readouterr().out
    assert cli.main(["plan", config, "--model", "meta-llama/Llama-3.1-70B"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert cli.main(["plan", str(REPO / "recipes/configs/export/tiny.yaml")]) == 2
    assert "pass --stage" in capsys.readouterr().err


def test_ppo_with_vllm_counts_the_engines_copy_and_what_it_reserves(monkeypatch, capsys, tmp_path):
    """generation_backend: vllm adds vLLM's own copy of the weights (compute dtype) and its KV cache for the whole
    rollout, drops transformers' generation cache, and on a GPU counts what vLLM reserves when that is more."""
    config = yaml.safe_load((REPO / "recipes/configs/ppo/llama-8b-lora.yaml").read_text())
    hf = estimate(config, "ppo")
    ours = estimate({**config, "generation_backend": "vllm"}, "ppo")
    shape = SHAPES["8b"]
    rollout, seq = 8 * 2 * 4, 512 + 256  # per_device x accumulation x mini-batches; max prompt + response
    kv = 2 * shape.layers * shape.kv_width * rollout * seq * 2
    assert ours.parts["vllm engine"] == shape.params * 2 + kv
    assert ours.parts["kv cache"] == 0 and hf.parts["kv cache"] > 0
    assert {k: v for k, v in ours.parts.items() if k not in ("vllm engine", "kv cache")} == \
        {k: v for k, v in hf.parts.items() if k != "kv cache"}
    # vLLM takes vllm_gpu_memory_utilization of the GPU even when its weights and cache need less.
    assert ours.needed_on(80e9) == ours.needed + max(0.3 * 80e9 - ours.parts["vllm engine"], 0)
    assert ours.needed_on(400e9) > ours.needed  # 30% of 400 GB is more than the engine needs
    fixed = estimate({**config, "generation_backend": "vllm", "vllm_kv_cache_gb": 40}, "ppo")
    assert fixed.needed_on(80e9) == fixed.needed + shape.params * 2 + 40 * GIB - fixed.parts["vllm engine"]
    # The command: 8B LoRA PPO with vLLM colocated fits one 80 GB GPU, not a 48 GB one.
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({**config, "generation_backend": "vllm"}))
    monkeypatch.setattr("rlhf_kit.plan.visible_gpus", lambda: [("H100", 80 * 10**9)])
    assert cli.main(["plan", str(path), "--stage", "ppo"]) == 0
    out = capsys.readouterr().out
    assert "vllm engine" in out and "vLLM reserves 30%" in out and "-> fits" in out
    monkeypatch.setattr("rlhf_kit.plan.visible_gpus", lambda: [("L40S", 48 * 10**9)])
    assert cli.main(["plan", str(path), "--stage", "ppo"]) == 1
