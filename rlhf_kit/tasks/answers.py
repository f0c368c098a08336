"""Questions about reviews with a one-word answer that a program checks: the task for self-consistency.

A user shows the assistant a review in the review task's words and asks for its sentiment; the assistant answers
with one word::

    Is this review positive or negative? The coffee is great and dull and lovely.   ->   positive

The review has 1, 3 or 5 distinct adjectives, each positive or negative (no neutral ones), and the answer is the
sentiment of the majority: an odd count, so there is never a tie. A model must know which of 30 adjectives are
positive (SFT is the only place it can learn it: the pretraining corpus uses them without sentiment) and count them,
which a tiny model learns only partly in a short SFT: after the 70 steps of `recipes/configs/sft/tiny-answers.yaml`,
one sampled answer is right with a chance between one half and one on most prompts, and about one half on the
closest reviews (3 against 2). Between one half and one is where a majority vote over several sampled answers
(self-consistency) beats a single sample, so the pipeline `recipes/configs/pipeline/tiny-answers.yaml` measures it
here.

The gold annotator is exact match: `answer_of(response)` (the response stripped of spaces and a final period,
lower-cased) must equal `answer(prompt)`. The generators are pure functions of a ``random.Random``, so the shipped
files (``data/make_datasets.py``) are reproducible byte for byte. The split is a function of the review itself (a
CRC of its text), so no test review appears in the training data in any phrasing.

Example:
    >>> answer("Is this review positive or negative? The coffee is great and dull and lovely.")
    'positive'
    >>> gold_score("Is this review positive or negative? The tea is bland.", "Negative.")
    1.0
    >>> gold_score("Is this review positive or negative? The tea is bland.", "positive")
    0.0
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence

# The review task's vocabulary, and its reader of a prompt or response given as a string or as chat messages.
from rlhf_kit.tasks.review import ITEMS, NEGATIVE, POSITIVE, SENTIMENT, Split, Text, _content

ANSWERS = ("positive", "negative")
# The answer as a regex, for constrained decoding (`rlhf-kit generate --regex`, the report's `constrained` rows).
ANSWER_REGEX = "(positive|negative)"
QUESTIONS: tuple[str, ...] = (
    "Is this review positive or negative? {review}",
    "{review} Is this review positive or negative?",
    "Is the following review positive or negative? {review}",
)
ADJECTIVE_COUNTS = (1, 3, 5)  # odd, so the majority is never tied
TEST_SHARE = 5  # one review in TEST_SHARE is held out for test

_REVIEW = re.compile(r"The ([a-z]+) is ((?:[a-z]+)(?: and [a-z]+)*)\.")
_QUESTION_PATTERNS = tuple(
    re.compile(re.escape(q.split("{review}")[0]) + r"(.+?)" + re.escape(q.split("{review}")[1])) for q in QUESTIONS
)


# --- prompts, their gold answer and the split -------------------------------
def make_prompt(item: str, adjectives: Sequence[str], question_id: int = 0) -> str:
    """The question `question_id` about the review ``The {item} is a1 and ... aK.``"""
    if item not in ITEMS or not adjectives or any(SENTIMENT.get(a, 0) == 0 for a in adjectives):
        raise ValueError(f"a review needs an item of rlhf_kit.tasks.review.ITEMS and positive or negative "
                         f"adjectives, got {item!r}, {list(adjectives)}")
    return QUESTIONS[question_id].format(review=f"The {item} is {' and '.join(adjectives)}.")


def review_of(prompt: Text) -> tuple[str, list[str]] | None:
    """The (item, adjectives) of the review a task prompt asks about, or None if it is not a task prompt."""
    text = _content(prompt, role="user").strip()
    for pattern in _QUESTION_PATTERNS:
        match = pattern.fullmatch(text)
        review = match and _REVIEW.fullmatch(match.group(1))
        if review and review.group(1) in ITEMS:
            adjectives = review.group(2).split(" and ")
            if all(SENTIMENT.get(a, 0) != 0 for a in adjectives):
                return review.group(1), adjectives
    return None


def answer(prompt: Text) -> str:
    """The gold answer: the sentiment of most of the review's adjectives."""
    review = review_of(prompt)
    if review is None:
        raise ValueError(f"not a task prompt: {_content(prompt, 'user')!r}; pass the user message (one of "
                         "rlhf_kit.tasks.answers.QUESTIONS), not the chat-formatted text")
    return "positive" if sum(SENTIMENT[a] for a in review[1]) > 0 else "negative"


def split_of(item: str, adjectives: Sequence[str]) -> Split:
    """Which split a review belongs to, whatever question asks about it: a checksum of its text, stable across
    Python versions and runs (unlike `hash`)."""
    held_out = zlib.crc32(f"{item}:{' '.join(adjectives)}".encode()) % TEST_SHARE == 0
    return "test" if held_out else "train"


def sample_prompt(rng: random.Random, split: Split = "train") -> str:
    """A question about a random review of `split`: 1, 3 or 5 adjectives, the number of positive ones uniform, so
    the two answers are equally likely and close reviews are common."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    while True:  # rejection sampling: about 1 in 5 draws is a test review
        count = rng.choice(ADJECTIVE_COUNTS)
        positive = rng.randint(0, count)
        adjectives = rng.sample(POSITIVE, positive) + rng.sample(NEGATIVE, count - positive)
        rng.shuffle(adjectives)
        item = rng.choice(ITEMS)
        question_id = rng.randrange(len(QUESTIONS))
        if split_of(item, adjectives) == split:
            return make_prompt(item, adjectives, question_id)


# --- the gold annotator -------------------------------------------------------
def answer_of(response: Text) -> str | None:
    """The answer a response gives: the whole response, stripped of spaces and a final period and lower-cased, if
    it is one of ANSWERS; else None. Also an answer extractor for self-consistency
    (``answer_pattern: rlhf_kit.tasks.answers:answer_of``)."""
    text = _content(response, role="assistant").strip().rstrip(".").strip().lower()
    return text if text in ANSWERS else None


def gold_score(prompt: Text, response: Text) -> float:
    """Exact match: 1.0 if the response gives the prompt's gold answer, else 0.0."""
    return float(answer_of(response) == answer(prompt))


def gold(prompts: Sequence[Text], completions: Sequence[Text], **columns) -> list[float]:
    """`gold_score` as a TRL-style reward function (``rlhf_kit.tasks.answers:gold``), e.g. for GRPO."""
    return [gold_score(p, c) for p, c in zip(prompts, completions)]


def metrics(prompts: Sequence[Text], responses: Sequence[str]) -> dict[str, float]:
    """Exact match, and the share of responses that give an answer at all (right or wrong). `gold_score` is exact
    match too, under the name every pipeline report shows."""
    n = len(prompts)
    exact = sum(gold_score(p, r) for p, r in zip(prompts, responses)) / n
    return {"exact_match": exact, "answer_rate": sum(answer_of(r) is not None for r in responses) / n,
            "gold_score": exact}


# --- datasets -------------------------------------------------------------------
def examples(rng: random.Random, n: int, split: Split = "train") -> list[tuple[str, str]]:
    """`n` (prompt, gold answer) pairs of `split`."""
    return [(p, answer(p)) for p in (sample_prompt(rng, split) for _ in range(n))]

