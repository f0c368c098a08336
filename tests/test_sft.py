"""Stage 2: LoRA / QLoRA / full SFT through the real recipe on the tiny model: loss falls, adapters reload, resume."""

import json

import pytest
import torch
from conftest import SFT_SHORT, Interrupt, StepRecorder, load_recipe, losses
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

FAST = {
    "max_steps": 12, "per_device_train_batch_size": 8, "logging_steps": 1, "eval_strategy": "no",
    "save_strategy": "no", "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler_type": "constant",
    "disable_tqdm": True, "max_length": 64, "report_to": "none",
}


def run_sft(tiny_base, out, **overrides):
    main = load_recipe("sft")
    callbacks = overrides.pop("callbacks", None)
    return main(["--config", "recipes/configs/sft/tiny.yaml"], callbacks=callbacks,
                overrides={"model_name_or_path": tiny_base, "output_dir": str(out), **FAST, **overrides})


def logits(model, tok):
    batch = tok.apply_chat_template([[{"role": "user", "content": "Review the coffee."}]], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**batch).logits


def test_lora_sft_learns_and_adapter_reloads_identically(tiny_base, tmp_path):
    out = tmp_path / "sft"
    trainer = run_sft(tiny_base, out)
    curve = losses(trainer.state.log_history)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.3, curve  # nats

    # The output dir is a standard PEFT adapter plus the tokenizer that carries the chat template.
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template is not None and tok.pad_token_id != tok.eos_token_id
    trained = trainer.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out).eval()
    torch.testing.assert_close(logits(reloaded, tok), logits(trained, tok), rtol=0, atol=1e-5)
    assert json.loads((out / "rlhf_kit_stage.json").read_text())["stage"] == "sft"
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "- sft" in card and "pretrain" in card  # Hub metadata and the lineage
    assert (out / "rlhf_kit_config.yaml").is_file()


def test_sft_trains_only_assistant_tokens_including_stop(tiny_base, tmp_path):
    trainer = run_sft(tiny_base, tmp_path / "sft", max_steps=1)
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    trained = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained and "user" not in trained


def test_full_finetune_and_prompt_completion_format(tiny_base, tmp_path):
    out = tmp_path / "full"
    trainer = run_sft(tiny_base, out, use_peft=False, max_steps=4,
                      dataset_name="data/examples/sft_prompt_completion.jsonl", learning_rate=1e-3)
    assert trainer.args.assistant_only_loss is False
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    row = trainer.train_dataset[0]
    prompt_len = len(trainer.processing_class(row["prompt"], add_special_tokens=False)["input_ids"])
    # Completion-only loss: the prompt is masked out, the completion and its stop token are trained.
    assert row["labels"][:prompt_len] == [-100] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert row["input_ids"][-1] == trainer.processing_class.eos_token_id


def test_bad_row_fails_before_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 1: field 'messages'"):
        run_sft("/no/such/model", tmp_path / "o", dataset_name=str(bad))


def test_push_to_hub_fails_before_training_without_repo_id_or_token(tmp_path, monkeypatch):
    from rlhf_kit.config import ConfigError

    with pytest.raises(ConfigError, match="hub_model_id"):
        run_sft("/no/such/model", tmp_path / "o", push_to_hub=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login either
    # Offline (as in tests) or without a token, the push cannot happen: say so before any model loads.
    with pytest.raises(Exception, match="HF_HUB_OFFLINE|token"):
        run_sft("/no/such/model", tmp_path / "o", push_to_hub=True, hub_model_id="me/tiny-sft")


def test_resume_after_interruption_matches_uninterrupted_run(tiny_base, sft_straight, tmp_path):
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_sft(tiny_base, out, callbacks=[Interrupt(at_step=5)], **SFT_SHORT)
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-6").exists()
    recorder = StepRecorder()
    # The same command again: it picks up checkpoint-4 by itself and trains only steps 5-6.
    resumed = run_sft(tiny_base, out, callbacks=[recorder], **SFT_SHORT)
    assert recorder.steps == [5, 6]
    # The history of steps 1-4 comes back from the checkpoint; steps 5-6 are trained again after the resume.
    steps = [e["step"] for e in resumed.state.log_history if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]
    straight = json.loads((sft_straight / "checkpoint-6/trainer_state.json").read_text())["log_history"]
    assert losses(resumed.state.log_history) == pytest.approx(losses(straight), rel=1e-4)
    # The record describes the whole run, not only the steps trained after the resume (issue 15, item 4).
    assert record_loss(out) == pytest.approx(record_loss(sft_straight), rel=1e-4)
    assert record_loss(out) != pytest.approx(sum(losses(resumed.state.log_history)[4:]) / 2)


def record_loss(out):
    return json.loads((out / "rlhf_kit_stage.json").read_text())["metrics"]["train_loss"]


def test_qlora_4bit_sft_on_cpu(tiny_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    trainer = run_sft(tiny_base, out, load_in_4bit=True, use_bnb_nested_quant=True, max_steps=10)
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit
    assert "Linear4bit" in type(base.model.layers[0].self_attn.q_proj.base_layer).__name__
    curve = losses(trainer.state.log_history)
    assert sum(curve[-3:]) < sum(curve[:3]), curve
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded, PeftModel)
