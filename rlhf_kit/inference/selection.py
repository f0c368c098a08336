"""Choosing one response among several samples: self-consistency (majority vote over extracted answers).

    extract = answer_extractor(r"answer: (\\w+)")        # or "my_module:my_function", or None for the whole text
    vote = majority_vote([extract(r) for r in samples])  # Vote(answer="positive", index=2, counts={...})

Reranking by reward model and reward functions is `best_of_n.best_of_n`; this module is the reward-free choice.
Ties are broken deterministically: among the answers with the most votes, the one sampled first wins (samples are
drawn with a fixed seed, so the same run always picks the same one). A sample with no extractable answer does not
vote; when none has one, the first sample is returned with answer None.
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Vote:
    answer: str | None  # the winning answer (None: no sample had one)
    index: int  # the first sample that gave it: the response kept
    counts: dict[str, int]  # votes per answer, in order of first appearance


def majority_vote(answers: Sequence[str | None]) -> Vote:
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return Vote(None, 0, {})
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)  # earliest sampled among the tied
    ordered = {a: counts[a] for a in dict.fromkeys(a for a in answers if a is not None)}
    return Vote(winner, answers.index(winner), ordered)


def answer_extractor(spec: str | None) -> Callable[[str], str | None]:
    """The answer of a response: `spec` is a regex (its first group, or the whole match, normalized: stripped and
    lower-cased), `module:function` (a function response -> answer or None), or None (the whole response,
    normalized). A malformed regex or an unimportable function raises ValueError before any model loads."""
    if spec is None:
        return lambda text: _normalize(text) or None
    if re.fullmatch(r"[\w.]+:\w+", spec):
        module, _, name = spec.partition(":")
        try:
            func = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"answer extractor '{spec}' cannot be imported ({e}); give module:function, a function "
                             "from a response to its answer (or None)") from None
        return lambda text: (lambda a: None if a is None else _normalize(str(a)) or None)(func(text))
    try:
        pattern = re.compile(spec)
    except re.error as e:
        raise ValueError(f"answer pattern {spec!r} is not a valid regular expression: {e}") from None

    def extract(text: str) -> str | None:
        match = pattern.search(text)
        if match is None:
            return None
        return _normalize(match.group(1) if pattern.groups else match.group(0)) or None

    return extract


def _normalize(text: str) -> str:
    return text.strip().strip(".!").strip().lower()
