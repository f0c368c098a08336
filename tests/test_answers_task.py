"""The review questions with a checkable answer (rlhf_kit.tasks.answers), their shipped data, and self-consistency
measured on them: evaluation's one-sample and vote rows, and the pipeline report's section."""

import doctest
import json
import math
import random
from pathlib import Path

import pytest
from conftest import REPO, load_make_datasets, load_recipe, read_jsonl, trained_quietly

from rlhf_kit.config import ConfigError
from rlhf_kit.tasks import answers

DATA = REPO / "data"
ANSWER_FILES = [f"answers/{kind}/{split}.jsonl" for kind in ("sft", "prompts") for split in ("train", "test")]


def ask(review: str, question_id: int = 0) -> str:
    return answers.QUESTIONS[question_id].format(review=review)


# --- the gold answer and the annotator -------------------------------------------
@pytest.mark.parametrize("review, gold", [
    ("The coffee is great.", "positive"),
    ("The coffee is dull.", "negative"),
    ("The coffee is great and dull and lovely.", "positive"),  # 2 against 1
    ("The coffee is dull and great and awful.", "negative"),  # 1 against 2
    ("The tent is horrible and annoying and fun and messy and amazing.", "negative"),  # 2 against 3
    ("The hat is fun and poor and superb and dirty and cozy.", "positive"),  # 3 against 2
])
def test_answer_is_the_sentiment_of_most_adjectives_in_every_phrasing(review, gold):
    for question_id in range(len(answers.QUESTIONS)):
        assert answers.answer(ask(review, question_id)) == gold
    assert answers.answer([{"role": "system", "content": "x"}, {"role": "user", "content": ask(review)}]) == gold


@pytest.mark.parametrize("prompt", [
    "Review the coffee.",  # the review task's prompt
    ask("The coffee is great and red."),  # a neutral adjective: not a question of this task
    ask("The dragon is great."),  # not an item
    ask("The coffee is great"),  # no period
    "Is this review good or bad? The coffee is great.",
])
def test_prompts_outside_the_task_are_refused(prompt):
    assert answers.review_of(prompt) is None
    with pytest.raises(ValueError, match="not a task prompt"):
        answers.answer(prompt)


def test_make_prompt_reads_back_and_refuses_neutral_or_unknown_words():
    adjectives = ["great", "dull", "fun"]
    assert answers.review_of(answers.make_prompt("tea", adjectives, 1)) == ("tea", adjectives)
    for item, adjectives in (("tea", ["red"]), ("dragon", ["great"]), ("tea", [])):
        with pytest.raises(ValueError, match="positive or negative"):
            answers.make_prompt(item, adjectives)


@pytest.mark.parametrize("response, score", [
    ("positive", 1.0), ("Positive.", 1.0), ("  positive \n", 1.0),  # stripped, one final period, any case
    ("negative", 0.0),  # the wrong answer
    ("pos", 0.0), ("positive positive", 0.0), ("It is positive.", 0.0), ("", 0.0),  # no answer
])
def test_gold_score_is_exact_match(response, score):
    prompt = ask("The coffee is great and dull and lovely.")
    assert answers.gold_score(prompt, response) == score
    assert answers.gold_score(prompt, [{"role": "assistant", "content": response}]) == score


def test_metrics_on_hand_written_responses():
    prompts = [ask("The tea is bland."), ask("The tea is fun.", 2), ask("The car is ugly and fun and lovely.", 1)]
    metrics = answers.metrics(prompts, ["negative", "negative", "blue"])
    # right, wrong, no answer
    assert metrics == {"exact_match": pytest.approx(1 / 3), "answer_rate": pytest.approx(2 / 3),
                       "gold_score": pytest.approx(1 / 3)}
    assert answers.gold(prompts, ["negative", "positive", "positive"]) == [1.0, 1.0, 1.0]
    assert doctest.testmod(answers).failed == 0


def test_generators_are_reproducible_and_balanced():
    first = answers.examples(random.Random("seed"), 500)
    assert first == answers.examples(random.Random("seed"), 500)
    assert 0.45 < sum(a == "positive" for _, a in first) / len(first) < 0.55
    assert {len(answers.review_of(p)[1]) for p, _ in first} == set(answers.ADJECTIVE_COUNTS)


# --- the shipped files -------------------------------------------------------------
def test_shipped_files_are_what_make_datasets_writes():
    files = load_make_datasets().build_files()
    assert sorted(n for n in files if n.startswith("answers/")) == sorted(ANSWER_FILES)
    for name in ANSWER_FILES:
        assert (DATA / name).read_bytes() == files[name].encode("utf-8"), "run `python data/make_datasets.py`"


def review_text(prompt) -> str:
    item, adjectives = answers.review_of(prompt)
    return f"{item}:{' '.join(adjectives)}"


def test_no_test_review_appears_in_training_data_in_any_phrasing():
    rows = {name: read_jsonl(DATA / name) for name in ANSWER_FILES}
    prompts = {name: [r["messages"][0]["content"] if "messages" in r else r["prompt"][0]["content"] for r in got]
               for name, got in rows.items()}
    for name, texts in prompts.items():
        split = "test" if name.endswith("test.jsonl") else "train"
        assert all(answers.split_of(*answers.review_of(p)) == split for p in texts), name
    train = {review_text(p) for name, texts in prompts.items() if "train" in name for p in texts}
    test = {review_text(p) for name, texts in prompts.items() if "test" in name for p in texts}
    assert len(test) > 250 and not train & test
    # Every row carries its gold answer, and the test prompts are distinct enough to measure on.
    for row in rows["answers/sft/train.jsonl"] + rows["answers/sft/test.jsonl"]:
        assert row["messages"][1]["content"] == answers.answer(row["messages"][0]["content"])
    for row in rows["answers/prompts/test.jsonl"]:
        assert row["answer"] == answers.answer(row["prompt"])
    assert len(set(prompts["answers/prompts/test.jsonl"])) >= 95


# --- self-consistency on a tiny model -------------------------------------------------
@pytest.fixture(scope="module")
def answers_sft(tiny_base, tmp_path_factory) -> str:
    """The tiny base fine-tuned briefly on the questions: it answers with one of the two words, but often wrongly,
    so its samples disagree and the vote has something to decide."""
    out = tmp_path_factory.mktemp("answers-sft")
    with trained_quietly():
        load_recipe("sft")(["--config", "recipes/configs/sft/tiny-answers.yaml"], overrides={
            "model_name_or_path": tiny_base, "output_dir": str(out), "use_peft": False, "max_steps": 60,
            "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler_type": "constant", "save_strategy": "no",
            "logging_steps": 50, "disable_tqdm": True})
    return str(out)


PROMPTS = [r["prompt"] for r in read_jsonl(DATA / "answers/prompts/test.jsonl", limit=12)]


def test_self_consistency_rows_agree_with_the_recorded_votes(answers_sft, single_thread):
    from rlhf_kit.inference.evaluation import VoteResult, evaluate_self_consistency
    from rlhf_kit.inference.generation import load_policy

    one, first_answer, vote = evaluate_self_consistency(
        load_policy(answers_sft, "sft"), PROMPTS, task=answers, n=5, answer_pattern="rlhf_kit.tasks.answers:answer_of",
        max_new_tokens=8)
    assert [r.name for r in (one, first_answer, vote)] == ["sft_one_sample", "sft_first_answer_of_5", "sft_vote_of_5"]
    assert isinstance(vote, VoteResult) and len(vote.samples) == len(vote.votes) == len(PROMPTS)
    assert all(len(s) == 5 for s in vote.samples)
    gold = [answers.answer(p) for p in PROMPTS]
    for samples, v, kept, first, answered in zip(vote.samples, vote.votes, vote.responses, one.responses,
                                                 first_answer.responses):
        said = [answers.answer_of(s) for s in samples]
        assert v.counts == {a: said.count(a) for a in dict.fromkeys(a for a in said if a)}
        assert v.answer is None or v.counts[v.answer] == max(v.counts.values())
        assert kept == samples[v.index] and answers.answer_of(kept) == v.answer and first == samples[0]
        assert answered == next((s for s, a in zip(samples, said) if a), samples[0])
    n = len(PROMPTS)
    right = {"one": [answers.answer_of(s[0]) == g for s, g in zip(vote.samples, gold)],
             "first_answer": [next((a == g for a in map(answers.answer_of, s) if a), False)
                              for s, g in zip(vote.samples, gold)],
             "vote": [v.answer == g for v, g in zip(vote.votes, gold)]}
    for row, key in ((one, "one"), (first_answer, "first_answer"), (vote, "vote")):
        p = sum(right[key]) / n
        assert row.metrics["exact_match"] == pytest.approx(p)
        assert row.metrics["exact_match_se"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))  # 0/1 values
    for baseline, key in (("one_sample", "one"), ("first_answer", "first_answer")):
        diffs = [float(v) - float(b) for v, b in zip(right["vote"], right[key])]
        mean = sum(diffs) / n
        assert vote.metrics[f"gain_vs_{baseline}"] == pytest.approx(mean)
        assert vote.metrics[f"gain_vs_{baseline}_se"] == pytest.approx(
            math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n))
    assert vote.metrics["pass_at_n"] == pytest.approx(
        sum(any(answers.answer_of(r) == g for r in s) for s, g in zip(vote.samples, gold)) / n)
    # The briefly trained model answers, but not always the same: otherwise the vote would decide nothing.
    assert vote.metrics["answer_rate"] >= 0.9 and any(len(v.counts) == 2 for v in vote.votes)
    with pytest.raises(ValueError, match="n >= 2"):
        evaluate_self_consistency(load_policy(answers_sft, "sft"), PROMPTS, task=answers, n=1)


def pipeline_config(tmp_path: Path, **evaluation):
    from rlhf_kit.pipeline import PipelineConfig

    return PipelineConfig(output_dir=str(tmp_path), stages={"pretrain": "recipes/configs/pretrain/tiny.yaml",
                                                            "sft": "recipes/configs/sft/tiny-answers.yaml"},
                          evaluation={"prompts": "data/answers/prompts", "task": "rlhf_kit.tasks.answers",
                                      **evaluation})


def test_report_adds_the_self_consistency_section(answers_sft, tiny_base, tmp_path, monkeypatch, single_thread):
    from rlhf_kit.pipeline import report

    monkeypatch.chdir(REPO)
    (tmp_path / "pretrain").symlink_to(tiny_base)
    (tmp_path / "sft").symlink_to(answers_sft)
    config = pipeline_config(tmp_path, num_prompts=6, max_new_tokens=12, vote_n=3,
                             answer_pattern="rlhf_kit.tasks.answers:answer_of", constrained=True)
    data = report(config)
    # The task's ANSWER_REGEX holds constrained decoding to the two answers: every such response is one.
    assert data["rows"]["sft_constrained"]["answer_rate"] == data["rows"]["base_constrained"]["answer_rate"] == 1.0
    # The base model is not asked.
    assert list(data["self_consistency"]) == ["sft_one_sample", "sft_first_answer_of_3", "sft_vote_of_3"]
    assert set(data["rows"]) == {"base", "sft", "base_constrained", "sft_constrained"}  # the main table as ever
    md = (tmp_path / "report.md").read_text()
    assert "## Self-consistency: one sampled answer vs the majority vote of 3" in md
    assert "| sft_vote_of_3 |" in md and "| gain_vs_one_sample | gain_vs_first_answer |" in md and " ± " in md
    assert json.loads((tmp_path / "report.json").read_text())["self_consistency"] == data["self_consistency"]


@pytest.mark.parametrize("evaluation, message", [
    ({"vote_n": 1}, "vote_n must be a whole number >= 2"),
    ({"vote_n": 8, "task": None}, "vote_n must be a whole number >= 2"),
    ({"vote_n": 8, "answer_pattern": "answer: (\\w+"}, "answer_pattern: .*not a valid regular expression"),
    ({"vote_n": 8, "answer_pattern": "no_such_module:f"}, "answer_pattern: .*cannot be imported"),
])
def test_bad_self_consistency_settings_fail_before_any_stage(evaluation, message, tmp_path, monkeypatch):
    from rlhf_kit.pipeline import check_pipeline

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=message):
        check_pipeline(pipeline_config(tmp_path, **evaluation))
