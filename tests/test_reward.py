"""Stage 3: reward models through the real recipe on the tiny model: accuracy, reload, normalization, gate, formats."""

import contextlib
import io
import json
import shutil

import pytest
import torch
from conftest import REPO, Interrupt, StepRecorder, load_recipe, losses, one_thread, read_jsonl
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from rlhf_kit.data.loading import load_data
from rlhf_kit.training.reward_model import (
    fit_normalization,
    hold_out,
    pair_samples,
    pairwise_report,
    reference_samples,
)
from rlhf_kit.rewards import (
    EVAL_FILE,
    REWARD_FILE,
    RewardGateError,
    RewardModel,
    RewardModelFunction,
    gate,
    tokenizer_compatibility,
)

FAST = {
    "use_peft": True, "max_steps": 250, "per_device_train_batch_size": 16, "logging_steps": 10, "eval_strategy": "no",
    "save_strategy": "no", "learning_rate": 1e-3, "warmup_steps": 0, "disable_tqdm": True, "report_to": "none",
}
TEST_PAIRS = read_jsonl(REPO / "data/preference/test.jsonl")


pytestmark = pytest.mark.usefixtures("single_thread")


def run_reward(model, out, **overrides):
    main = load_recipe("reward")
    callbacks = overrides.pop("callbacks", None)
    return main(["--config", "recipes/configs/reward/tiny.yaml"], callbacks=callbacks,
                overrides={"model_name_or_path": model, "output_dir": str(out), **FAST, **overrides})


class Snapshot(TrainerCallback):
    """Keeps a copy of every trainable parameter as training starts."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed(model, before):
    after = dict(model.named_parameters())
    return {n: not torch.equal(after[n].detach(), p) for n, p in before.items()}


@pytest.fixture(scope="session")
def trained(tiny_base, tmp_path_factory):
    """One LoRA reward model trained on the shipped pairs, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("reward")
    snapshot, printed = Snapshot(), io.StringIO()
    with one_thread(), contextlib.redirect_stdout(printed):
        trainer = run_reward(tiny_base, out, callbacks=[snapshot])
    return {"trainer": trainer, "out": out, "printed": printed.getvalue(), "before": snapshot.before}


@pytest.fixture(scope="session")
def merged(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("reward-merged")
    with one_thread():
        RewardModel.from_pretrained(str(trained["out"])).save_pretrained(path)
    return path


def samples(n=24):
    return [s for row in TEST_PAIRS[:n // 2] for s in pair_samples(row)]


def test_reward_model_beats_chance_and_reports(trained):
    out, trainer = trained["out"], trained["trainer"]
    report = json.loads((out / EVAL_FILE).read_text())
    assert report["pairs"] == 300 and "held_out" not in report  # the data's own test split: the file as before
    assert report["accuracy"] > 0.7, report  # chance is 0.5; this run reaches about 0.8
    assert report["chosen"]["mean"] > report["rejected"]["mean"] and report["mean_margin"] > 0
    assert sum(b["pairs"] for b in report["calibration"]) == 300 and len(report["calibration"]) == 5
    # Calibration view: confident (large-margin) pairs are right more often than the near-ties.
    assert report["calibration"][-1]["accuracy"] > report["calibration"][0]["accuracy"]
    assert "== reward model on 300 held-out pairs" in trained["printed"] and "== reward finished" in trained["printed"]
    stage = json.loads((out / "rlhf_kit_stage.json").read_text())
    assert stage["stage"] == "reward" and stage["metrics"]["eval_accuracy"] == report["accuracy"]
    assert (out / "rlhf_kit_config.yaml").is_file()
    # Every trainable parameter learned, the new score head included (it is trained whole, not through LoRA).
    moved = changed(trainer.model, trained["before"])
    assert all(moved.values()), [n for n, m in moved.items() if not m]
    assert any("score.modules_to_save" in n for n in moved)


def test_score_is_the_logit_reward_trainer_computes(trained):
    trainer = trained["trainer"]
    rm = RewardModel(trainer.model, trainer.processing_class)
    rows = load_data("data/preference", kind="preference").select(range(3))
    examples = [trainer.train_dataset[i] for i in range(3)]
    for row, example in zip(rows, examples):
        chosen, rejected = pair_samples(row)
        assert rm.encode(chosen) == example["chosen_ids"] and rm.encode(rejected) == example["rejected_ids"]
    batch = trainer.data_collator(examples)  # chosen of all three, then rejected of all three
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    ordered = [pair_samples(r)[0] for r in rows] + [pair_samples(r)[1] for r in rows]
    torch.testing.assert_close(rm.score(ordered, normalize=False, batch_size=2), logits, rtol=0, atol=1e-5)


def test_adapter_with_head_and_merged_model_reload_to_identical_scores(trained, merged):
    out, trainer = trained["out"], trained["trainer"]
    assert not (out / "model.safetensors").exists()
    assert "base_model.model.score.weight" in load_file(out / "adapter_model.safetensors")  # the head is in the adapter
    meta = json.loads((out / REWARD_FILE).read_text())
    in_memory = RewardModel(trainer.model, trainer.processing_class, offset=meta["offset"], scale=meta["scale"])
    expected = in_memory.score(samples())

    reloaded = RewardModel.from_pretrained(str(out))
    assert (reloaded.offset, reloaded.scale) == (meta["offset"], meta["scale"])
    torch.testing.assert_close(reloaded.score(samples()), expected, rtol=0, atol=1e-5)

    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert (merged / EVAL_FILE).is_file()
    torch.testing.assert_close(RewardModel.from_pretrained(str(merged)).score(samples()), expected, rtol=0, atol=1e-5)
    # The merged directory is a plain transformers model: its raw logits are the unnormalized scores.
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok.apply_chat_template(samples(2)[0], tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        raw = plain(**ids).logits[0, 0]
    torch.testing.assert_close(raw, reloaded.score(samples(2)[:1], normalize=False)[0], rtol=0, atol=1e-5)


def test_lost_head_or_dropped_head_bias_fails_loudly(trained, merged, tmp_path):
    headless = tmp_path / "headless"
    shutil.copytree(trained["out"], headless)
    weights = load_file(headless / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".score." not in k}, headless / "adapter_model.safetensors")
    config = json.loads((headless / "adapter_config.json").read_text())
    (headless / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    with pytest.raises(ValueError, match="saved without the reward head"):
        RewardModel.from_pretrained(str(headless))

    biased = tmp_path / "biased"
    shutil.copytree(merged, biased)
    weights = load_file(biased / "model.safetensors")
    weights["score.bias"] = torch.tensor([0.5])  # LLaMA's head has no bias: transformers would drop this key
    save_file(weights, biased / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"head 'bias' \(score.bias\).*drop it"):
        RewardModel.from_pretrained(str(biased))


def test_normalization_gives_the_reference_set_mean_0_std_1(trained):
    rm = RewardModel.from_pretrained(str(trained["out"]))
    meta = json.loads((trained["out"] / REWARD_FILE).read_text())
    assert meta["reference"] == {"source": "data/preference", "samples": 600}  # the held-out chosen + rejected
    reference = reference_samples(load_data("data/preference", kind="preference", split="test"), 300, seed=0)
    normalized = rm.score(reference, batch_size=64)
    assert abs(normalized.mean().item()) < 1e-5 and normalized.std().item() == pytest.approx(1.0, abs=1e-5)
    raw = rm.score(reference, batch_size=64, normalize=False)
    torch.testing.assert_close(normalized, (raw - meta["offset"]) / meta["scale"])
    assert raw.std().item() == pytest.approx(meta["scale"], rel=1e-5)


def test_reward_function_scores_prompt_completion_pairs_like_the_gold_annotator(trained):
    reward = RewardModelFunction(RewardModel.from_pretrained(str(trained["out"])))
    assert reward.__name__ == "reward_model"
    items = ["tea", "book", "hotel", "camera", "park", "guitar"]
    prompts = [[{"role": "user", "content": f"Review the {item}."}] for item in items]
    good = [[{"role": "assistant", "content": f"The {item} is wonderful and lovely."}] for item in items]
    bad = [f"The {item} is awful and dirty." for item in items]  # plain-string completions work too
    good_rewards, bad_rewards = reward(prompts, good, item=items), reward(prompts, bad, item=items)
    assert isinstance(good_rewards, list) and all(isinstance(r, float) for r in good_rewards)
    assert sum(good_rewards) > sum(bad_rewards)
    conversation = prompts[0] + good[0]
    assert good_rewards[0] == pytest.approx(reward.reward_model.score([conversation])[0].item(), abs=1e-6)


def test_gate_passes_a_good_reward_model_with_the_same_tokenizer(trained):
    report = gate(str(trained["out"]), AutoTokenizer.from_pretrained(trained["out"]))
    assert report["gate"] == {"passed": True, "overridden": False, "tokenizer": "shared", "problems": []}
    assert report["accuracy"] > 0.7


def test_gate_blocks_a_bad_reward_model_and_the_override_lets_it_through(tiny_base, tmp_path):
    # Swapped labels: a reward model that learns the opposite of the annotator.
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in read_jsonl(REPO / "data/preference/train.jsonl")))
    out = tmp_path / "bad"
    run_reward(tiny_base, out, dataset_name=str(swapped), eval_dataset_name="data/preference", max_steps=150)
    policy_tokenizer = AutoTokenizer.from_pretrained(out)
    with pytest.raises(RewardGateError, match=r"accuracy 0\.\d+ on 300 pairs is below min_accuracy 0\.6(.|\n)*"
                                              r"allow_weak_reward_model: true"):
        gate(str(out), policy_tokenizer)
    with pytest.warns(UserWarning, match="below min_accuracy"):
        report = gate(str(out), policy_tokenizer, allow_weak_reward_model=True)
    assert report["accuracy"] < 0.5 and report["gate"]["overridden"] and not report["gate"]["passed"]


def test_gate_checks_tokenizer_compatibility_and_a_missing_report(trained, tmp_path):
    out = str(trained["out"])
    other_template = AutoTokenizer.from_pretrained(out)
    other_template.chat_template = other_template.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(RewardGateError, match="share a vocabulary but differ in chat template"):
        gate(out, other_template)

    # Another vocabulary entirely: PPO re-renders text for the RM, which has its own chat template.
    from rlhf_kit.training.pretraining import train_tokenizer

    other_vocab = train_tokenizer(["The tea is great. Review the tea."] * 10, vocab_size=300)
    assert gate(out, other_vocab)["gate"]["tokenizer"] == "re-render"

    unevaluated = tmp_path / "unevaluated"
    AutoTokenizer.from_pretrained(out).save_pretrained(unevaluated)
    with pytest.raises(RewardGateError, match=f"has no {EVAL_FILE}"):
        gate(str(unevaluated), other_vocab)


def test_a_single_preference_file_holds_out_pairs_for_the_report_and_the_gate(tiny_base, tmp_path):
    """A single file has no test split: load_data would read it whole as 'test', so the report would score the
    training pairs (issue 16, item 8). A seeded 10% is held out of training instead, and the report says so."""
    rows = read_jsonl(REPO / "data/preference/train.jsonl")[:200]
    single = tmp_path / "pairs.jsonl"
    single.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, printed = tmp_path / "rm", io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer = run_reward(tiny_base, out, dataset_name=str(single), max_steps=5, reference_pairs=20)
    report = json.loads((out / EVAL_FILE).read_text())
    assert report["held_out"] == "auto 10% of train (20 of 200 pairs, seed 0)" and report["pairs"] == 20
    assert len(trainer.train_dataset) == 180
    # The pairs the report scored are exactly the ones training never saw.
    _, held, _ = hold_out(load_data(str(single), kind="preference"), None, fraction=0.1, seed=0)
    key = RewardModel(trainer.model, trainer.processing_class).encode  # the ids TRL trained on
    trained_pairs = {(tuple(r["chosen_ids"]), tuple(r["rejected_ids"])) for r in trainer.train_dataset}
    held_pairs = {(tuple(key(c)), tuple(key(r))) for c, r in map(pair_samples, held)}
    assert len(held_pairs) == 20 and not held_pairs & trained_pairs
    assert len(trained_pairs | held_pairs) == 200  # and nothing was lost: every pair is in one of them
    assert "== reward model on 20 held-out pairs (auto 10% of train (20 of 200 pairs, seed 0), held out of training)" \
        in printed.getvalue()
    stage = json.loads((out / "rlhf_kit_stage.json").read_text())
    assert stage["metrics"]["eval_held_out"] == report["held_out"]


def test_a_file_too_small_to_hold_out_is_reported_in_sample_and_the_gate_refuses_it(tiny_base, tmp_path):
    small = tmp_path / "small.jsonl"  # 20 pairs: holding out the minimum 16 would leave too few to train on
    shutil.copy(REPO / "data/examples/preference_implicit.jsonl", small)
    out, printed = tmp_path / "rm", io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_reward(tiny_base, out, dataset_name=str(small), max_steps=3, per_device_train_batch_size=4,
                   reference_pairs=20)
    report = json.loads((out / EVAL_FILE).read_text())
    assert report["held_out"] == "in-sample" and report["pairs"] == 20
    assert "== reward model on its 20 training pairs (in-sample" in printed.getvalue()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with pytest.raises(RewardGateError, match="scores the reward model on its own training pairs"):
        gate(str(out), tokenizer, min_accuracy=0.0)
    with pytest.warns(UserWarning, match="own training pairs"):
        assert gate(str(out), tokenizer, min_accuracy=0.0, allow_weak_reward_model=True)["gate"]["overridden"]


def test_tokenizer_compatibility_rules(trained):
    rm_tok = AutoTokenizer.from_pretrained(trained["out"])
    assert tokenizer_compatibility(rm_tok, AutoTokenizer.from_pretrained(trained["out"])) == ("shared", None)
    other_pad = AutoTokenizer.from_pretrained(trained["out"])
    other_pad.pad_token = "<|endoftext|>"
    mode, problem = tokenizer_compatibility(rm_tok, other_pad)
    assert mode == "shared" and "pad id" in problem
    no_template = AutoTokenizer.from_pretrained(trained["out"])
    no_template.chat_template = None
    no_template.add_tokens(["zzz"])  # another vocabulary and no chat template: nothing to render with
    assert "no chat template" in tokenizer_compatibility(no_template, rm_tok)[1]


def turn(role, content):
    return [{"role": role, "content": content}]


GOOD = {"prompt": turn("user", "Review the tea."), "chosen": turn("assistant", "The tea is fun."),
        "rejected": turn("assistant", "The tea is dull.")}


@pytest.mark.parametrize(
    "row, error",
    [
        ({**GOOD, "rejected": turn("assistant", "The tea is fun. ")},
         "field 'rejected': chosen and rejected are identical"),
        ({**GOOD, "chosen": turn("assistant", "")}, r"field 'chosen\[0\]\.content': expected a non-empty string"),
        ({"prompt": GOOD["prompt"], "chosen": GOOD["chosen"]}, "field 'rejected': missing"),
        ({**GOOD, "chosen": turn("user", "The tea is fun.")}, r"field 'chosen\[0\]\.role': expected 'assistant'"),
        ({**GOOD, "prompt": turn("assistant", "Review the tea.")}, r"field 'prompt\[0\]\.role': expected 'user'"),
        ({**GOOD, "margin": "big"}, "field 'margin': expected a finite number"),
    ],
    ids=["identical", "empty", "missing", "chosen-role", "prompt-role", "margin"],
)
def test_each_bad_row_fails_with_its_own_error_before_a_model_loads(tmp_path, row, error):
    bad = tmp_path / "bad.jsonl"
    first = {**GOOD, "margin": 1.0} if "margin" in row else GOOD
    bad.write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2: " + error):
        run_reward("/no/such/model", tmp_path / "o", dataset_name=str(bad))


def test_contradictory_settings_fail_before_a_model_loads(tmp_path):
    with pytest.raises(ValueError, match="QLoRA keeps the LoRA and score-head weights in bfloat16"):
        run_reward("/no/such/model", tmp_path / "o", load_in_4bit=True, bf16=False)
    only_train = tmp_path / "only-train"
    only_train.mkdir()
    shutil.copy(REPO / "data/examples/preference_implicit.jsonl", only_train / "train.jsonl")
    with pytest.raises(ValueError, match="no evaluation split was found"):
        run_reward("/no/such/model", tmp_path / "o", eval_strategy="epoch", dataset_name=str(only_train))
    with pytest.raises(ValueError, match="chat_template_path is not supported"):
        run_reward("/no/such/model", tmp_path / "o", chat_template_path="x.jinja")


def test_implicit_prompt_pairs_must_share_their_prompt(tmp_path):
    row = {"chosen": turn("user", "Review the tea.") + turn("assistant", "The tea is fun."),
           "rejected": turn("user", "Review the cake.") + turn("assistant", "The cake is dull.")}
    bad = tmp_path / "implicit.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="row 1: field 'rejected': chosen and rejected must share the same prompt"):
        run_reward("/no/such/model", tmp_path / "o", dataset_name=str(bad))


@pytest.mark.parametrize("dataset, use_peft", [("data/examples/preference_standard.jsonl", False),
                                               ("data/examples/preference_implicit.jsonl", True)],
                         ids=["plain-with-margin-full", "implicit-conversational-lora"])
def test_other_formats_train_score_as_trained_and_reload(tiny_base, tmp_path, dataset, use_peft):
    out = tmp_path / "rm"
    trainer = run_reward(tiny_base, out, dataset_name=dataset, use_peft=use_peft, max_steps=3, learning_rate=1e-3,
                         per_device_train_batch_size=4, reference_pairs=20)
    assert (out / ("adapter_config.json" if use_peft else "model.safetensors")).is_file()
    rows = load_data(dataset, kind="preference")
    plain = "prompt" in rows.column_names
    assert ("margin" in trainer.train_dataset.column_names) == plain
    rm = RewardModel(trainer.model, trainer.processing_class, conversational=not plain)
    example = trainer.train_dataset[0]
    chosen, rejected = pair_samples(rows[0])
    assert rm.encode(chosen) == example["chosen_ids"] and rm.encode(rejected) == example["rejected_ids"]
    if plain:  # TRL appends EOS to plain text; the scorer must too
        assert example["chosen_ids"][-1] == trainer.processing_class.eos_token_id
    batch = trainer.data_collator([example])
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(rm.score([chosen, rejected], normalize=False), logits, rtol=0, atol=1e-5)

    reloaded = RewardModel.from_pretrained(str(out))
    assert reloaded.conversational is not plain
    torch.testing.assert_close(reloaded.score([chosen, rejected], normalize=False), logits, rtol=0, atol=1e-5)
    if plain:
        row = rows[0]
        torch.testing.assert_close(reloaded.score_texts_for([row["prompt"]], [row["chosen"]], normalize=False),
                                   logits[:1], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="plain-text pairs"):
            reloaded.score_texts_for([[{"role": "user", "content": row["prompt"]}]], [row["chosen"]])


def test_tokens_added_for_the_chat_template_are_saved_with_the_adapter(tmp_path):
    """A base lacking the chat tokens gets them as random embedding rows: a reload must not draw them again."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for r in TEST_PAIRS for m in r["prompt"] + r["chosen"] + r["rejected"]
                    for w in m["content"].replace(".", " .").replace("?", " ?").split()})
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "[UNK]", *words])}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    base = tmp_path / "base"
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]").save_pretrained(base)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, eos_token_id=0)).save_pretrained(base)
    out = tmp_path / "rm"
    trainer = run_reward(str(base), out, max_steps=3, reference_pairs=20)
    assert len(trainer.processing_class) == len(words) + 5
    saved = load_file(out / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (3, 32)
    rm = RewardModel(trainer.model, trainer.processing_class)
    torch.manual_seed(1)  # a different random draw for any embedding row the adapter did not save
    torch.testing.assert_close(RewardModel.from_pretrained(str(out)).score(samples(8), normalize=False),
                               rm.score(samples(8), normalize=False), rtol=0, atol=1e-5)


def test_qlora_reward_model_trains_on_cpu_and_reloads_in_4bit(tiny_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    snapshot = Snapshot()
    trainer = run_reward(tiny_base, out, load_in_4bit=True, use_bnb_nested_quant=True, bf16=True, use_cpu=True,
                         max_steps=10,
                         reference_pairs=50, callbacks=[snapshot])
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit
    assert "Linear4bit" in type(base.model.layers[0].self_attn.q_proj.base_layer).__name__
    assert all(changed(trainer.model, snapshot.before).values())
    curve = losses(trainer.state.log_history)
    assert curve and all(l == l for l in curve)  # finite
    meta = json.loads((out / REWARD_FILE).read_text())
    assert meta["quantization"]["load_in_4bit"] is True
    reloaded = RewardModel.from_pretrained(str(out), device="cpu")
    assert reloaded.model.get_base_model().is_loaded_in_4bit  # scored on the base it was trained and normalized on
    in_memory = RewardModel(trainer.model, trainer.processing_class, offset=meta["offset"], scale=meta["scale"])
    # Close, not identical: in memory the LoRA path computes in bf16 (TRL's QLoRA cast); PEFT reloads it in fp32.
    torch.testing.assert_close(reloaded.score(samples(8)), in_memory.score(samples(8)), rtol=0, atol=5e-2)
    with pytest.raises(ValueError, match="quantized base"):
        reloaded.save_pretrained(tmp_path / "merged")


def test_resume_after_interruption_matches_uninterrupted_run(tiny_base, tmp_path):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3, save_total_limit=None, logging_steps=1,
                    reference_pairs=20)
    straight = run_reward(tiny_base, tmp_path / "straight", **settings)
    with pytest.raises(KeyboardInterrupt):
        run_reward(tiny_base, tmp_path / "resumed", callbacks=[Interrupt(at_step=4)], **settings)
    assert (tmp_path / "resumed/checkpoint-3").is_dir() and not (tmp_path / "resumed/checkpoint-6").exists()
    steps = StepRecorder()
    resumed = run_reward(tiny_base, tmp_path / "resumed", callbacks=[steps], **settings)  # same command: checkpoint-3
    assert steps.steps == [4, 5, 6]
    assert losses(resumed.state.log_history) == pytest.approx(losses(straight.state.log_history), rel=1e-4)
    assert (tmp_path / "resumed" / EVAL_FILE).is_file()
    # The record describes the whole run, not only the steps trained after the resume (issue 15, item 4).
    def record_loss(out):
        return json.loads((out / "rlhf_kit_stage.json").read_text())["metrics"]["train_loss"]

    assert record_loss(tmp_path / "resumed") == pytest.approx(record_loss(tmp_path / "straight"), rel=1e-4)


def test_pairwise_report_by_hand():
    """margins [1, 0, -2, 3, 0.5]: 3 of 5 strict wins (the tie is a miss), mean margin 0.5.

    Two buckets by ascending |margin|: {0, 0.5, 1} -> 2/3 right, expected mean(sigmoid(0, .5, 1)) = 0.61784;
    {2, 3} (the -2 is wrong) -> 1/2 right, expected mean(sigmoid(2, 3)) = 0.91669.
    calibration error = (3 * |0.66667 - 0.61784| + 2 * |0.5 - 0.91669|) / 5 = 0.19597.
    """
    report = pairwise_report(torch.tensor([2.0, 1.0, 0.0, 3.0, 0.5]), torch.tensor([1.0, 1.0, 2.0, 0.0, 0.0]),
                             buckets=2)
    assert report["accuracy"] == pytest.approx(0.6) and report["ties"] == 1
    assert report["mean_margin"] == pytest.approx(0.5)
    low, high = report["calibration"]
    assert (low["pairs"], high["pairs"]) == (3, 2)
    assert (low["margin_min"], low["margin_max"], high["margin_min"], high["margin_max"]) == (0.0, 1.0, 2.0, 3.0)
    assert low["accuracy"] == pytest.approx(2 / 3) and low["expected_accuracy"] == pytest.approx(0.61784, abs=1e-5)
    assert high["accuracy"] == pytest.approx(0.5) and high["expected_accuracy"] == pytest.approx(0.91669, abs=1e-5)
    assert report["calibration_error"] == pytest.approx(0.19597, abs=1e-5)
    assert report["chosen"]["mean"] == pytest.approx(1.3) and report["rejected"]["mean"] == pytest.approx(0.8)


def test_fit_normalization_by_hand():
    # mean 2.5; std with Bessel's correction sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
    assert fit_normalization(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        {"offset": 2.5, "scale": (5 / 3) ** 0.5})
    with pytest.raises(ValueError, match="same score"):
        fit_normalization(torch.full((6,), 0.3))


def test_a_causal_lm_loads_as_a_reward_model_without_the_new_head_report_and_other_keys_still_show(
        tiny_base, tmp_path):
    """The reward stage loads its causal-LM base as a classifier: `score` is new and `lm_head` unused, by design, and
    transformers printed a LOAD REPORT table about it ("newly initialized") on every run. Anything else it would say,
    such as a weight the model does not know, is still shown."""
    import logging

    from rlhf_kit.model import ModelArguments, load_model, load_tokenizer

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    # On transformers' logger itself: it does not propagate to the root logger, so caplog would never see it.
    recorder, log = Recorder(), logging.getLogger("transformers.modeling_utils")
    log.addHandler(recorder)
    try:
        tokenizer = load_tokenizer(tiny_base)
        load_model(ModelArguments(model_name_or_path=tiny_base), tokenizer, sequence_classification=True)
        assert not [m for m in recorder.messages if "LOAD REPORT" in m]

        odd = tmp_path / "odd-base"
        shutil.copytree(tiny_base, odd)
        weights = load_file(odd / "model.safetensors")
        save_file({**weights, "model.stray.weight": torch.zeros(2)}, odd / "model.safetensors",
                  metadata={"format": "pt"})
        load_model(ModelArguments(model_name_or_path=str(odd)), tokenizer, sequence_classification=True)
        reports = [m for m in recorder.messages if "LOAD REPORT" in m]
        assert len(reports) == 1 and "model.stray.weight" in reports[0]
    finally:
        log.removeHandler(recorder)
