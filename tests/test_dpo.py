"""Stage 4, DPO: through the real recipe on the tiny SFT model, held-out pairs get ranked, the reference is the
adapter-disabled SFT model, and bad settings fail before a model loads."""

import json
import math

import pytest
import torch
from conftest import load_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer


pytestmark = pytest.mark.usefixtures("single_thread")


def run_dpo(model, out, **overrides):
    return load_recipe("dpo")(["--config", "recipes/configs/dpo/tiny.yaml"], overrides={
        "model_name_or_path": model, "output_dir": str(out), "save_strategy": "no", "logging_steps": 5, **overrides})


def test_dpo_ranks_held_out_pairs_against_the_adapter_disabled_sft_model(tiny_sft, tmp_path):
    out = tmp_path / "dpo"
    trainer = run_dpo(tiny_sft, out, max_steps=20, eval_on_start=True, eval_steps=20)
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    metrics = record["metrics"]
    # At the start the policy is the reference: every implicit reward is 0, so the loss is log 2 and no pair is
    # ranked (a tie counts as wrong). After 20 steps most of the 300 held-out pairs are ranked as the gold annotator
    # ranks them (about 0.64 at this length; the full tiny config reaches more).
    assert metrics["eval_loss_at_start"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["eval_rewards/accuracies_at_start"] == 0.0
    assert metrics["eval_rewards/accuracies"] > 0.6, metrics
    assert metrics["eval_loss"] < math.log(2) - 0.01 and metrics["eval_rewards/margins"] > 0, metrics
    assert record["stage"] == "dpo" and record["parent"]["stage"] == "sft"
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert (out / "trainer_state.json").is_file()

    # No second model: the reference is the policy with its adapter disabled, which is the SFT model exactly.
    assert trainer.ref_model is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_sft)
    batch = tokenizer.apply_chat_template([[{"role": "user", "content": "Review the tea."}]],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    sft = AutoModelForCausalLM.from_pretrained(tiny_sft).eval()
    policy = trainer.model.eval()
    with torch.no_grad():
        expected = sft(**batch).logits
        with policy.disable_adapter():
            reference = policy(**batch).logits
        trained = policy(**batch).logits
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    assert (trained - expected).abs().max() > 1e-3  # and the adapter did learn something


def test_contradictory_settings_fail_before_a_model_loads(tmp_path):
    with pytest.raises(ValueError, match="sync_ref_model"):
        run_dpo("no/such/model", tmp_path, sync_ref_model=True)
    with pytest.raises(ValueError, match="no evaluation split"):
        run_dpo("no/such/model", tmp_path, eval_dataset_name="data/preference", dataset_test_split="nope")
