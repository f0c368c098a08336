"""Stage 1: the tiny base model is trained from scratch and saved as an ordinary Hugging Face model directory."""

import json

import torch
from conftest import load_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_kit.training.pretraining import pack_blocks, train_tokenizer


def test_pack_blocks_keeps_every_token():
    from datasets import Dataset

    texts = ["The coffee is great.", "I bought a new phone yesterday.", "The book was on the table."]
    tok = train_tokenizer(texts * 20, vocab_size=300)
    blocks = pack_blocks(Dataset.from_dict({"text": texts}), tok, block_size=4)
    flat = [t for b in blocks["input_ids"] for t in b]
    expected = [t for x in texts for t in tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert flat == expected
    assert all(len(b) == 4 for b in blocks["input_ids"][:-1]) and 0 < len(blocks["input_ids"][-1]) <= 4


def test_tiny_pretraining_produces_loadable_model(tmp_path):
    out = tmp_path / "base"
    main = load_recipe("pretrain")
    trainer = main(["--config", "recipes/configs/pretrain/tiny.yaml"], overrides={
        "output_dir": str(out), "max_steps": 40, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512,
        "per_device_train_batch_size": 8, "logging_steps": 5, "eval_strategy": "no", "save_strategy": "no",
        "warmup_steps": 2, "disable_tqdm": True,
    })
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged[-1] < logged[0] - 1.0, logged  # nats; uniform over the vocabulary is ln(512) = 6.2

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size
    assert tok.chat_template is None  # a base model; SFT installs the template
    ids = tok("The coffee is", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    assert tok.decode(tok("The coffee is great.").input_ids) == "The coffee is great."
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    assert record["stage"] == "pretrain" and record["metrics"]["eval_loss"] > 0
