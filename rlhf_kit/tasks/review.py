"""The synthetic "product review" task and its programmatic gold preference.

Every stage of the pipeline trains on this task, and every evaluation measures
against it. A user asks for a review of an item ("Review the coffee.") and the
assistant answers in one fixed shape::

    The coffee is great and cozy.

that is ``The {item} is a1( and aK)*.`` with one to four adjectives.

`gold_score` is the "human" whose judgments the preference data stands for:
it prefers well-formed, on-topic, positive, non-repetitive reviews. Because it
is a program, we can measure what real RLHF can only estimate: how far the
reward model agrees with the human, and whether PPO improves the true score or
only the learned reward (reward hacking).

The generators are pure functions of a ``random.Random``, so the shipped
datasets (``data/make_datasets.py``) are reproducible byte for byte. Prompts
are split by (item, template) combination, so no test prompt appears verbatim
in any training data.

Example:
    >>> gold_score("Review the coffee.", "The coffee is great and cozy.")
    1.0
    >>> gold_score("Review the coffee.", "The coffee is great and awful.")
    0.0
    >>> gold_score("Review the coffee.", "The phone is great.")
    -2.0
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

# --- vocabulary --------------------------------------------------------------
# Singular nouns only, so "The {item} is ..." is always grammatical.
ITEMS: tuple[str, ...] = (
    "coffee", "movie", "book", "hotel", "phone", "laptop", "camera", "pizza",
    "song", "game", "chair", "jacket", "car", "bike", "show", "album", "lamp",
    "sofa", "tea", "soup", "cake", "park", "museum", "watch", "bag", "hat",
    "shirt", "printer", "tent", "guitar",
)
POSITIVE: tuple[str, ...] = (
    "great", "wonderful", "excellent", "delightful", "fantastic", "superb",
    "charming", "lovely", "amazing", "brilliant", "pleasant", "cozy", "elegant",
    "reliable", "fun",
)
NEGATIVE: tuple[str, ...] = (
    "awful", "boring", "bland", "terrible", "dull", "broken", "noisy", "ugly",
    "disappointing", "horrible", "poor", "messy", "annoying", "flimsy", "dirty",
)
NEUTRAL: tuple[str, ...] = (
    "small", "new", "red", "large", "old", "blue", "round", "heavy", "green",
    "tall",
)
ADJECTIVES: tuple[str, ...] = POSITIVE + NEGATIVE + NEUTRAL
# Read-only so no caller can change what the "human" likes.
SENTIMENT: Mapping[str, int] = MappingProxyType(
    {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}, **{w: 0 for w in NEUTRAL}}
)

TEMPLATES: tuple[str, ...] = (
    "Write a review of the {item}.",
    "Review the {item}.",
    "What do you think of the {item}?",
    "Tell me about the {item}.",
)
SYSTEM_PROMPT = "You are a helpful reviewer."

MAX_ADJECTIVES = 4
MALFORMED_SCORE = -2.0  # below every well-formed score, which lie in [-1, 1]

Split = Literal["train", "test"]
# A prompt or response: a plain string, or TRL's conversational form (a list of
# {"role", "content"} messages), so gold_score can read the shipped datasets as is.
Text = str | Sequence[Mapping[str, str]]

_RESPONSE = re.compile(r"The ([a-z]+) is ([a-z]+(?: and [a-z]+)*)\.")
# The answer's shape as a regex over the task's words, for constrained decoding (`rlhf-kit generate --regex`, the
# report's `constrained` rows): every match has `has_review_shape`; 1-4 adjectives, so a match is always short.
ANSWER_REGEX = (f"The ({'|'.join(ITEMS)}) is ({'|'.join(ADJECTIVES)})"
                f"( and ({'|'.join(ADJECTIVES)})){{0,3}}\\.")
_TEMPLATE_PATTERNS = tuple(
    re.compile(re.escape(t.split("{item}")[0]) + "([a-z]+)" + re.escape(t.split("{item}")[1]))
    for t in TEMPLATES
)


# --- prompts and the train/test split ----------------------------------------
def make_prompt(item: str, template_id: int) -> str:
    """The user's request for a review of `item` in wording `template_id`."""
    if item not in ITEMS:
        raise ValueError(f"unknown item {item!r}; use one of rlhf_kit.tasks.review.ITEMS")
    return TEMPLATES[template_id].format(item=item)


def item_of(prompt: Text) -> str | None:
    """The item a task prompt asks about, or None if it is not a task prompt."""
    text = _content(prompt, role="user").strip()
    for pattern in _TEMPLATE_PATTERNS:
        match = pattern.fullmatch(text)
        if match and match.group(1) in ITEMS:
            return match.group(1)
    return None


def split_of(item: str, template_id: int) -> Split:
    """Which split the prompt for (item, template) belongs to.

    Each item holds out exactly one phrasing, template ``i % len(TEMPLATES)``
    for the i-th item, so 1/4 of the combinations are test. Holding out
    combinations rather than items keeps every item in training (a hash-based
    20% split left one item with all four phrasings in test) and in test, so
    test measures generalisation to a new phrasing of a known item rather than
    knowledge of an unseen word; rotating the template keeps the four phrasings
    about equally represented in both splits (8, 8, 7, 7 test items).
    """
    if item not in ITEMS:
        raise ValueError(f"unknown item {item!r}; use one of rlhf_kit.tasks.review.ITEMS")
    held_out = ITEMS.index(item) % len(TEMPLATES)
    return "test" if template_id == held_out else "train"


@functools.cache
def combinations(split: Split) -> tuple[tuple[str, int], ...]:
    """All (item, template_id) pairs in `split`, in a fixed order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return tuple(
        (item, t) for item in ITEMS for t in range(len(TEMPLATES)) if split_of(item, t) == split
    )


def sample_prompt(rng: random.Random, split: Split = "train") -> str:
    """A uniformly drawn prompt from `split`."""
    item, template_id = rng.choice(combinations(split))
    return make_prompt(item, template_id)


# --- the gold preference ------------------------------------------------------
def _content(text: Text, role: str) -> str:
    """The string inside `text`: itself, or the last message with `role`.

    A one-message list of any role is accepted too, since TRL completions are
    a single assistant message.
    """
    if isinstance(text, str):
        return text
    messages = [m for m in text if m.get("role") == role] or list(text[-1:])
    if not messages:
        raise ValueError(f"expected a string or a list of messages with a {role!r} message")
    return messages[-1]["content"]


def _adjectives(prompt: Text, response: Text) -> list[str] | None:
    """The response's adjectives if it is a well-formed review of the prompt's item."""
    item = item_of(prompt)
    if item is None:
        raise ValueError(
            f"not a task prompt: {_content(prompt, 'user')!r}; pass the user message "
            "(one of rlhf_kit.tasks.review.TEMPLATES), not the chat-formatted text"
        )
    match = _RESPONSE.fullmatch(_content(response, role="assistant").strip())
    if match is None or match.group(1) != item:
        return None
    adjectives = match.group(2).split(" and ")
    if len(adjectives) > MAX_ADJECTIVES or any(a not in SENTIMENT for a in adjectives):
        return None
    return adjectives


def has_review_shape(response: Text) -> bool:
    """Whether `response` has the answer's shape, ``The {noun} is a1( and aK)*.`` with task words, whatever item it
    names. It separates "learned the format" (SFT's job) from "reviewed the right item" (part of the gold score)."""
    match = _RESPONSE.fullmatch(_content(response, role="assistant").strip())
    return match is not None and all(a in SENTIMENT for a in match.group(2).split(" and "))


def follows_format(prompt: Text, response: Text) -> bool:
    """Whether `response` is ``The {item} is a1( and aK)*.`` for the prompt's item,
    with 1-4 known adjectives. Repetition is allowed here: it is well-formed, just
    disliked by `gold_score`."""
    return _adjectives(prompt, response) is not None


def gold_score(prompt: Text, response: Text) -> float:
    """The gold annotator's score of `response` to `prompt`.

    -2.0 for a malformed response (wrong shape, another item, more than four
    adjectives, a word outside the adjective lists). Otherwise the mean over
    adjectives of +1 positive / -1 negative / 0 neutral, where each repeat of an
    adjective counts -1 instead: annotators dislike padding, and without it
    "great and great and great" would be a free way to look positive.
    Well-formed scores therefore lie in [-1, 1].
    """
    adjectives = _adjectives(prompt, response)
    if adjectives is None:
        return MALFORMED_SCORE
    seen: set[str] = set()
    total = 0
    for adjective in adjectives:
        total += -1 if adjective in seen else SENTIMENT[adjective]
        seen.add(adjective)
    return total / len(adjectives)


def gold(prompts: Sequence[Text], completions: Sequence[Text], **columns) -> list[float]:
    """`gold_score` as a TRL-style reward function, for PPO's ``reward_funcs`` or ``eval_reward_funcs``
    (``rlhf_kit.tasks.review:gold``, logged as ``reward/gold``): prompts and completions as strings or message lists;
    extra dataset columns are ignored."""
    return [gold_score(p, c) for p, c in zip(prompts, completions)]


def metrics(prompts: Sequence[Text], responses: Sequence[str]) -> dict[str, float]:
    """The task's evaluation columns over a set of responses: mean gold score, and the share with the answer's shape
    (any item) and in the prompt's format (its item, known adjectives)."""
    n = len(prompts)
    return {"gold_score": sum(gold_score(p, r) for p, r in zip(prompts, responses)) / n,
            "shape_rate": sum(map(has_review_shape, responses)) / n,
            "format_rate": sum(follows_format(p, r) for p, r in zip(prompts, responses)) / n}


def gold_prefers(prompt: Text, a: Text, b: Text) -> bool:
    """Whether the gold annotator strictly prefers response `a` over `b`."""
    return gold_score(prompt, a) > gold_score(prompt, b)


# --- responses -----------------------------------------------------------------
def _review(item: str, adjectives: Sequence[str]) -> str:
    return f"The {item} is {' and '.join(adjectives)}."


def sample_response(
    rng: random.Random,
    item: str,
    sentiment: Literal["positive", "negative", "neutral"] | None = None,
) -> str:
    """A well-formed review of `item` with 1-3 distinct adjectives.

    With `sentiment=None` the adjectives come uniformly from all three lists, so
    SFT demonstrations teach the format without teaching a preference: making
    the assistant positive is left to the reward model and PPO.
    """
    pools = {None: ADJECTIVES, "positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}
    if sentiment not in pools:
        raise ValueError(f"sentiment must be one of {list(pools)}, got {sentiment!r}")
    return _review(item, rng.sample(pools[sentiment], rng.randint(1, 3)))


DEGRADATIONS = ("truncated", "wrong_item", "run_on", "too_many", "unknown_word", "repeated")
DEGRADATION_WEIGHTS = (1, 4, 1, 1, 1, 2)


def degraded_response(rng: random.Random, item: str, response: str | None = None) -> str:
    """A response with a flaw the gold annotator punishes, of a kind a policy
    tends to produce: cut off, about another item, run on, padded with extra
    adjectives, with a non-adjective word, or repeating an adjective.

    Given a well-formed `response`, the flaw is made to that response, so a pair
    (response, degraded) differs in the flaw alone. Such minimal pairs are what
    teach a small reward model that the item must match the prompt and that
    repeating an adjective does not make a review more positive: with
    independent pairs it learned sentiment, and PPO then hacked it with
    "The tea is elegant and elegant." to a prompt about a shirt.
    """
    response = response or sample_response(rng, item)
    words = response.split()
    adjectives = [w.rstrip(".") for w in words[3::2]]
    # Another item and repetition are weighted up: they keep the response's shape, so they are the flaws a
    # policy finds when it hunts for reward, and the hardest ones for a reward model to see.
    kind = rng.choices(DEGRADATIONS, weights=DEGRADATION_WEIGHTS)[0]
    if kind == "truncated":
        return " ".join(words[: rng.randint(1, len(words) - 1)])
    if kind == "wrong_item":
        return _review(rng.choice([i for i in ITEMS if i != item]), adjectives)
    if kind == "run_on":
        return response + " " + sample_response(rng, item)
    if kind == "too_many":
        extra = [a for a in ADJECTIVES if a not in adjectives]
        return _review(item, adjectives + rng.sample(extra, MAX_ADJECTIVES + 1 - len(adjectives) + rng.randint(0, 1)))
    if kind == "unknown_word":
        filler = rng.choice(("very", "the", "not", "good", rng.choice(ITEMS)))
        adjectives[rng.randrange(len(adjectives))] = filler
        return _review(item, adjectives)
    return _review(item, adjectives + [rng.choice(adjectives)] * rng.randint(1, max(1, MAX_ADJECTIVES - len(adjectives))))


# --- datasets ------------------------------------------------------------------
_STATEMENTS: tuple[str, ...] = (
    "The {item} was {adj}.",
    "This {item} is really {adj}.",
    "I think the {item} is {adj}.",
    "My {item} looks {adj}.",
)
_NARRATIVE: tuple[str, ...] = (
    "I bought a new {item} yesterday.",
    "The {item} was on the table.",
    "She gave me {a_adj} {item}.",
    "We talked about the {item} for an hour.",
    "He left the {item} at home.",
    "There is {a_adj} {item} near the door.",
    "They sold the old {item} last week.",
    "I saw the {item} and the {other} today.",
    "Everyone was talking about the {item}.",
)
_QUESTIONS: tuple[str, ...] = (
    "Do you like the {item}?",
    "Have you seen the {item}?",
    "Where is the {item}?",
)


def _pretraining_sentence(rng: random.Random, item: str, split: Split) -> str:
    """One plain sentence about `item`: review-like, narrative, or a question.

    Review-like sentences teach the response's words and shape; the rest keep
    the corpus from being only reviews. No chat markup appears anywhere, so the
    base model learns the language but not the assistant format.
    """
    kind = rng.random()
    if kind < 0.2:
        return sample_response(rng, item)
    if kind < 0.85:
        adjective = rng.choice(ADJECTIVES)
        template = rng.choice(_STATEMENTS if kind < 0.4 else _NARRATIVE)
        article = "an" if adjective[0] in "aeiou" else "a"
        return template.format(item=item, adj=adjective, a_adj=f"{article} {adjective}", other=rng.choice(ITEMS))
    # Task prompts come from this split only, so test prompts never appear
    # verbatim in the pretraining data either.
    questions = [q.format(item=item) for q in _QUESTIONS]
    questions += [make_prompt(item, t) for i, t in combinations(split) if i == item]
    return rng.choice(questions)


def pretraining_corpus(
    rng: random.Random, n: int, split: Split = "train", sentences: tuple[int, int] = (5, 10)
) -> list[str]:
    """`n` short paragraphs of plain sentences, for next-token pretraining.

    Each paragraph mostly talks about one topic item (70% of sentences), so the
    model also learns to carry a noun through a passage, which is what a review
    has to do with the prompt's item.
    """
    paragraphs = []
    for _ in range(n):
        topic = rng.choice(ITEMS)
        count = rng.randint(*sentences)
        items = [topic if rng.random() < 0.7 else rng.choice(ITEMS) for _ in range(count)]
        paragraphs.append(" ".join(_pretraining_sentence(rng, i, split) for i in items))
    return paragraphs


def sft_examples(rng: random.Random, n: int, split: Split = "train") -> list[tuple[str, str]]:
    """`n` (prompt, response) demonstrations of the format, sentiment-neutral on average."""
    examples = []
    for _ in range(n):
        prompt = sample_prompt(rng, split)
        examples.append((prompt, sample_response(rng, item_of(prompt))))
    return examples


@dataclass(frozen=True)
class PreferencePair:
    """One annotated comparison. `flipped` records label noise: the annotator
    picked the response the gold function ranks lower."""

    prompt: str
    chosen: str
    rejected: str
    flipped: bool

    @property
    def margin(self) -> float:
        """Gold score difference chosen - rejected (negative when flipped)."""
        return gold_score(self.prompt, self.chosen) - gold_score(self.prompt, self.rejected)


def preference_pairs(
    rng: random.Random,
    n: int,
    split: Split = "train",
    noise: float = 0.1,
    degraded_fraction: float = 0.5,
) -> list[PreferencePair]:
    """`n` comparisons of two different responses to the same prompt.

    The gold function decides which is chosen; with probability `noise` the
    labels are swapped, as human annotators disagree with each other about
    that often. Ties carry no preference and are skipped. In `degraded_fraction`
    of pairs the other side is a `degraded_response` made from the first one, so
    the reward model learns to punish broken format, another item and
    repetition rather than meeting them first in PPO.
    """
    if not 0.0 <= noise <= 1.0 or not 0.0 <= degraded_fraction <= 1.0:
        raise ValueError(f"noise and degraded_fraction must be in [0, 1], got {noise}, {degraded_fraction}")
    pairs: list[PreferencePair] = []
    while len(pairs) < n:
        prompt = sample_prompt(rng, split)
        item = item_of(prompt)
        a = sample_response(rng, item)
        b = degraded_response(rng, item, a) if rng.random() < degraded_fraction else sample_response(rng, item)
        score_a, score_b = gold_score(prompt, a), gold_score(prompt, b)
        if score_a == score_b:
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        flipped = rng.random() < noise
        if flipped:
            chosen, rejected = rejected, chosen
        pairs.append(PreferencePair(prompt, chosen, rejected, flipped))
    return pairs


def wrong_item_pairs(rng: random.Random, n: int, split: Split = "train", noise: float = 0.1) -> list[PreferencePair]:
    """`n` minimal pairs that differ only in the item: a review of the prompt's item against the same review of
    another one ("The phone is great." to a prompt about the coffee).

    In `preference_pairs` a fifth of the pairs are of this kind, too few for a reward model that reads one vector
    at the end of the response to learn to compare the response's item with the prompt's: it stayed near chance on
    them at any length of training or capacity (README, issue 20). Label noise as in `preference_pairs`.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    pairs = []
    for _ in range(n):
        prompt = sample_prompt(rng, split)
        item = item_of(prompt)
        good = sample_response(rng, item)
        bad = _review(rng.choice([i for i in ITEMS if i != item]), [w.rstrip(".") for w in good.split()[3::2]])
        flipped = rng.random() < noise
        chosen, rejected = (bad, good) if flipped else (good, bad)
        pairs.append(PreferencePair(prompt, chosen, rejected, flipped))
    return pairs


def rl_prompts(rng: random.Random, n: int, split: Split = "train") -> list[str]:
    """`n` prompts for the RL stage, drawn uniformly (with repeats) from `split`."""
    return [sample_prompt(rng, split) for _ in range(n)]
