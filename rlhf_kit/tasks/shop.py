"""Questions about a shop's catalog with a numeric answer: the task for retrieval and tool calls.

A shop sells 24 items, each with a price in whole dollars and a stock count, one passage per item::

    The lamp costs 12 dollars. There are 5 lamps in stock.

and a user asks about one item's price or stock, or the total of a purchase::

    How much does the lamp cost?          ->  The lamp costs 12 dollars.      (needs the lamp's passage: retrieval)
    How many lamps are in stock?          ->  There are 5 lamps in stock.     (retrieval)
    What do 3 lamps and 2 mugs cost?      ->  The lamp costs 12 dollars. The mug costs 4 dollars. + calculator(3*12+2*4)
                                          ->  44                              (retrieval, then the calculator tool)

The catalog the questions are scored against (`TEST_CATALOG`, shipped as the retrieval corpus
``data/shop/catalog.jsonl``) is fixed, and no training text states one of its facts: every SFT demonstration and
pretraining paragraph is about a random *training* catalog in which no item has its test price or its test stock
(`train_catalog`). So a model can answer a held-out question only from a retrieved passage, never from memory, and
the pipeline `recipes/configs/pipeline/tiny-tools.yaml` measures exact match without tools, with retrieval, and with
retrieval and the calculator.

The gold annotator is exact match: `answer_of(response)` (the last number of the final answer) must equal
`answer(prompt)`. The generators are pure functions of a ``random.Random``, so the shipped files
(``data/make_datasets.py``) are reproducible byte for byte. The split is a function of the question (a CRC of its
text), so no test question appears in the training data, whatever catalog it is asked of.

Example:
    >>> TEST_CATALOG["lamp"], TEST_CATALOG["mug"]
    (Fact(price=3, stock=1), Fact(price=18, stock=15))
    >>> passage("mug", TEST_CATALOG["mug"])
    'The mug costs 18 dollars. There are 15 mugs in stock.'
    >>> answer("What do 3 lamps and 2 mugs cost?")
    45
    >>> expression_of("What do 3 lamps and 2 mugs cost?")
    '3*3+2*18'
    >>> gold_score("How many mugs are in stock?", "15")
    1.0
    >>> answer_of([{"role": "assistant", "content": "", "tool_calls": []}, {"role": "tool", "content": "45"},
    ...            {"role": "assistant", "content": "45 dollars."}])
    45
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

# The reader of a prompt or response given as a string or as chat messages, shared with the review task.
from rlhf_kit.tasks.review import Split, Text, _content

# Short nouns with a regular plural, none a prefix of another's plural, so a question names its items unambiguously.
ITEMS: tuple[str, ...] = (
    "lamp", "mug", "chair", "table", "book", "pen", "cup", "plate", "bowl", "spoon", "box", "bag",
    "hat", "shoe", "sock", "towel", "pillow", "candle", "clock", "vase", "brush", "bottle", "basket", "rug",
)
PLURALS: dict[str, str] = {item: item + ("es" if item.endswith(("x", "sh")) else "s") for item in ITEMS}
PRICES = range(2, 31)  # whole dollars
STOCKS = range(1, 21)
COUNTS = range(2, 6)  # items bought in a total question: plural nouns only, and totals of at most 300

KINDS = ("price", "stock", "total")
QUESTIONS: dict[str, tuple[str, ...]] = {
    "price": ("How much does the {item} cost?", "What is the price of the {item}?", "What does one {item} cost?"),
    "stock": ("How many {plural} are in stock?", "How many {plural} does the shop have?"),
    "total": ("What do {a} {plural_a} and {b} {plural_b} cost?", "How much are {a} {plural_a} and {b} {plural_b}?"),
}
# One in TEST_SHARE questions is held out for test: about 24 single-item questions and 2,000 totals.
TEST_SHARE = 5
# The answer as a regex, for constrained decoding (`rlhf-kit generate --regex`): a bare number. It forbids tool
# calls, so it only fits the rows without tools.
ANSWER_REGEX = "[0-9]{1,3}"
# The calculator's JSON schema, as transformers' `get_json_schema` writes it for the kit's calculator tool: the
# `tools` column of the SFT data, so training shows the model the same listing that inference gives it.
CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return it with its value.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string",
                                          "description": "The arithmetic expression to evaluate, such as 3*12+2*4."}},
            "required": ["expression"],
        },
        "return": {"type": "string"},
    },
}


class Fact(NamedTuple):
    price: int
    stock: int


Catalog = Mapping[str, Fact]


class Question(NamedTuple):
    """What a question asks: its kind, its items (one, or two for a total), the counts bought, its phrasing."""
    kind: str
    items: tuple[str, ...]
    counts: tuple[int, ...] = ()
    phrasing: int = 0


# --- catalogs ------------------------------------------------------------------
def random_catalog(rng: random.Random) -> dict[str, Fact]:
    """A price and a stock for every item, uniform over PRICES and STOCKS."""
    return {item: Fact(rng.choice(PRICES), rng.choice(STOCKS)) for item in ITEMS}


# The catalog held-out questions are scored against and the retrieval corpus holds: fixed by its seed string.
TEST_CATALOG: dict[str, Fact] = random_catalog(random.Random("rlhf-kit shop: test catalog"))


def train_catalog(rng: random.Random) -> dict[str, Fact]:
    """A random catalog that states no fact of TEST_CATALOG: no item has its test price or its test stock."""
    return {item: Fact(rng.choice([p for p in PRICES if p != test.price]),
                       rng.choice([s for s in STOCKS if s != test.stock]))
            for item, test in TEST_CATALOG.items()}


def passage(item: str, fact: Fact) -> str:
    """The catalog's passage about `item`: its price and stock, naming it in the singular and the plural."""
    return f"The {item} costs {fact.price} dollars. There are {fact.stock} {PLURALS[item]} in stock."


def passages(catalog: Catalog) -> list[str]:
    """Every item's passage, in ITEMS order: a retrieval corpus."""
    return [passage(item, catalog[item]) for item in ITEMS]


# --- questions, their gold answer and the split ----------------------------------
def make_prompt(question: Question) -> str:
    """The text of `question`."""
    if question.kind not in KINDS or any(item not in ITEMS for item in question.items):
        raise ValueError(f"a shop question needs a kind of {KINDS} and items of rlhf_kit.tasks.shop.ITEMS, "
                         f"got {question}")
    template = QUESTIONS[question.kind][question.phrasing]
    if question.kind == "total":
        (a, b), (x, y) = question.counts, question.items
        return template.format(a=a, b=b, plural_a=PLURALS[x], plural_b=PLURALS[y])
    return template.format(item=question.items[0], plural=PLURALS[question.items[0]])


def _pattern(template: str) -> re.Pattern:
    fields = {"item": r"(?P<item>[a-z]+)", "plural": r"(?P<plural>[a-z]+)", "a": r"(?P<a>[0-9]+)",
              "b": r"(?P<b>[0-9]+)", "plural_a": r"(?P<plural_a>[a-z]+)", "plural_b": r"(?P<plural_b>[a-z]+)"}
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(fields[p] if i % 2 else re.escape(p) for i, p in enumerate(parts)))


_PATTERNS = [(kind, phrasing, _pattern(t)) for kind, ts in QUESTIONS.items() for phrasing, t in enumerate(ts)]
_SINGULAR = {plural: item for item, plural in PLURALS.items()}


def question_of(prompt: Text) -> Question | None:
    """What a task prompt asks (its last user message), or None if it is not a task prompt."""
    text = _content(prompt, role="user").strip()
    for kind, phrasing, pattern in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        fields = match.groupdict()
        if kind == "total":
            items = (_SINGULAR.get(fields["plural_a"]), _SINGULAR.get(fields["plural_b"]))
            counts = (int(fields["a"]), int(fields["b"]))
            if None not in items and items[0] != items[1] and all(c in COUNTS for c in counts):
                return Question(kind, items, counts, phrasing)
        else:
            item = fields.get("item") or _SINGULAR.get(fields.get("plural") or "")
            if item in ITEMS:
                return Question(kind, (item,), (), phrasing)
    return None


def _question(prompt: Text) -> Question:
    question = question_of(prompt)
    if question is None:
        raise ValueError(f"not a task prompt: {_content(prompt, 'user')!r}; pass the user message (one of "
                         "rlhf_kit.tasks.shop.QUESTIONS), not the chat-formatted text")
    return question


def expression_of(prompt: Text, catalog: Catalog = TEST_CATALOG) -> str:
    """The arithmetic a total question needs, as the calculator takes it (``3*12+2*4``)."""
    question = _question(prompt)
    if question.kind != "total":
        raise ValueError(f"only a total question needs arithmetic, not a {question.kind} question")
    return "+".join(f"{count}*{catalog[item].price}" for count, item in zip(question.counts, question.items))


def answer(prompt: Text, catalog: Catalog = TEST_CATALOG) -> int:
    """The gold answer to a task prompt, by default about the test catalog."""
    question = _question(prompt)
    if question.kind == "price":
        return catalog[question.items[0]].price
    if question.kind == "stock":
        return catalog[question.items[0]].stock
    return sum(count * catalog[item].price for count, item in zip(question.counts, question.items))


def facts_said(prompt: Text, catalog: Catalog = TEST_CATALOG) -> str:
    """The facts a question needs, as the assistant says them before it answers (``The lamp costs 12 dollars.``):
    the words of the passage, so a tiny model finds the number by copying what follows the same words above (an
    induction head), which it learns far sooner than looking an item up from the question's words alone."""
    question = _question(prompt)
    if question.kind == "stock":
        item = question.items[0]
        return f"There are {catalog[item].stock} {PLURALS[item]} in stock."
    return " ".join(f"The {item} costs {catalog[item].price} dollars." for item in question.items)


def needed_passages(prompt: Text, catalog: Catalog = TEST_CATALOG) -> list[str]:
    """The catalog passages a question needs (one, or two for a total): what retrieval recall@k counts."""
    return [passage(item, catalog[item]) for item in _question(prompt).items]


def split_of(question: Question) -> Split:
    """Which split a question belongs to, whatever catalog it is asked of: a checksum of its text, stable across
    Python versions and runs (unlike `hash`)."""
    return "test" if zlib.crc32(make_prompt(question).encode()) % TEST_SHARE == 0 else "train"


def all_single_questions() -> list[Question]:
    """Every price and stock question, in a fixed order (there are few: the test split takes them all)."""
    return [Question(kind, (item,), (), phrasing)
            for kind in ("price", "stock") for item in ITEMS for phrasing in range(len(QUESTIONS[kind]))]


def sample_question(rng: random.Random, kind: str, split: Split = "train",
                    items: Sequence[str] = ITEMS) -> Question:
    """A random question of `kind` and `split` about `items` (all by default). An item may have no price or stock
    question in a split (all its phrasings in the other), so pass `items` for totals only."""
    if split not in ("train", "test") or kind not in KINDS:
        raise ValueError(f"split must be 'train' or 'test' and kind one of {KINDS}, got {split!r}, {kind!r}")
    while True:  # rejection sampling: about 1 in TEST_SHARE draws is a test question
        phrasing = rng.randrange(len(QUESTIONS[kind]))
        if kind == "total":
            question = Question(kind, tuple(rng.sample(items, 2)), (rng.choice(COUNTS), rng.choice(COUNTS)), phrasing)
        else:
            question = Question(kind, (rng.choice(items),), (), phrasing)
        if split_of(question) == split:
            return question


def retrieved(rng: random.Random, prompt: Text, catalog: Catalog, k: int) -> list[str]:
    """The `k` passages a BM25 search of `catalog` returns for a question: first the needed ones (each passage names
    one item, and only its own passage shares the question's item words), then random others (which share none)."""
    needed = needed_passages(prompt, catalog)
    others = [p for p in passages(catalog) if p not in needed]
    rng.shuffle(needed)  # two needed passages score alike: their order is arbitrary
    return needed + rng.sample(others, k - len(needed))


# --- the gold annotator -------------------------------------------------------
_TOOL_CALL = re.compile(r"<tool_call>.*?(</tool_call>|$)", re.DOTALL)
_NUMBER = re.compile(r"[0-9]+")


def answer_of(response: Text) -> int | None:
    """The number the final answer gives: the last number of the last assistant message (tool calls left out), as
    answers end with it (``12``, ``The lamp costs 12 dollars.``, ``... So they cost 44 dollars.``); None if it has
    none. Also an answer extractor for self-consistency (``answer_pattern: rlhf_kit.tasks.shop:answer_of``)."""
    text = _TOOL_CALL.sub("", _content(response, role="assistant") or "")
    numbers = _NUMBER.findall(text)
    return int(numbers[-1]) if numbers else None


def gold_score(prompt: Text, response: Text) -> float:
    """Exact match: 1.0 if the response gives the prompt's gold answer about the test catalog, else 0.0."""
    return float(answer_of(response) == answer(prompt))


def gold(prompts: Sequence[Text], completions: Sequence[Text], **columns) -> list[float]:
    """`gold_score` as a TRL-style reward function (``rlhf_kit.tasks.shop:gold``), e.g. for GRPO with tools."""
    return [gold_score(p, c) for p, c in zip(prompts, completions)]


def metrics(prompts: Sequence[Text], responses: Sequence[Text]) -> dict[str, float]:
    """Exact match, overall and by kind of question, and the share of responses that give a number at all.
    `gold_score` is exact match too, under the name every pipeline report shows."""
    n = len(prompts)
    scores = [gold_score(p, r) for p, r in zip(prompts, responses)]
    result = {"exact_match": sum(scores) / n, "answer_rate": sum(answer_of(r) is not None for r in responses) / n,
              "gold_score": sum(scores) / n}
    kinds = [_question(p).kind for p in prompts]
    for kind in KINDS:
        mine = [s for s, k in zip(scores, kinds) if k == kind]
        if mine:
            result[f"exact_match_{kind}"] = sum(mine) / len(mine)
    return result
