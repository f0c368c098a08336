"""Tokenizer and model preparation: chat template, pad != EOS, assistant-only labels that include the stop token."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl.chat_template_utils import is_chat_template_stop_token_trained

from rlhf_kit.model import IM_END, IM_START, PAD, ModelArguments, load_model, load_tokenizer, lora_config, \
    prepare_tokenizer, stop_token_ids

CONVERSATION = [
    {"role": "system", "content": "You are a helpful reviewer."},
    {"role": "user", "content": "Review the coffee."},
    {"role": "assistant", "content": "The coffee is great."},
]


def test_base_tokenizer_gets_chatml_with_distinct_pad(tiny_base):
    tok = load_tokenizer(tiny_base)
    assert tok.chat_template is None  # the tiny base is a base model
    vocab_before = len(tok)
    added = prepare_tokenizer(tok)
    assert added == []  # <|im_start|>, <|im_end|> and <|pad|> are reserved in the tiny vocabulary
    assert len(tok) == vocab_before
    assert tok.eos_token == IM_END
    assert tok.pad_token == PAD and tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful reviewer.<|im_end|>\n"
        "<|im_start|>user\nReview the coffee.<|im_end|>\n"
        "<|im_start|>assistant\nThe coffee is great.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")


def test_assistant_mask_covers_reply_and_stop_token_only(tiny_base):
    tok = load_tokenizer(tiny_base)
    prepare_tokenizer(tok)
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "The coffee is great.<|im_end|>"
    # The final newline and everything before the assistant header are not trained.
    assert mask[-1] == 0 and sum(mask[: len(tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True))]) == 0
    assert is_chat_template_stop_token_trained(tok)


def test_tokenizer_without_reserved_tokens_grows_and_model_resizes(tmp_path):
    raw = Tokenizer(models.WordLevel({"<eos>": 0, "hello": 1, "world": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]")
    tok.pad_token = tok.eos_token  # the classic base-model shortcut we must undo
    added = prepare_tokenizer(tok)
    assert set(added) == {IM_START, IM_END, PAD}
    assert tok.pad_token_id not in (tok.eos_token_id, tok.convert_tokens_to_ids("<eos>"))
    LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, bos_token_id=0,
                                 eos_token_id=0)).save_pretrained(tmp_path)
    model = load_model(ModelArguments(model_name_or_path=str(tmp_path)), tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 7
    assert model.config.pad_token_id == tok.pad_token_id
    assert set(model.generation_config.eos_token_id) == {tok.convert_tokens_to_ids(IM_END), 0}


def test_generation_stops_on_im_end(tiny_base):
    tok = load_tokenizer(tiny_base)
    prepare_tokenizer(tok)
    model = load_model(ModelArguments(model_name_or_path=tiny_base), tok)
    stops = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids(IM_END) in stops and tok.pad_token_id not in stops
    # Force the stop token to be the most likely next token: generation must end right there.
    with torch.no_grad():
        model.lm_head.weight.zero_() if not model.config.tie_word_embeddings else None
        model.model.norm.weight.zero_()
        model.lm_head.bias = None
    im_end = tok.convert_tokens_to_ids(IM_END)
    bias = torch.zeros(len(tok))
    bias[im_end] = 10.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    ids = tok.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out[0, -1].item() == im_end and out.shape[1] == ids["input_ids"].shape[1] + 1


def test_lora_config_trains_chat_token_rows(tiny_base):
    tok = load_tokenizer(tiny_base)
    prepare_tokenizer(tok)
    args = ModelArguments(model_name_or_path=tiny_base, use_peft=True, lora_r=4)
    config = lora_config(args, tok, new_chat_template=True)
    ids = config.trainable_token_indices["embed_tokens"]
    assert set(tok.convert_ids_to_tokens(ids)) == {IM_START, IM_END, PAD}
    assert "lm_head" in config.modules_to_save  # the output rows of <|im_end|> must be trainable too
    # A tokenizer that came with its template (an instruct model, or a later stage) needs no extra rows.
    plain = lora_config(args, tok, new_chat_template=False)
    assert plain.trainable_token_indices is None and not plain.modules_to_save
    assert lora_config(ModelArguments(model_name_or_path=tiny_base), tok) is None
