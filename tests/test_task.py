"""Tests of the synthetic review task, its gold annotator and the shipped datasets."""

import doctest
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_make_datasets

from rlhf_kit.tasks import review as task

DATA = Path(__file__).resolve().parents[1] / "data"


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


PROMPT = "Review the coffee."


# --- vocabulary and prompts --------------------------------------------------
def test_vocabulary_is_lowercase_single_words_and_disjoint():
    lists = [task.ITEMS, task.POSITIVE, task.NEGATIVE, task.NEUTRAL]
    words = [w for words in lists for w in words]
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert len(words) == len(set(words)), "a word in two lists would make its sentiment ambiguous"
    assert (len(task.ITEMS), len(task.POSITIVE), len(task.NEGATIVE), len(task.NEUTRAL)) == (30, 15, 15, 10)


def test_item_of_parses_every_template_back():
    for item in task.ITEMS:
        for template_id in range(len(task.TEMPLATES)):
            assert task.item_of(task.make_prompt(item, template_id)) == item
    assert task.item_of("  What do you think of the book?\n") == "book"
    assert task.item_of([{"role": "system", "content": "x"}, {"role": "user", "content": PROMPT}]) == "coffee"


@pytest.mark.parametrize("text", ["Review the dragon.", "Review the coffee", "review the coffee.", "Hello.", ""])
def test_item_of_rejects_non_task_prompts(text):
    assert task.item_of(text) is None


def test_make_prompt_rejects_unknown_items():
    with pytest.raises(ValueError, match="unknown item"):
        task.make_prompt("dragon", 0)


# --- the gold annotator ------------------------------------------------------
@pytest.mark.parametrize(
    "response, expected",
    [
        # well-formed: mean of +1 / -1 / 0
        ("The coffee is great.", 1.0),
        ("The coffee is great and cozy and fun and lovely.", 1.0),  # four is the maximum
        ("The coffee is awful and boring.", -1.0),
        ("The coffee is small.", 0.0),
        ("The coffee is great and red.", 0.5),  # (1 + 0) / 2
        ("The coffee is great and awful and red.", 0.0),  # (1 - 1 + 0) / 3
        ("The coffee is great and wonderful and awful.", 1 / 3),  # (1 + 1 - 1) / 3
        ("  The coffee is great.\n", 1.0),  # whitespace at the ends is stripped
        # repetition: every extra use of an adjective counts -1
        ("The coffee is great and great.", 0.0),  # (1 - 1) / 2
        ("The coffee is great and great and great.", -1 / 3),  # (1 - 1 - 1) / 3
        ("The coffee is great and cozy and great.", 1 / 3),  # (1 + 1 - 1) / 3
        ("The coffee is awful and awful.", -1.0),  # (-1 - 1) / 2
        ("The coffee is small and small and small and small.", -0.75),  # (0 - 3) / 4
        # malformed: -2
        ("The phone is great.", -2.0),  # another item
        ("The dragon is great.", -2.0),  # not an item at all
        ("The coffee is great and cozy and fun and lovely and new.", -2.0),  # five adjectives
        ("The coffee is good.", -2.0),  # not in the adjective lists
        ("The coffee is very great.", -2.0),
        ("The coffee is great", -2.0),  # truncated
        ("The coffee is", -2.0),
        ("the coffee is great.", -2.0),
        ("The coffee is great, and cozy.", -2.0),
        ("The coffee is great. The coffee is great.", -2.0),  # run on
        ("The coffee is great.\nThanks!", -2.0),
        ("", -2.0),
    ],
)
def test_gold_score_hand_checked(response, expected):
    assert task.gold_score(PROMPT, response) == pytest.approx(expected)
    assert task.follows_format(PROMPT, response) == (expected != -2.0)


def test_gold_score_reads_conversational_prompts_and_completions():
    prompt = [{"role": "user", "content": "What do you think of the hotel?"}]
    completion = [{"role": "assistant", "content": "The hotel is lovely and noisy and red."}]
    assert task.gold_score(prompt, completion) == 0.0


def test_gold_score_refuses_prompts_outside_the_task():
    with pytest.raises(ValueError, match="not a task prompt"):
        task.gold_score("<|user|>Review the coffee.", "The coffee is great.")


def test_gold_prefers_is_strict():
    assert task.gold_prefers(PROMPT, "The coffee is great.", "The coffee is red.")
    assert not task.gold_prefers(PROMPT, "The coffee is red.", "The coffee is great.")
    assert not task.gold_prefers(PROMPT, "The coffee is red.", "The coffee is new.")  # tie
    assert task.gold_prefers(PROMPT, "The coffee is awful.", "The phone is great.")  # any well-formed beats malformed


# --- the split ---------------------------------------------------------------
def test_split_holds_out_one_phrasing_per_item():
    test, train = task.combinations("test"), task.combinations("train")
    assert len(test) == len(task.ITEMS) and len(train) == 3 * len(task.ITEMS)
    assert sorted(item for item, _ in test) == sorted(task.ITEMS)
    assert {item for item, _ in train} == set(task.ITEMS)
    assert task.split_of("coffee", 0) == "test" and task.split_of("movie", 1) == "test"  # items 0 and 1
    assert task.split_of("coffee", 1) == "train"
    assert {t for _, t in train} == {t for _, t in test} == set(range(len(task.TEMPLATES)))


@pytest.mark.parametrize("split", ["train", "test"])
def test_generators_draw_prompts_from_their_split_only(split):
    allowed = {task.make_prompt(i, t) for i, t in task.combinations(split)}
    rng = random.Random(0)
    assert set(task.rl_prompts(rng, 300, split)) <= allowed
    assert {p for p, _ in task.sft_examples(rng, 300, split)} <= allowed
    assert {p.prompt for p in task.preference_pairs(rng, 300, split)} <= allowed


# --- generators --------------------------------------------------------------
def test_generators_are_deterministic_given_the_seed():
    def everything(seed):
        rng = random.Random(seed)
        return (
            task.pretraining_corpus(rng, 20),
            task.sft_examples(rng, 20),
            task.preference_pairs(rng, 20),
            task.rl_prompts(rng, 20),
            [task.sample_response(rng, "tea") for _ in range(20)],
            [task.degraded_response(rng, "tea") for _ in range(20)],
        )

    assert everything(1) == everything(1)
    assert everything(1) != everything(2)


def test_sample_response_is_well_formed_with_distinct_adjectives():
    rng = random.Random(0)
    for _ in range(500):
        response = task.sample_response(rng, "book")
        adjectives = response.removeprefix("The book is ").removesuffix(".").split(" and ")
        assert task.follows_format("Review the book.", response)
        assert 1 <= len(adjectives) <= 3 and len(set(adjectives)) == len(adjectives)


@pytest.mark.parametrize("sentiment, score", [("positive", 1.0), ("negative", -1.0), ("neutral", 0.0)])
def test_sample_response_with_a_sentiment(sentiment, score):
    rng = random.Random(0)
    assert {task.gold_score("Review the book.", task.sample_response(rng, "book", sentiment)) for _ in range(50)} == {score}


def test_sft_demonstrations_are_sentiment_neutral_on_average():
    """SFT should teach the format only; preferring positive reviews is PPO's job."""
    examples = task.sft_examples(random.Random(0), 4000)
    mean = sum(task.gold_score(p, r) for p, r in examples) / len(examples)
    assert abs(mean) < 0.05


def test_degraded_responses_are_malformed_or_repetitive():
    rng = random.Random(0)
    for _ in range(300):
        response = task.degraded_response(rng, "lamp")
        adjectives = response.removeprefix("The lamp is ").removesuffix(".").split(" and ")
        repetitive = len(set(adjectives)) < len(adjectives)
        assert not task.follows_format("Review the lamp.", response) or repetitive, response


def test_pretraining_corpus_is_plain_paragraphs_without_chat_format():
    paragraphs = task.pretraining_corpus(random.Random(0), 200)
    for paragraph in paragraphs:
        sentences = re.findall(r"[^.?]+[.?]", paragraph)
        assert 5 <= len(sentences) <= 10
        assert not re.search(r"user|assistant|system|<|\n", paragraph, re.IGNORECASE)
    assert any(re.search(r"The [a-z]+ is [a-z]+ and [a-z]+\.", p) for p in paragraphs)


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3])
def test_label_noise_rate_matches_the_request(noise):
    pairs = task.preference_pairs(random.Random(0), 4000, noise=noise)
    # Judged by the gold annotator, not by the flag the generator reports.
    disagree = [not task.gold_prefers(p.prompt, p.chosen, p.rejected) for p in pairs]
    assert disagree == [p.flipped for p in pairs]
    assert abs(sum(disagree) / len(pairs) - noise) < 0.02  # standard error <= 0.0073


def test_preference_pairs_have_no_ties_and_teach_format():
    pairs = task.preference_pairs(random.Random(0), 1000, noise=0.0)
    assert all(p.chosen != p.rejected and p.margin > 0 for p in pairs)
    malformed = sum(not task.follows_format(p.prompt, p.rejected) for p in pairs) / len(pairs)
    # About 45% (20k-pair estimate): enough pairs teach the format; the rest, well-formed, teach content.
    assert 0.35 < malformed < 0.55


def test_wrong_item_pairs_differ_in_the_item_alone_and_carry_the_requested_noise():
    pairs = task.wrong_item_pairs(random.Random(0), 4000, noise=0.1)
    disagree = [not task.gold_prefers(p.prompt, p.chosen, p.rejected) for p in pairs]
    assert disagree == [p.flipped for p in pairs]
    assert abs(sum(disagree) / len(pairs) - 0.1) < 0.02
    for p in pairs:
        good, bad = (p.rejected, p.chosen) if p.flipped else (p.chosen, p.rejected)
        assert good.split()[1] == task.item_of(p.prompt) != bad.split()[1]
        assert good.split()[2:] == bad.split()[2:]  # the same review otherwise


def test_shipped_preference_training_split_has_the_extra_wrong_item_pairs():
    """The mixed pairs stay the generator's first draws; the wrong-item ones are added to train, never to test."""
    make_datasets = load_make_datasets()
    train, test = read_jsonl("preference/train.jsonl"), read_jsonl("preference/test.jsonl")
    n_train, n_test = make_datasets.SIZES["preference"]
    assert len(train) == n_train + make_datasets.WRONG_ITEM_PAIRS and len(test) == n_test

    def only_item_differs(row):
        a, b = row["chosen"][0]["content"].split(), row["rejected"][0]["content"].split()
        return len(a) > 2 and len(b) > 2 and a[1] != b[1] and a[2:] == b[2:]

    # The mix alone has about a fifth of them (the test split's share); train has the added ones on top.
    assert 0.15 < sum(map(only_item_differs, test)) / n_test < 0.3
    share = sum(map(only_item_differs, train)) / len(train)
    expected = (0.2 * n_train + make_datasets.WRONG_ITEM_PAIRS) / len(train)
    assert abs(share - expected) < 0.03


# --- the shipped files -------------------------------------------------------
def test_shipped_files_are_exactly_what_make_datasets_writes(tmp_path):
    written = load_make_datasets().write_datasets(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    shipped = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.suffix in (".jsonl", ".csv")}
    assert shipped == names, "stale or missing files; run `python data/make_datasets.py`"
    for name in names:
        assert (DATA / name).read_bytes() == (tmp_path / name).read_bytes(), (
            f"data/{name} differs from the generator; run `python data/make_datasets.py`"
        )


def test_no_test_prompt_appears_in_training_data():
    test_prompts = {task.make_prompt(i, t) for i, t in task.combinations("test")}
    shipped_test = (
        {r["prompt"][0]["content"] for r in read_jsonl("prompts/test.jsonl")}
        | {r["messages"][-2]["content"] for r in read_jsonl("sft/test.jsonl")}
        | {r["prompt"][0]["content"] for r in read_jsonl("preference/test.jsonl")}
    )
    assert shipped_test <= test_prompts
    train_prompts = (
        {r["prompt"][0]["content"] for r in read_jsonl("prompts/train.jsonl")}
        | {r["messages"][-2]["content"] for r in read_jsonl("sft/train.jsonl")}
        | {r["prompt"][0]["content"] for r in read_jsonl("preference/train.jsonl")}
    )
    assert not train_prompts & test_prompts
    examples = "".join(p.read_text(encoding="utf-8") for p in (DATA / "examples").iterdir())
    pretrain = (DATA / "pretrain/train.jsonl").read_text(encoding="utf-8")
    assert not [p for p in test_prompts if p in pretrain or p in examples]


def test_shipped_sft_and_preference_splits():
    sft = read_jsonl("sft/train.jsonl")
    with_system = sum(r["messages"][0]["role"] == "system" for r in sft) / len(sft)
    assert 0.07 < with_system < 0.13
    assert all(task.follows_format(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in sft)
    # The test split carries no label noise: it measures agreement with the gold annotator.
    for row in read_jsonl("preference/test.jsonl"):
        prompt = row["prompt"][0]["content"]
        assert task.gold_prefers(prompt, row["chosen"][0]["content"], row["rejected"][0]["content"])
    assert all(r["item"] == task.item_of(r["prompt"]) for r in read_jsonl("prompts/train.jsonl"))


def test_documented_examples_run():
    """The examples in task.py's docstrings and data/README.md are the task's spec; keep them true."""
    assert doctest.testmod(task).failed == 0
    assert doctest.testfile(str(DATA / "README.md"), module_relative=False).failed == 0


def test_readme_command_writes_the_datasets(tmp_path):
    """`python data/make_datasets.py --out DIR` from the repo root, as data/README.md says."""
    subprocess.run(
        [sys.executable, "data/make_datasets.py", "--out", str(tmp_path)], cwd=DATA.parent, check=True, capture_output=True
    )
    assert (tmp_path / "sft/train.jsonl").read_bytes() == (DATA / "sft/train.jsonl").read_bytes()


def test_review_shape_ignores_which_item():
    from rlhf_kit.tasks.review import has_review_shape

    assert has_review_shape("The phone is great and red.")  # right shape, whichever item the prompt named
    assert has_review_shape([{"role": "assistant", "content": " The coffee is bland. "}])
    assert not has_review_shape("The phone is great and xylophone.")  # not a task word
    assert not has_review_shape("The phone is great")  # no period
    assert not has_review_shape("I bought a new phone yesterday.")
