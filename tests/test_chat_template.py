"""Assistant-only SFT with real model families' chat templates, on tiny models that carry them (nothing downloaded).

The templates are the families' own, as TRL ships them (Llama 3.1, Llama 3.2, Qwen 2.5, Gemma) or as the model
repositories publish them (Mistral Instruct v0.1, a plain ChatML without generation markers). Each test trains the
real SFT recipe and reads back what it trained on: exactly each assistant turn's content and its end-of-turn token.
"""

import importlib.resources
import json

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import load_recipe
from rlhf_kit.data.chat_template import (RENDERED, TRL_TEMPLATE, TemplateError, assistant_mask_source,
                                    tokenize_for_assistant_loss)
from rlhf_kit.model import prepare_tokenizer

TRL_TEMPLATES = importlib.resources.files("trl") / "chat_templates"

MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
PLAIN_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
          "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]

# family: template, special tokens, bos, eos, pad, the end-of-turn token, how assistant tokens are found, system turn
FAMILIES = {
    "llama3.1": ((TRL_TEMPLATES / "llama3_1.jinja").read_text(), LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
                 "<|finetune_right_pad_id|>", "<|eot_id|>", RENDERED, True),
    "llama3.2": ((TRL_TEMPLATES / "llama3_2.jinja").read_text(), LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
                 "<|finetune_right_pad_id|>", "<|eot_id|>", RENDERED, True),
    "qwen2.5": ((TRL_TEMPLATES / "qwen2_5.jinja").read_text(), ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                None, "<|im_end|>", "<|endoftext|>", "<|im_end|>", RENDERED, True),
    # Qwen 3's template rewrites past turns (it drops their reasoning): TRL's marked copy of it is used.
    "qwen3": ((TRL_TEMPLATES / "qwen3.jinja").read_text(), ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
              None, "<|im_end|>", "<|endoftext|>", "<|im_end|>", TRL_TEMPLATE, True),
    "gemma": ((TRL_TEMPLATES / "gemma.jinja").read_text(), ["<bos>", "<eos>", "<pad>", "<start_of_turn>",
              "<end_of_turn>"], "<bos>", "<eos>", "<pad>", "<end_of_turn>", RENDERED, False),
    "mistral": (MISTRAL_V01, ["<s>", "</s>"], "<s>", "</s>", None, "</s>", RENDERED, False),
    "chatml": (PLAIN_CHATML, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", None, "<|im_end|>", RENDERED, True),
}


def family_tokenizer(tiny_base, family):
    template, special, bos, eos, pad, *_ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = bos, eos, pad
    tokenizer.chat_template = template
    return tokenizer


def family_model(tiny_base, family, path):
    """The tiny base with the family's tokenizer and template, saved like a Hub model of that family."""
    tokenizer = family_tokenizer(tiny_base, family)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def conversations(with_system):
    rows = []
    for i, item in enumerate(["tea", "lamp", "guitar", "car", "tent", "jacket", "museum", "hotel"]):
        messages = [{"role": "system", "content": "Answer in one sentence."}] if with_system and i % 2 else []
        messages += [{"role": "user", "content": f"Review the {item}."},
                     {"role": "assistant", "content": f"The {item} is good."},
                     {"role": "user", "content": "Why?"},
                     {"role": "assistant", "content": f"It works well, {i} stars."}]
        rows.append({"messages": messages})
    return rows


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_trains_exactly_each_assistant_turn_and_its_end_of_turn(tiny_base, tmp_path, family, single_thread):
    *_, end_of_turn, source, with_system = FAMILIES[family]
    model_dir = family_model(tiny_base, family, tmp_path / family)
    rows = conversations(with_system)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert assistant_mask_source(AutoTokenizer.from_pretrained(model_dir)) == source

    trainer = load_recipe("sft")([], overrides={
        "model_name_or_path": model_dir, "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
        "use_peft": False, "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 256,
        "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "disable_tqdm": True})

    tokenizer = trainer.processing_class
    assert trainer.args.assistant_only_loss
    assert len(trainer.train_dataset) == len(rows)
    for row, example in zip(rows, trainer.train_dataset):
        trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
        turns = [m["content"] + end_of_turn for m in row["messages"] if m["role"] == "assistant"]
        if source == RENDERED:
            assert tokenizer.decode(trained) == "".join(turns)
        else:  # TRL's markers also take in the template's empty reasoning block and newlines around a turn
            text = tokenizer.decode(trained)
            assert all(turn in text for turn in turns) and "Review the" not in text and "Why?" not in text


def test_llama3_pads_with_its_reserved_token_and_the_vocabulary_stays(tiny_base):
    tokenizer = family_tokenizer(tiny_base, "llama3.1")
    tokenizer.pad_token = None
    size = len(tokenizer)
    added = prepare_tokenizer(tokenizer)
    assert (tokenizer.pad_token, added, len(tokenizer)) == ("<|finetune_right_pad_id|>", [], size)



def test_a_template_that_rewrites_past_turns_is_refused_before_the_model_loads(tiny_base, tmp_path):
    # Drops the content of every past assistant turn, as reasoning templates drop past thinking.
    rewriting = PLAIN_CHATML.replace(
        "message['content']", "(message['content'] if message['role'] != 'assistant' or loop.last else '')")
    model_dir = family_model(tiny_base, "chatml", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    config["chat_template"] = rewriting
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "model" / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "model" / "model.safetensors").unlink()  # loading it would fail: the check must come first
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in conversations(False)))
    with pytest.raises(TemplateError, match=r"turn 1 differently .*not prefix-preserving.*generation %. markers"):
        load_recipe("sft")([], overrides={
            "model_name_or_path": model_dir, "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
            "use_peft": False, "max_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none"})


def test_a_conversation_the_template_cannot_split_names_its_row(tiny_base, tmp_path):
    # Rewrites a past answer only when it says "(draft)": the probe passes, the second row does not.
    rewriting = PLAIN_CHATML.replace(
        "message['content']", "(message['content'].replace(' (draft)', '') if not loop.last else message['content'])")
    tokenizer = family_tokenizer(tiny_base, "chatml")
    tokenizer.chat_template = rewriting
    assert assistant_mask_source(tokenizer) == RENDERED
    rows = conversations(False)[:3]
    rows[1]["messages"][1]["content"] += " (draft)"
    with pytest.raises(TemplateError, match=r"mine.jsonl, row 2: .*turn 1 .*not prefix-preserving"):
        tokenize_for_assistant_loss(Dataset.from_list(rows), tokenizer, "mine.jsonl")
