"""Export and publish: adapter, merged (also from QLoRA), GGUF round trip, lineage cards, push to a local Hub."""

import ast
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, load_recipe
from hub_server import HubServer
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

from rlhf_kit import cli
from rlhf_kit.config import ConfigError, parse_config
from rlhf_kit.publish.export import ExportArguments, ExportError, _llama3_rope_factors
from rlhf_kit.publish.hub import PushError, push, take_over_push, upload_plan
from rlhf_kit.model import merged_model_dir
from rlhf_kit.publish.model_card import render_card
from rlhf_kit.rewards import REWARD_FILE, RewardModel
from rlhf_kit.runs import EXPORT_FILE, StageOutput, read_stage, write_stage

FAST = {"max_steps": 12, "per_device_train_batch_size": 8, "logging_steps": 4, "eval_strategy": "no",
        "save_strategy": "no", "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler_type": "constant",
        "disable_tqdm": True, "max_length": 64, "report_to": "none"}
TOKEN = "hf_exportTestSecret0123456789abcdef"
CHAT = [[{"role": "user", "content": "Review the coffee, please! It's 3 o'clock."}]]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sft(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sft"
    load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml"],
                       overrides={"model_name_or_path": tiny_base, "output_dir": str(out), **FAST})
    return out


@pytest.fixture(scope="module")
def reward(sft):
    out = sft.parent / "reward"
    load_recipe("reward")(["--config", "recipes/configs/reward/tiny.yaml"], overrides={
        "model_name_or_path": str(sft), "output_dir": str(out), "use_peft": True, "max_steps": 4,
        "per_device_train_batch_size": 8, "eval_strategy": "no", "save_strategy": "no", "disable_tqdm": True,
        "reference_pairs": 16, "max_length": 64})
    return out


@pytest.fixture(scope="module")
def ppo(sft, reward):
    """A PPO stage output as the PPO recipe leaves it: a policy adapter on the SFT model merged, with a stage record
    whose parent is the SFT record and whose config names the reward model (built by hand: PPO training is slow)."""
    out = sft.parent / "ppo"
    base = AutoModelForCausalLM.from_pretrained(merged_model_dir(sft))
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a trained-looking, non-zero update
    policy.save_pretrained(out)
    AutoTokenizer.from_pretrained(sft).save_pretrained(out)
    write_stage(out, "ppo", model=str(sft), data="data/prompts",
                config={"model_name_or_path": str(sft), "reward_model_path": str(reward), "output_dir": str(out),
                        "kl_coef": 0.05, "learning_rate": 1e-3, "hub_token": None},
                metrics={"eval_reward": 0.8125, "eval_reward_at_start": -0.25, "eval_kl": 1.75,
                         "eval_stop_rate": 0.97, "reward_model_accuracy": 0.5})
    return out


def run_export(model_path, out, **overrides):
    overrides = {"model_path": str(model_path), "output_dir": str(out), **overrides}
    written, _ = load_recipe("export")([], overrides=overrides)
    return written


def chat_batch(tokenizer):
    return tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def base_plus_adapter(base, adapter):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def test_adapter_export_reloads_with_plain_peft_to_identical_logits(tiny_base, sft, tmp_path):
    out = tmp_path / "export"
    written = run_export(sft, out, formats=["adapter"], base_model_id="someone/tiny-base")
    assert written["adapter"] == ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                                  "tokenizer.json", "tokenizer_config.json"]  # the adapter alone: at the root
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someone/tiny-base"
    assert config["trainable_token_indices"] and "lm_head" in config["modules_to_save"]

    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = chat_batch(tokenizer)
    trained = base_plus_adapter(tiny_base, sft)
    exported = base_plus_adapter(tiny_base, out)  # plain transformers + peft, nothing of rlhf-kit
    assert torch.equal(logits(exported, batch), logits(trained, batch))


def test_merged_export_matches_base_plus_adapter_shards_and_stops(tiny_base, sft, tmp_path):
    out = tmp_path / "export"
    written = run_export(sft, out, formats=["adapter", "merged"], max_shard_size="200KB")
    assert "adapter/adapter_model.safetensors" in written["adapter"]
    shards = sorted(f for f in written["merged"] if f.endswith(".safetensors"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in written["merged"], written["merged"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= set(written["merged"])

    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = base_plus_adapter(tiny_base, sft)
    batch = chat_batch(tokenizer)
    torch.testing.assert_close(logits(merged, batch), logits(reference, batch), rtol=0, atol=1e-4)

    # The exported generation config stops where the trained model does: <|im_end|> (and the base's own EOS).
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and im_end in merged.generation_config.eos_token_id
    assert merged.generation_config.pad_token_id == tokenizer.pad_token_id != im_end
    max_new = 40
    generated = merged.generate(**batch, max_new_tokens=max_new, do_sample=False)[0, batch["input_ids"].shape[1]:]
    assert generated[-1].item() == im_end and len(generated) < max_new, tokenizer.decode(generated)
    assert (generated == im_end).sum() == 1  # nothing after the stop token
    # The same tokens as base + adapter, which (with the base's generation config) does not stop there.
    expected = reference.generate(**batch, max_new_tokens=max_new, do_sample=False)[0, batch["input_ids"].shape[1]:]
    assert expected.tolist()[: len(generated)] == generated.tolist()


def run_card_snippet(sft, out, fmt: str, heading: str, max_new_tokens: int) -> dict:
    """Export `fmt`, then run the Python snippet under `heading` of its card as written (only max_new_tokens
    lowered); returns the names the snippet defined."""
    run_export(sft, out, formats=[fmt])
    card = (out / "README.md").read_text()
    snippet = re.search(rf"### {heading}.*?```python\n(.*?)```", card, re.S).group(1)
    namespace = {}
    exec(snippet.replace("max_new_tokens=128", f"max_new_tokens={max_new_tokens}"), namespace)  # noqa: S102
    return namespace


def test_the_cards_chat_snippet_runs(sft, tmp_path):
    """The card's "how to chat" code, run as written (pointed at the local export)."""
    namespace = run_card_snippet(sft, tmp_path / "export", "merged", "Chat with the merged model", 24)
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]


def test_the_cards_adapter_snippet_chats_and_stops_at_the_end_of_turn(sft, tmp_path):
    """The adapter snippet, run as written: on the kit's base (whose generation config knows only its own EOS) it
    must pass the chat's stop ids itself, or it never stops (issue 16, item 10)."""
    namespace = run_card_snippet(sft, tmp_path / "export", "adapter", "The LoRA adapter alone", 40)
    generated = namespace["output"][0, namespace["inputs"]["input_ids"].shape[1]:].tolist()
    im_end = namespace["tokenizer"].convert_tokens_to_ids("<|im_end|>")
    assert im_end in namespace["stop"] and generated[-1] in namespace["stop"] and len(generated) < 40, generated


def test_qlora_adapter_merges_into_a_full_precision_base(tiny_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    stage = tmp_path / "qlora"
    load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml"], overrides={
        "model_name_or_path": tiny_base, "output_dir": str(stage), **FAST, "max_steps": 4, "load_in_4bit": True})
    assert read_stage(stage)["config"]["load_in_4bit"] is True

    out = tmp_path / "export"
    run_export(stage, out, formats=["merged"])
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # merged into 16/32-bit weights, not the 4-bit ones
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = chat_batch(tokenizer)
    # The reference is the adapter on the same base loaded in float32 (not the 4-bit base it trained against).
    torch.testing.assert_close(logits(merged, batch), logits(base_plus_adapter(tiny_base, stage), batch),
                               rtol=0, atol=1e-4)


def test_gguf_f16_and_q8_0_load_back_through_transformers(tiny_base, sft, tmp_path):
    pytest.importorskip("gguf")  # the `export` extra
    out = tmp_path / "export"
    written = run_export(sft, out, formats=["gguf"], gguf_types=["f16", "q8_0"], model_name="tiny-chat")
    assert written == {"gguf": ["tiny-chat-f16.gguf", "tiny-chat-q8_0.gguf"]}
    assert not (out / ".merged-for-gguf").exists() and not (out / "config.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(sft)
    batch = chat_batch(tokenizer)
    reference = logits(base_plus_adapter(tiny_base, sft).merge_and_unload(), batch)
    scale = reference.abs().max().item()
    # Max |logit error| / max |logit|: float16 rounding, and q8_0's 8-bit blocks of 32 with a float16 scale.
    tolerance = {"f16": 2e-3, "q8_0": 2e-2}
    for gguf_type, file in zip(("f16", "q8_0"), written["gguf"]):
        alone = tmp_path / gguf_type  # a GGUF file is used on its own, without the tokenizer files beside it
        alone.mkdir()
        shutil.copy(out / file, alone / file)
        model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=file).eval()
        gguf_tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=file)
        ids = gguf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ids[0] == batch["input_ids"][0].tolist()
        assert gguf_tokenizer.eos_token == "<|im_end|>" and gguf_tokenizer.pad_token == "<|pad|>"
        assert gguf_tokenizer("café ☃ 123, it's")["input_ids"] == tokenizer("café ☃ 123, it's")["input_ids"]
        got = logits(model, batch)
        error = (got - reference).abs().max().item() / scale
        print(f"{gguf_type}: max |logit error| {error * scale:.4f} = {error:.2e} of max |logit| {scale:.2f}")
        assert error < tolerance[gguf_type]
        assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9

    # The card's transformers snippet, run as written: the file's own tokenizer and chat template, stopping at the end.
    snippet = re.search(r"Or with transformers.*?```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    namespace = {}
    exec(snippet.replace("max_new_tokens=128", "max_new_tokens=40"), namespace)  # noqa: S102
    generated = namespace["output"][0, namespace["inputs"]["input_ids"].shape[1]:].tolist()
    assert generated[-1] == tokenizer.eos_token_id and len(generated) < 40, generated

    from gguf import GGUFReader

    reader = GGUFReader(str(out / written["gguf"][1]))
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.ggml.t")}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == tokenizer.eos_token_id
    template = fields["tokenizer.chat_template"]
    assert "<|im_start|>" in template and not re.search(r"\{%-? *(end)?generation", template)  # llama.cpp lacks the tag
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_gguf_chats_in_llama_cpp(sft, tmp_path):
    """The real consumer: llama.cpp tokenizes, scores and chats (embedded template, stop token) like transformers.
    Needs llama-cpp-python, which builds llama.cpp from source (about 10 minutes), so it is not a test dependency."""
    pytest.importorskip("gguf")
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "export"
    written = run_export(sft, out, formats=["merged", "gguf"], gguf_types=["f16", "q8_0"])
    tokenizer, merged = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    text = tokenizer.apply_chat_template(CHAT[0], add_generation_prompt=True, tokenize=False)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    reference = logits(merged, batch)[0].numpy()
    generated = merged.generate(**batch, max_new_tokens=40, do_sample=False)[0, batch["input_ids"].shape[1]:]
    for file, tolerance in zip(written["gguf"], (2e-3, 2e-2)):
        llm = llama_cpp.Llama(model_path=str(out / file), n_ctx=256, logits_all=True, verbose=False)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == batch["input_ids"][0].tolist()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        assert np.abs(got - reference).max() / np.abs(reference).max() < tolerance
        reply = llm.create_chat_completion(messages=CHAT[0], max_tokens=40, temperature=0.0)["choices"][0]
        assert reply["finish_reason"] == "stop"
        assert reply["message"]["content"] == tokenizer.decode(generated, skip_special_tokens=True)


def test_llama3_rope_factors_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    # llama.cpp divides the plain frequencies by rope_freqs; transformers computes the scaled ones directly.
    torch.testing.assert_close(torch.from_numpy(_llama3_rope_factors(config)).double(), plain / scaled.double(),
                               rtol=1e-5, atol=0)


def test_reward_model_merges_with_its_head_and_normalization(reward, tmp_path):
    out = tmp_path / "export"
    run_export(reward, out, formats=["adapter", "merged"])
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    source_meta, meta = (json.loads((d / REWARD_FILE).read_text()) for d in (reward, out))
    assert (meta["offset"], meta["scale"], meta["adapter"]) == (source_meta["offset"], source_meta["scale"], False)
    assert (out / "adapter" / REWARD_FILE).is_file() and (out / "reward_eval.json").is_file()

    samples = [CHAT[0] + [{"role": "assistant", "content": reply}] for reply in ("The coffee is great.", "Bad.")]
    exported, trained = RewardModel.from_pretrained(str(out)), RewardModel.from_pretrained(str(reward))
    torch.testing.assert_close(exported.score(samples), trained.score(samples), rtol=0, atol=1e-5)
    # The card's plain-transformers scoring snippet gives the normalized score rlhf-kit computes.
    snippet = re.search(r"### Score a conversation.*?```python\n(.*?)```", (out / "README.md").read_text(), re.S)
    namespace = {}
    exec(snippet.group(1), namespace)  # noqa: S102
    score = (namespace["raw"] - meta["offset"]) / meta["scale"]
    assert score == pytest.approx(exported.score([namespace["conversation"]]).item(), abs=1e-4)
    with pytest.raises(ExportError, match="no GGUF form"):
        run_export(reward, tmp_path / "gguf", formats=["gguf"])


def test_card_holds_the_lineage_of_sft_reward_ppo(sft, reward, ppo, tmp_path):
    out = tmp_path / "export"
    run_export(ppo, out, formats=["adapter", "merged"], license="apache-2.0")
    # The merged policy is the SFT model merged + the PPO adapter.
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = chat_batch(tokenizer)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), batch),
                               logits(base_plus_adapter(merged_model_dir(sft), ppo), batch), rtol=0, atol=1e-4)

    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "transformers" and metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "text-generation" and "base_model" not in metadata  # the base is local
    assert {"rlhf-kit", "sft", "reward", "ppo", "peft", "lora"} <= set(metadata["tags"])
    table = card.split("## Lineage")[1].split("##")[0]
    rows = [line for line in table.splitlines() if re.match(r"\| \d", line)]
    assert [r.split("|")[2].strip() for r in rows] == ["pretraining", "SFT", "reward model", "PPO (this model)"]
    assert "| step 1 |" in rows[2] and "| step 1, rewarded by step 2 |" in rows[3]  # both start from the SFT model
    assert "data/sft" in rows[1] and "data/preference" in rows[2] and "data/prompts" in rows[3]
    reward_metrics = read_stage(reward)["metrics"]
    assert f"eval_accuracy {reward_metrics['eval_accuracy']:.4g}" in rows[2]
    assert "eval_reward 0.8125" in rows[3] and "eval_kl 1.75" in rows[3] and "train_loss" in rows[1]
    details = card.split("## Stage details")[1]
    assert details.count("<summary>config</summary>") == 4 and "kl_coef: 0.05" in details
    assert "transformers " in details and "peft " in details and "rlhf-kit " in details
    assert "PeftModel.from_pretrained" in card and 'subfolder="adapter"' in card
    assert "the output of step 1 (SFT), merged" in card  # where the policy adapter's base comes from
    # The configs are saved beside the card.
    assert read_stage(out)["stage"] == "ppo" and read_stage(out)["parent"]["stage"] == "sft"
    assert yaml.safe_load((out / "rlhf_kit_export.yaml").read_text())["formats"] == ["adapter", "merged"]
    # A stage output gets the same card (recipes call write_card after write_stage).
    stage_card = render_card(ppo)
    assert "| 3 | PPO (this model) |" in stage_card and "PeftModel.from_pretrained(base, \"" + str(ppo) in stage_card


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The real huggingface_hub client, online, pointed at a local stand-in Hub, with a token in HF_TOKEN."""
    from huggingface_hub import constants

    with HubServer(token=TOKEN, lifetime=120) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)  # read at import; the agent registry lookup uses it
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def test_push_uploads_exactly_the_export_and_never_the_token(sft, tmp_path, hub, capsys, caplog):
    out = tmp_path / "export"
    run_export(sft, out, formats=["adapter", "merged"])
    caplog.set_level(logging.DEBUG)
    assert cli.main(["push", str(out), "--repo_id", "tester/tiny-sft", "--revision", "v1",
                     "--commit_message", "First export"]) == 0

    repo = hub.repos["tester/tiny-sft"]
    assert repo["private"] is True
    assert [c["summary"] for c in repo["commits"]] == ["First export"] and repo["commits"][0]["revision"] == "v1"
    received = hub.files("tester/tiny-sft", "v1")
    assert sorted(received) == upload_plan(out) == sorted(
        ["README.md", "rlhf_kit_config.yaml", "rlhf_kit_export.yaml", "rlhf_kit_stage.json", "config.json",
         "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
         "adapter/tokenizer.json", "adapter/tokenizer_config.json", "adapter/chat_template.jinja"])
    assert hub.files("tester/tiny-sft", "main") == {}  # only the branch got the commit
    for name, data in received.items():
        if name != "README.md":
            assert data == (out / name).read_bytes(), name
    assert 'from_pretrained("tester/tiny-sft")' in received["README.md"].decode()  # the card names the repository

    # The token went only into Authorization headers: in no request body, uploaded or local file, output or log.
    api_calls = [r for r in hub.requests if r["path"] != "/api/agent-harnesses"]
    assert [r["path"].split("/")[-2 if "models" in r["path"] else -1] for r in api_calls] == [
        "whoami-v2", "create", "branch", "validate-yaml", "preupload", "commit"]
    assert all(r["authorized"] for r in api_calls)
    secret = TOKEN.encode()
    assert not any(secret in r["body"] for r in hub.requests)
    assert not any(secret in data for data in received.values())
    assert not any(secret in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    assert "pushed 15 files" in captured.out


def test_push_a_stage_output_exports_it_first_and_dry_run_needs_no_token(sft, tmp_path, hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    dry = push(sft, "tester/sft-dry", formats=["merged"], dry_run=True)
    assert dry.dry_run and "model.safetensors" in dry.files and "adapter_config.json" not in dry.files
    assert hub.requests == [] and hub.repos == {}

    token_file = tmp_path / "token"  # where `hf auth login` keeps it
    token_file.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    result = push(sft, "sft-adapter", private=False)  # no namespace: the token's user
    assert result.repo_id == "tester/sft-adapter" and hub.repos["tester/sft-adapter"]["private"] is False
    assert set(hub.files("tester/sft-adapter")) == {
        "README.md", "rlhf_kit_config.yaml", "rlhf_kit_export.yaml", "rlhf_kit_stage.json", "adapter_config.json",
        "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


def test_push_errors_say_what_to_do(sft, tmp_path, hub, monkeypatch):
    from huggingface_hub import constants

    out = tmp_path / "export"
    run_export(sft, out, formats=["adapter"])
    for bad in ("tester/tiny sft", "a/b/c", "-tester/x", "tester/" + "x" * 100):
        with pytest.raises(ConfigError, match="malformed"):
            push(out, bad)
    with pytest.raises(ConfigError, match="malformed"):
        parse_config(ExportArguments, args=["--model_path", str(sft), "--hub_model_id", "no good/id"])

    leaky = tmp_path / "leaky"  # a file that captured the token is never published
    shutil.copytree(out, leaky)
    (leaky / "notes.yaml").write_text(f"token: {TOKEN}\n")
    with pytest.raises(PushError, match="notes.yaml contains your Hugging Face token") as err:
        push(leaky, "tester/x")
    assert TOKEN not in str(err.value)

    monkeypatch.setenv("HF_TOKEN", "hf_wrongToken")
    with pytest.raises(PushError, match="rejected the Hugging Face token") as err:
        push(out, "tester/x")
    assert "hf_wrongToken" not in str(err.value)

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PushError, match="hf auth login"):
        push(out, "tester/x")
    with pytest.raises(PushError, match="hf auth login"):  # before any merging
        load_recipe("export")([], overrides={"model_path": str(sft), "output_dir": str(tmp_path / "e2"),
                                             "push_to_hub": True, "hub_model_id": "tester/x"})
    assert not (tmp_path / "e2").exists()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push(out, "tester/x")
    assert hub.repos == {}


def test_recipes_push_to_hub_is_taken_from_trainer(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    args = TrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="tester/sft", report_to="none")
    settings = take_over_push(args)
    assert (settings.repo_id, settings.private, settings.revision) == ("tester/sft", True, None)
    assert args.push_to_hub is False  # Trainer will not push (publicly, at every save) on its own
    assert take_over_push(TrainingArguments(output_dir=str(tmp_path), report_to="none")) is None
    with pytest.raises(ConfigError, match="hub_model_id"):
        take_over_push(TrainingArguments(output_dir=str(tmp_path), push_to_hub=True, report_to="none"))


def test_an_adapter_on_a_relative_local_base_says_how_to_make_it_loadable(tiny_base, sft, tmp_path, monkeypatch,
                                                                          caplog):
    """`model_name_or_path: outputs/tiny-sft` is saved as the adapter's base as given: one slash, so it reads as a Hub
    id and nothing warned that the pushed adapter cannot load anywhere (issue 16, item 10)."""
    stage = tmp_path / "stage"
    shutil.copytree(sft, stage, ignore=shutil.ignore_patterns("merged"))
    monkeypatch.chdir(Path(tiny_base).parent.parent)
    relative = f"{Path(tiny_base).parent.name}/{Path(tiny_base).name}"  # like outputs/tiny-sft
    config = json.loads((stage / "adapter_config.json").read_text())
    (stage / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": relative}))
    with caplog.at_level(logging.WARNING):
        run_export(stage, tmp_path / "export", formats=["adapter"])
    assert f"relative (to the directory training ran in) local path {relative}" in caplog.text
    assert "--base_model_id" in caplog.text and "formats: [merged]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_export(stage, tmp_path / "export-2", formats=["adapter"], base_model_id="someone/tiny-base")
    assert "local path" not in caplog.text


def test_clear_errors_for_bad_stage_outputs(tiny_base, sft, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_export(tmp_path / "missing", tmp_path / "o1")
    with pytest.raises(ExportError, match="not an rlhf-kit stage output"):
        run_export(tmp_path, tmp_path.parent / f"{tmp_path.name}-o2")
    odd = tmp_path / "odd"
    shutil.copytree(sft, odd, ignore=shutil.ignore_patterns("merged"))
    record = json.loads((odd / "rlhf_kit_stage.json").read_text())
    (odd / "rlhf_kit_stage.json").write_text(json.dumps({**record, "stage": "distill"}))
    with pytest.raises(ExportError, match="unknown stage 'distill'"):
        run_export(odd, tmp_path / "o3")
    (odd / "rlhf_kit_stage.json").write_text(json.dumps(record))
    with pytest.raises(ExportError, match="trained the full model"):
        run_export(tiny_base, tmp_path / "o4", formats=["adapter"])  # a pretrain stage: full model, no adapter

    # Adapter / base mismatch: the same layer names on a model of another width.
    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    misfit = r"does not fit its base(.|\n)*down_proj.lora_A.weight: size 128, the base's layer has 64"
    with pytest.raises(ExportError, match=misfit):
        run_export(sft, tmp_path / "o5", base_model_path=str(other))

    # The recorded base is gone, or is a Hub id that is not in the offline cache.
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ExportError, match="not a directory here(.|\n)*Pass base_model_path"):
        run_export(odd, tmp_path / "o6")
    (odd / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "nobody/not-cached"}))
    with pytest.raises(ExportError, match="'nobody/not-cached' .* HF_HUB_OFFLINE is set and it is not in the local"):
        run_export(odd, tmp_path / "o7", formats=["merged"])
    # The adapter alone is still exported (a copy needs no base), with one warning.
    assert run_export(odd, tmp_path / "o7b", formats=["adapter"])["adapter"]

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        run_export(sft, tmp_path / "busy", formats=["adapter"])
    with pytest.raises(ExportError, match="refusing to delete"):
        run_export(sft, tmp_path / "busy", formats=["adapter"], overwrite=True)
    with pytest.raises(ConfigError, match="choose one or more"):
        run_export(sft, tmp_path / "o8", formats=["onnx"])


def test_cli_export_runs_the_recipe(sft, tmp_path, capsys):
    assert cli.main(["export", str(sft), "--output_dir", str(tmp_path / "e"), "--formats", "adapter"]) == 0
    assert "== export finished" in capsys.readouterr().out and (tmp_path / "e" / "README.md").is_file()
    assert cli.main(["export", str(sft), "--format", "merged"]) == 2  # a user error: one message, no traceback
    assert "Did you mean 'formats'" in capsys.readouterr().err


def test_push_leaves_training_state_home_at_any_depth(sft, tmp_path, hub):
    """What a push uploads is StageOutput.files: runs.NOT_PUBLISHED as huggingface_hub's own path patterns, the ones
    upload_folder is given. A checkpoint, a log folder or a lock file nested in a folder stays home as it does at the
    top; a file whose name only starts like one goes up."""
    out = tmp_path / "export"
    run_export(sft, out, formats=["adapter"])
    published = upload_plan(out)
    junk = ["checkpoint-2/model.safetensors", "adapter/checkpoint-1/optimizer.pt", "runs/events.out", "sub/runs/x",
            ".cache/huggingface/x", "tokenizer.json.lock", "a/b/__pycache__/c.pyc", "rng_state_0.pth",
            "deep/er/scheduler.pt", "model.partial", "deep/.hidden", "sub/training_args.bin"]
    kept = ["runsheet.txt", "notes/checkpoints.md", "sub/optimizer.pt.txt"]
    for name in junk + kept:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    assert upload_plan(out) == sorted(published + kept) == sorted(StageOutput.read(out).files)

    result = push(out, "tester/junk")
    received = hub.files("tester/junk")
    assert sorted(received) == result.files == sorted(published + kept)
    # The folder's card became the one rendered for the repository, so the folder matches what was pushed.
    assert received["README.md"] == (out / "README.md").read_bytes() and b'"tester/junk"' in received["README.md"]


def test_stage_output_is_read_once_and_a_broken_file_is_named(sft, tmp_path):
    out = tmp_path / "export"
    run_export(sft, out, formats=["adapter"])
    output = StageOutput.read(out)
    assert (output.stage, output.is_export, output.adapter_dir, output.reward) == ("sft", True, ".", False)
    assert output.export_settings["formats"] == ["adapter"] and output.adapter_config["task_type"] == "CAUSAL_LM"
    assert render_card(output) == (out / "README.md").read_text()  # the card needs nothing but what was read
    (out / EXPORT_FILE).write_text("formats: [adapter\n")
    with pytest.raises(ValueError, match=f"{EXPORT_FILE} is not readable YAML"):
        StageOutput.read(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StageOutput.read(tmp_path / "missing")


def test_publish_imports_flow_one_way():
    """hub -> export -> model_card -> runs: each rlhf_kit import in rlhf_kit/publish is at the top of its module
    (none hidden in a function to dodge a cycle) and none points back up the chain, so any of them can be imported
    first, and a lower one loads without the ones above it."""
    chain = ["hub", "export", "model_card"]
    for i, name in enumerate(chain):
        tree = ast.parse((REPO / "rlhf_kit" / "publish" / f"{name}.py").read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            targets = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                       [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for target in (t for t in targets if t.startswith("rlhf_kit")):
                assert id(node) in top, f"publish/{name}.py:{node.lineno} imports {target} inside a function"
                assert target.removeprefix("rlhf_kit.publish.") not in chain[:i + 1], (
                    f"publish/{name}.py:{node.lineno} imports {target}, above it in {' -> '.join(chain)}")
