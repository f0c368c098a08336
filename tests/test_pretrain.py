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


def test_bfd_split_packing_keeps_each_document_that_fits_in_one_block():
    # With `wrapped`, a document that refers back to its own start (a shop paragraph's questions to its passages)
    # is cut away from it whenever a block boundary falls inside it; `bfd_split` keeps it whole.
    from datasets import Dataset

    texts = ["The coffee is great.", "I bought a new phone yesterday.", "The book was on the table.", "Yes."] * 3
    tok = train_tokenizer(texts * 20, vocab_size=300)
    docs = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in texts]
    size = max(len(d) for d in docs) + 2
    wrapped = pack_blocks(Dataset.from_dict({"text": texts}), tok, block_size=size)["input_ids"]
    blocks = pack_blocks(Dataset.from_dict({"text": texts}), tok, block_size=size, packing="bfd_split")["input_ids"]

    def whole(block_list):  # documents that lie whole inside one block
        return sum(any(str(d)[1:-1] in str(b) for b in block_list) for d in docs)

    assert whole(blocks) == len(docs) > whole(wrapped)  # wrapped cuts some documents, bfd_split none
    assert all(len(b) <= size for b in blocks)
    assert sorted(t for b in blocks for t in b) == sorted(t for d in docs for t in d)  # no token lost or added


def test_a_document_longer_than_a_block_is_split_not_dropped():
    from datasets import Dataset

    texts = ["The coffee is great. " * 6, "Yes."]
    tok = train_tokenizer(texts * 20, vocab_size=300)
    blocks = pack_blocks(Dataset.from_dict({"text": texts}), tok, block_size=8, packing="bfd_split")["input_ids"]
    tokens = sum(len(tok(x, add_special_tokens=False)["input_ids"]) + 1 for x in texts)
    assert all(len(b) <= 8 for b in blocks) and sum(len(b) for b in blocks) == tokens


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


def test_continued_pretraining_trains_on_each_document_end_when_the_pad_token_is_eos(tiny_base, tmp_path):
    # A base without a pad token (Llama 3's) gets EOS as its pad. The loss must still see the EOS that ends each
    # document, or the model never learns where documents end; transformers' collator dropped every one.
    import shutil

    base = tmp_path / "no-pad-base"
    shutil.copytree(tiny_base, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = None
    tok.save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base).pad_token is None

    trainer = load_recipe("pretrain")(["--config", "recipes/configs/pretrain/tiny.yaml"], overrides={
        "base_model": str(base), "output_dir": str(tmp_path / "out"), "max_steps": 1, "block_size": 64,
        "per_device_train_batch_size": 2, "eval_strategy": "no", "save_strategy": "no", "disable_tqdm": True,
        "report_to": "none"})
    eos = tok.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ends = batch["input_ids"] == eos
    assert ends.sum() > 0
    assert (batch["labels"][ends] == eos).all()  # every document end is a training target
