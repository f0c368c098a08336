"""The shop task (rlhf_kit.tasks.shop): its questions and gold answers, the reading of a response, the separation of
the training catalogs' facts from the test catalog's, and its shipped data."""

import doctest
import json
import random
import re

import pytest
from conftest import REPO, load_make_datasets, read_jsonl

from rlhf_kit.inference.calculator import calculator
from rlhf_kit.tasks import shop
from rlhf_kit.tasks.shop import TEST_CATALOG

DATA = REPO / "data"
SHOP_FILES = [f"shop/{kind}/{split}.jsonl" for kind in ("pretrain", "sft", "prompts") for split in ("train", "test")]


def test_doctests():
    assert doctest.testmod(shop).failed == 0


# --- questions and their gold answers ------------------------------------------------
def test_gold_answers_by_hand():
    catalog = {item: shop.Fact(price=10, stock=3) for item in shop.ITEMS} | {"lamp": shop.Fact(12, 5),
                                                                             "mug": shop.Fact(4, 9)}
    assert shop.answer("How much does the lamp cost?", catalog) == 12
    assert shop.answer("What is the price of the mug?", catalog) == 4
    assert shop.answer("How many lamps are in stock?", catalog) == 5
    assert shop.answer("How many mugs does the shop have?", catalog) == 9
    assert shop.answer("What do 3 lamps and 2 mugs cost?", catalog) == 44
    assert shop.expression_of("How much are 3 lamps and 2 mugs?", catalog) == "3*12+2*4"
    assert shop.answer("What do 2 boxes and 5 brushes cost?", catalog) == 70  # plurals in -es
    assert shop.facts_said("What do 3 lamps and 2 mugs cost?", catalog) == ("The lamp costs 12 dollars. "
                                                                            "The mug costs 4 dollars.")
    assert shop.facts_said("How many mugs does the shop have?", catalog) == "There are 9 mugs in stock."
    assert shop.needed_passages("What do 3 lamps and 2 mugs cost?", catalog) == [
        "The lamp costs 12 dollars. There are 5 lamps in stock.", "The mug costs 4 dollars. There are 9 mugs in stock."]
    # The user message of a conversation is read, as the shipped prompts give it.
    assert shop.answer([{"role": "system", "content": "Documents:\n[1] x"},
                        {"role": "user", "content": "How much does the lamp cost?"}], catalog) == 12


def test_every_question_reads_back():
    rng = random.Random(0)
    questions = shop.all_single_questions() + [shop.sample_question(rng, "total", split)
                                               for split in ("train", "test") for _ in range(200)]
    for question in questions:
        assert shop.question_of(shop.make_prompt(question)) == question


@pytest.mark.parametrize("prompt", [
    "How much does the dragon cost?",  # not an item
    "How much does the lamp cost",  # no question mark
    "What do 3 lamps and 3 lamps cost?",  # the same item twice
    "What do 9 lamps and 2 mugs cost?",  # a count outside COUNTS
    "Review the lamp.",
])
def test_prompts_outside_the_task_are_refused(prompt):
    assert shop.question_of(prompt) is None
    with pytest.raises(ValueError, match="not a task prompt"):
        shop.answer(prompt)


# --- reading a response and the annotator ----------------------------------------------
@pytest.mark.parametrize("response, number", [
    ("44", 44), (" 44\n", 44), ("$44", 44), ("44 dollars.", 44), ("The lamp costs 12 dollars.", 12),
    ("There are 5 lamps in stock.", 5),
    ("The lamp costs 12 dollars. The mug costs 4 dollars. So they cost 44 dollars.", 44),
    ("", None), ("forty-four", None),
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*12+2*4"}}\n</tool_call>', None),
    ([{"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]},
      {"role": "tool", "name": "calculator", "content": "44"}, {"role": "assistant", "content": "44"}], 44),
    ([{"role": "assistant", "content": None}], None),
])
def test_answer_of_reads_the_last_number_of_the_final_answer(response, number):
    assert shop.answer_of(response) == number


def test_gold_score_gold_and_metrics():
    price = "How much does the lamp cost?"
    right, wrong = str(TEST_CATALOG["lamp"].price), str(TEST_CATALOG["lamp"].price + 1)
    assert shop.gold_score(price, right) == 1.0 and shop.gold_score(price, wrong) == 0.0
    assert shop.gold([price, price], [right, "no idea"]) == [1.0, 0.0]
    total = "What do 3 lamps and 2 mugs cost?"
    metrics = shop.metrics([price, price, total], [right, "no idea", str(shop.answer(total))])
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["answer_rate"] == pytest.approx(2 / 3)
    assert metrics["exact_match_price"] == 0.5 and metrics["exact_match_total"] == 1.0
    assert "exact_match_stock" not in metrics  # no stock question asked
    assert re.fullmatch(shop.ANSWER_REGEX, right)


# --- the test catalog's facts appear in no training text --------------------------------
def test_training_catalogs_never_state_a_test_fact():
    rng = random.Random(0)
    for _ in range(500):
        for item, fact in shop.train_catalog(rng).items():
            assert fact.price != TEST_CATALOG[item].price and fact.stock != TEST_CATALOG[item].stock
            assert fact.price in shop.PRICES and fact.stock in shop.STOCKS


def test_no_shipped_training_text_states_a_test_fact():
    test_passages = set(shop.passages(TEST_CATALOG))
    test_facts = {f"The {i} costs {f.price} dollars." for i, f in TEST_CATALOG.items()} | {
        f"There are {f.stock} {shop.PLURALS[i]} in stock." for i, f in TEST_CATALOG.items()}
    for name in ("shop/pretrain/train.jsonl", "shop/pretrain/test.jsonl", "shop/sft/train.jsonl",
                 "shop/sft/test.jsonl"):
        text = (DATA / name).read_text(encoding="utf-8")
        assert not any(fact in text for fact in test_facts), name
    assert {row["text"] for row in read_jsonl(DATA / "shop/catalog.jsonl")} == test_passages


def test_no_test_question_appears_in_training_data():
    asked = {row["messages"][[m["role"] for m in row["messages"]].index("user")]["content"]
             for row in read_jsonl(DATA / "shop/sft/train.jsonl")}
    asked |= {row["prompt"][0]["content"] for row in read_jsonl(DATA / "shop/prompts/train.jsonl")}
    held_out = [row["prompt"][0]["content"] for row in read_jsonl(DATA / "shop/prompts/test.jsonl")]
    assert len(set(held_out)) == len(held_out) == 100
    assert not asked & set(held_out)
    assert all(shop.split_of(shop.question_of(q)) == "test" for q in held_out)


# --- the shipped data ----------------------------------------------------------------------------
def test_shop_files_are_reproducible_byte_for_byte():
    make = load_make_datasets()
    first, second = make.build_files(), make.build_files()
    for name in SHOP_FILES + ["shop/catalog.jsonl"]:
        assert first[name] == second[name] == (DATA / name).read_text(encoding="utf-8"), name


def catalog_of(messages: list[dict]) -> dict:
    """The facts the retrieved passages of a demonstration state."""
    if messages[0]["role"] != "system":
        return {}
    catalog = {}
    for line in messages[0]["content"].split("\n")[1:]:
        item, price, stock = re.fullmatch(r"\[\d\] The (\w+) costs (\d+) dollars\. There are (\d+) \w+ in stock\.",
                                          line).groups()
        catalog[item] = shop.Fact(int(price), int(stock))
    return catalog


def test_sft_rows_are_trl_tool_calling_conversations_with_the_right_answers():
    rows = read_jsonl(DATA / "shop/sft/train.jsonl")
    kinds = {"calls": 0, "documents": 0}
    for row in rows:
        assert set(row) == {"tools", "messages"} and row["tools"] in ([], [shop.CALCULATOR_SCHEMA])
        messages = row["messages"]
        roles = [m["role"] for m in messages]
        question = messages[roles.index("user")]["content"]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"], ["user", "assistant", "tool",
                         "assistant"], ["system", "user", "assistant", "tool", "assistant"])
        if "tool" in roles:
            kinds["calls"] += 1
            call = messages[-3]["tool_calls"][0]["function"]
            assert row["tools"] and shop.question_of(question).kind == "total" and call["name"] == "calculator"
            result = calculator(call["arguments"]["expression"])  # "5*26+3*24 = 202"
            assert messages[-2]["content"] == result and messages[-1]["content"] == f"So they cost {result} dollars."
            assert shop.answer_of(messages) == int(result.split(" = ")[1])
            if roles[0] == "system":
                assert messages[-3]["content"] == shop.facts_said(question, catalog_of(messages))
        if roles[0] == "system":
            kinds["documents"] += 1
            lines = messages[0]["content"].split("\n")
            assert lines[0] == "Documents:" and [line[:4] for line in lines[1:]] == ["[1] ", "[2] ", "[3] "]
            # The needed passages are among the retrieved ones, so the demonstrated answer follows from them.
            assert shop.answer_of(messages) == shop.answer(question, catalog_of(messages))
    # The shares the generator draws with: totals with the calculator listed, and demonstrations with passages.
    make = load_make_datasets()
    assert kinds["calls"] / len(rows) == pytest.approx(make.SHOP_KINDS["total"] * make.SHOP_TOOLS, abs=0.03)
    assert kinds["documents"] / len(rows) == pytest.approx(make.SHOP_DOCUMENTS, abs=0.03)


def test_prompts_carry_their_gold_answer_about_the_test_catalog():
    for name in ("shop/prompts/train.jsonl", "shop/prompts/test.jsonl"):
        for row in read_jsonl(DATA / name):
            assert row["answer"] == shop.answer(row["prompt"]) and json.dumps(row["answer"]).isdigit()
