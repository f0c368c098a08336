"""Tokenizer and model preparation: chat template, pad != EOS, assistant-only labels that include the stop token,
and the merged copy of a LoRA adapter that the next stage starts from."""

import contextlib
import dataclasses
import io
import os
import shutil

import pytest
import torch
from conftest import REPO, load_recipe
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from trl.chat_template_utils import is_chat_template_stop_token_trained

from rlhf_kit.inference.chat import chat
from rlhf_kit.data.loading import load_data
from rlhf_kit.inference.generation import Sampling, generate, load_policy

from rlhf_kit.model import IM_END, IM_START, PAD, ModelArguments, is_fresh_merge, load_model, load_model_tokenizer, \
    load_tokenizer, lora_config, merge_key, merged_cache_path, merged_model_dir, prepare_tokenizer, stop_token_ids

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


# The first training prompt: the best-of-N recipe samples for it first.
PROMPT = load_data(REPO / "data/prompts", kind="prompt")["prompt"][0]


@pytest.fixture
def extra_eos_model(tiny_sft, tmp_path):
    """A copy of the tiny SFT model whose generation config lists one more EOS: the token it answers PROMPT with
    first (greedy). The tokenizer does not list it, so only a stop set that reads the model's config ends there.
    Returns the directory and that token."""
    policy = load_policy(tiny_sft)
    answer = generate(policy, [PROMPT], sampling=Sampling(max_new_tokens=8, temperature=0), progress=False).response_ids[0]
    first = answer[0]
    assert len(answer) > 1 and first not in policy.model.generation_config.eos_token_id
    path = tmp_path / "extra-eos"
    shutil.copytree(tiny_sft, path)
    generation = GenerationConfig.from_pretrained(path)
    generation.eos_token_id = [*generation.eos_token_id, first]
    generation.save_pretrained(path)
    return str(path), first


def test_every_inference_path_stops_on_the_models_own_eos(extra_eos_model, tmp_path):
    path, first = extra_eos_model
    policy = load_policy(path)
    tok = policy.tokenizer
    im_end, base_eos = tok.convert_tokens_to_ids([IM_END, "<|endoftext|>"])
    expected = [im_end, base_eos, first]  # the tokenizer's end of turn, then the model's own EOS ids in order
    # load_model writes it into the generation config, which export saves and TRL's GRPO/RLOO read.
    assert policy.model.generation_config.eos_token_id == expected

    gens = generate(policy, [PROMPT], sampling=Sampling(max_new_tokens=8, temperature=0), progress=False)  # evaluation
    assert gens.response_ids == [[first]] and gens.stopped == [True]
    history = chat(path, lines=[PROMPT[-1]["content"]], write=lambda _: None, max_new_tokens=8, temperature=0)
    assert history[-1]["content"] == tok.decode([first]).strip()
    # Best-of-N through its recipe: the missing-stop penalty spares the answer that ended on the model's EOS.
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = load_recipe("best_of_n")(["--config", "recipes/configs/best_of_n/tiny.yaml"], overrides={
            "model_name_or_path": path, "reward_model_path": None, "reward_funcs": ["rlhf_kit.tasks.review:gold"],
            "eval_reward_funcs": [], "missing_eos_penalty": 1.0, "num_prompts": 1, "n": 2, "batch_size": 2,
            "temperature": 1e-3, "max_new_tokens": 8, "output_dir": str(tmp_path / "bon")})
    assert metrics["best/missing_stop"] == 0.0
    # All of them ask one function, which reads the model (loaded or by path) beside the tokenizer.
    assert stop_token_ids(tok) == [im_end]
    assert stop_token_ids(tok, policy.model) == stop_token_ids(tok, path) == expected


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


def lora_parameters(base: str, config) -> set[str]:
    """The modules of `base` that `config`'s adapter trains, by short name (q_proj, down_proj, score, ...)."""
    from peft import get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n.split(".lora_")[0].split(".")[-1] for n in names if ".lora_" in n}


def test_every_lora_setting_of_trls_model_config_is_honoured_or_refused(tiny_base):
    """lora_target_parameters and lora_task_type pass the strict parser (TRL's ModelConfig declares them), so they
    must do what they say: before, both were dropped without a word."""
    tok = load_tokenizer(tiny_base)
    # PEFT targets a parameter directly (the route to MoE experts): here a plain weight, next to one module.
    # (PEFT wraps a targeted parameter without dropout.)
    args = ModelArguments(model_name_or_path=tiny_base, use_peft=True, lora_r=4, lora_dropout=0.0,
                          lora_target_modules=["q_proj"], lora_target_parameters=["mlp.down_proj.weight"])
    assert lora_parameters(tiny_base, lora_config(args, tok)) == {"q_proj", "down_proj"}
    # A one-item list stays a list: TRL makes it the string "q_proj", a regex no full module name matches.
    assert lora_config(dataclasses.replace(args, lora_target_parameters=None), tok).target_modules == {"q_proj"}
    # The stage decides the task type; a config may only repeat it.
    same = dataclasses.replace(args, lora_task_type="CAUSAL_LM")
    assert lora_config(same, tok).task_type == "CAUSAL_LM"
    with pytest.raises(ValueError, match="lora_task_type: SEQ_CLS, but this stage trains a CAUSAL_LM adapter"):
        lora_config(dataclasses.replace(args, lora_task_type="SEQ_CLS"), tok)
    with pytest.raises(ValueError, match="'seq-cls' is not a PEFT task type"):
        ModelArguments(model_name_or_path=tiny_base, use_peft=True, lora_task_type="seq-cls")


def test_4bit_needs_a_named_compute_dtype():
    # TRL's get_quantization_config makes dtype the compute dtype: "auto" failed at load as `torch.auto`.
    with pytest.raises(ValueError, match="load_in_4bit computes in dtype, which cannot be auto"):
        ModelArguments(model_name_or_path="x", use_peft=True, load_in_4bit=True, dtype="auto")


def test_tokenizer_loads_at_the_model_revision(tiny_base, tmp_path, monkeypatch):
    """A Hub model pinned to a revision gets that revision's tokenizer, as its weights do, not main's.

    A Hub cache with two commits of one repository: main, and the tag v2 whose tokenizer has one more token.
    Offline, huggingface_hub resolves a revision through refs/<name> to snapshots/<commit>.
    """
    import huggingface_hub

    repo = tmp_path / "hub" / "models--acme--tiny"
    commits = {"main": "a" * 40, "v2": "b" * 40}
    for ref, commit in commits.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(tiny_base, repo / "snapshots" / commit)
    v2 = AutoTokenizer.from_pretrained(tiny_base)
    v2.add_tokens(["<|v2|>"])
    v2.save_pretrained(repo / "snapshots" / commits["v2"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    pinned = ModelArguments(model_name_or_path="acme/tiny", model_revision="v2")
    assert "<|v2|>" in load_model_tokenizer(pinned).get_vocab()
    assert "<|v2|>" not in load_model_tokenizer(dataclasses.replace(pinned, model_revision="main")).get_vocab()
    # A tokenizer named apart from the model is another repository: the model's revision is not its own.
    other = dataclasses.replace(pinned, tokenizer_name_or_path=tiny_base)
    assert "<|v2|>" not in load_model_tokenizer(other).get_vocab()


# ------------------------------------------------------------------------------------------------ merged adapters


def train_sft_adapter(base: str, out, seed: int) -> None:
    """A few steps of the SFT recipe with LoRA into `out`; another seed gives other adapter weights."""
    with contextlib.redirect_stdout(io.StringIO()):
        load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml"], overrides={
            "model_name_or_path": base, "output_dir": str(out), "use_peft": True, "max_steps": 3, "seed": seed,
            "per_device_train_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 0, "eval_strategy": "no",
            "save_strategy": "no", "logging_steps": 50, "max_length": 64, "disable_tqdm": True})


def logits_of(model, tokenizer) -> torch.Tensor:
    batch = tokenizer.apply_chat_template(CONVERSATION, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model.eval()(**batch).logits


def base_plus_adapter(base: str, adapter) -> torch.Tensor:
    """The logits of base + adapter merged in memory, with plain transformers and peft."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return logits_of(model, AutoTokenizer.from_pretrained(adapter))


def loaded(adapter) -> torch.Tensor:
    """The logits of the model a later stage (PPO, reward, evaluation) loads from the adapter directory."""
    tokenizer = load_tokenizer(str(adapter))
    return logits_of(load_model(ModelArguments(model_name_or_path=str(adapter)), tokenizer), tokenizer)


def identity(directory) -> tuple[int, int]:
    stat = os.stat(directory / "model.safetensors")
    return stat.st_ino, stat.st_mtime_ns


def leftovers(merged) -> list[str]:
    """Partial or replaced merges next to the cache entry `merged`."""
    return sorted(p.name for p in merged.parent.iterdir() if p.name.startswith(f"{merged.name}."))


def test_merged_cache_follows_the_adapter(tiny_base, tmp_path):
    adapter = tmp_path / "sft"
    train_sft_adapter(tiny_base, adapter, seed=0)
    merged = merged_model_dir(adapter)
    first = base_plus_adapter(tiny_base, adapter)
    torch.testing.assert_close(loaded(adapter), first, rtol=0, atol=1e-5)
    built = identity(merged)
    assert merged_model_dir(adapter) == merged and identity(merged) == built  # unchanged adapter: the cache is reused

    # SFT run again into the same directory: the next stage must start from the new adapter, not the old merge.
    train_sft_adapter(tiny_base, adapter, seed=1)
    second = base_plus_adapter(tiny_base, adapter)
    assert not torch.allclose(second, first, atol=1e-3)  # the retrained adapter really differs
    torch.testing.assert_close(loaded(adapter), second, rtol=0, atol=1e-5)
    assert identity(merged) != built
    assert leftovers(merged) == []


def test_a_cleared_merge_cache_is_rebuilt_from_its_adapter(tiny_base, tmp_path):
    """A reward or PPO adapter records the merged SFT model in the cache as its base: with the cache cleared, loading
    that base rebuilds it from the SFT adapter its path names, instead of failing on a missing directory."""
    adapter = tmp_path / "sft"
    train_sft_adapter(tiny_base, adapter, seed=0)
    merged = merged_model_dir(adapter)
    shutil.rmtree(merged)
    tokenizer = load_tokenizer(str(adapter))
    model = load_model(ModelArguments(model_name_or_path=str(merged)), tokenizer)
    assert merged.is_dir() and is_fresh_merge(merged, merge_key(adapter))
    torch.testing.assert_close(logits_of(model, tokenizer), base_plus_adapter(tiny_base, adapter), rtol=0, atol=1e-5)


def test_interrupted_merge_is_never_taken_as_finished(tiny_base, tmp_path, monkeypatch):
    adapter = tmp_path / "sft"
    train_sft_adapter(tiny_base, adapter, seed=0)
    # What a merge killed while writing leaves behind: a config, no weights.
    merged = merged_cache_path(adapter)
    merged.mkdir(parents=True)
    AutoModelForCausalLM.from_pretrained(tiny_base).config.save_pretrained(merged)
    torch.testing.assert_close(loaded(adapter), base_plus_adapter(tiny_base, adapter), rtol=0, atol=1e-5)
    finished = identity(merged)

    # Killed after the new weights are written but before the merge completes: the previous merge stays in place
    # (stale now, and known to be), no partial directory is left, and the next load completes the merge.
    train_sft_adapter(tiny_base, adapter, seed=1)
    save = PreTrainedModel.save_pretrained

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt("killed mid-merge")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        merged_model_dir(adapter)
    monkeypatch.undo()
    assert identity(merged) == finished and not is_fresh_merge(merged, merge_key(adapter))
    assert leftovers(merged) == []
    torch.testing.assert_close(loaded(adapter), base_plus_adapter(tiny_base, adapter), rtol=0, atol=1e-5)
