"""Constrained output: responses that can only match a regex, a JSON schema or one of a few fixed choices.

    constraint = Constraint.from_options(regex=r"The (coffee|tea) is (great|awful)\\.")  # checked here, no model yet
    gens = generate(policy, prompts, sampling=Sampling(n=4), logits_processor=constraint.logits_processor(policy))
    constraint.complete(policy, gens.response_ids)  # [True, ...]: False where max_new_tokens cut a response short

llguidance compiles the constraint into a grammar over the policy's own tokenizer; at every step a transformers
LogitsProcessor sets to -inf, sequence by sequence, every token that cannot continue a match (before temperature,
top-k and top-p, which transformers applies after the processors the caller gives). The model's stop tokens
(`model.stop_token_ids`: `<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3) are the grammar's end: masked until the
match is complete, the only tokens left once nothing else can follow. So a response ends exactly where its match does,
and one that reaches max_new_tokens first is not a match: `Generations.stopped` is False for it, and `complete` says
so from its tokens.

JSON is generated compact (no whitespace between tokens): a small model otherwise spends its tokens on the spaces and
newlines that JSON allows anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llguidance
import llguidance.hf
import torch
from transformers import LogitsProcessor

from rlhf_kit.model import stop_token_ids

OPTIONS = ("regex", "json_schema", "choices")
_BIT = torch.arange(32, dtype=torch.int32)  # bit i of a mask word is token 32 * word + i


@dataclass
class Constraint:
    """What every response must match, compiled for llguidance. Make one with `from_options`."""

    kind: str  # one of OPTIONS
    source: str  # the regex, the schema file or the choices as given, for messages
    grammar: str  # llguidance's grammar
    # (a tokenizer, its LLTokenizer): built once, reused by every call for the same policy
    _vocabulary: tuple = field(default=(None, None), init=False, repr=False, compare=False)

    @classmethod
    def from_options(cls, regex: str | None = None, json_schema: str | Path | dict | None = None,
                     choices: str | Sequence[str] | None = None) -> Constraint | None:
        """The constraint one of the options gives, or None for none; ValueError, before any model loads, for a
        malformed regex, a schema file that cannot be read or is no JSON schema, empty choices or several options.

        regex: the whole response matches it (llguidance's regex syntax, Rust's: no look-around or backreferences).
        json_schema: a JSON schema file (or the schema as a dict); the response is one JSON value it validates.
        choices: the response is exactly one of them: a list, or one string of comma-separated choices ("a,b,c").
        """
        given = [name for name, value in zip(OPTIONS, (regex, json_schema, choices)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"give one constraint, not {' and '.join(given)}: regex, json_schema or choices")
        if regex is not None:
            return cls("regex", regex, _checked(llguidance.LLMatcher.grammar_from_regex(regex), f"regex {regex!r}"))
        if json_schema is not None:
            return _from_schema(json_schema)
        if choices is not None:
            return _from_choices(choices)
        return None

    def logits_processor(self, policy) -> Callable[[], list[LogitsProcessor]]:
        """What `generation.generate(logits_processor=...)` takes: a fresh processor per generate() call, since
        its matchers follow that call's sequences."""
        vocabulary = self.vocabulary(policy)
        return lambda: [GrammarMask(vocabulary, self.grammar)]

    def complete(self, policy, response_ids: Sequence[Sequence[int]]) -> list[bool]:
        """Whether each response, as token ids with its stop token, is a whole match. A response that ran into
        max_new_tokens before its match was complete is not one: count it, it did not follow the constraint."""
        vocabulary = self.vocabulary(policy)
        done = []
        for ids in response_ids:
            matcher = llguidance.LLMatcher(vocabulary, self.grammar)
            done.append(matcher.consume_tokens(list(ids)) and matcher.is_accepting())
        return done

    def vocabulary(self, policy) -> llguidance.LLTokenizer:
        """The policy's tokenizer as llguidance sees it, its stop tokens the grammar's end (built once per
        tokenizer: about a second for a 128k vocabulary)."""
        tokenizer, built = self._vocabulary
        if tokenizer is policy.tokenizer:
            return built
        if not getattr(policy.tokenizer, "is_fast", False):
            raise ValueError(f"constrained output needs a fast tokenizer (a tokenizer.json); {policy.name}'s is "
                             f"{type(policy.tokenizer).__name__}")
        # Rows of the output layer past the tokenizer's last token (vocabularies padded to a multiple of 64) have no
        # text: llguidance masks them.
        rows = policy.model.get_output_embeddings().weight.shape[0]
        built = llguidance.hf.from_tokenizer(policy.tokenizer, n_vocab=max(rows, len(policy.tokenizer)),
                                             eos_token=stop_token_ids(policy.tokenizer, policy.model))
        _checked(self.grammar, f"{self.kind} {self.source}", built)
        self._vocabulary = (policy.tokenizer, built)
        return built


class GrammarMask(LogitsProcessor):
    """-inf on every token that cannot continue each sequence's match. For one generate() call: its matchers follow
    that call's rows (prompts x num_return_sequences) token by token."""

    def __init__(self, vocabulary: llguidance.LLTokenizer, grammar: str):
        self.vocabulary, self.grammar = vocabulary, grammar
        self.matchers: list[llguidance.LLMatcher] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.matchers:  # the first step: input_ids (rows, prompt) holds no response token yet
            self.matchers = [llguidance.LLMatcher(self.vocabulary, self.grammar) for _ in range(len(input_ids))]
            self.bitmask = torch.zeros((len(input_ids), (scores.shape[-1] + 31) // 32), dtype=torch.int32)
        else:
            for matcher, token in zip(self.matchers, input_ids[:, -1].tolist()):
                # A stopped matcher allows only the stop tokens: its match is complete, or it rejected a token,
                # which can only be the padding transformers appends to a row that ended (a stop string ended it).
                if not matcher.is_stopped():
                    matcher.consume_token(token)
        for row, matcher in enumerate(self.matchers):
            words = self.bitmask[row]
            matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        allowed = ((self.bitmask[:, :, None] >> _BIT) & 1).flatten(1)[:, : scores.shape[-1]]  # (rows, vocab)
        return scores.masked_fill(allowed.to(scores.device) == 0, float("-inf"))


def _checked(grammar: str, what: str, vocabulary: llguidance.LLTokenizer | None = None) -> str:
    """`grammar`, or ValueError with llguidance's reason in one line."""
    error = llguidance.LLMatcher.validate_grammar(grammar, vocabulary)
    if error:
        lines = [line.strip() for line in error.splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("error:")), lines[0])
        raise ValueError(f"{what} cannot constrain generation: {reason}")
    return grammar


def _from_schema(schema: str | Path | dict) -> Constraint:
    source = "the given schema" if isinstance(schema, dict) else str(schema)
    if not isinstance(schema, dict):
        try:
            text = Path(schema).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"json_schema file {schema} cannot be read ({getattr(e, 'strerror', None) or e}); give "
                             "the path of a JSON schema file") from None
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema file {source} is not JSON ({e.msg} at line {e.lineno}, column "
                             f"{e.colno})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"json_schema file {source} holds a {type(schema).__name__}, not a JSON schema object "
                             '(such as {"type": "object", "properties": {...}})')
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    return Constraint("json_schema", source, _checked(grammar, f"json_schema file {source}"))


def _from_choices(choices: str | Sequence[str]) -> Constraint:
    items = choices.split(",") if isinstance(choices, str) else list(choices)
    items = [c.strip() for c in items]
    if not items or not all(items):
        raise ValueError(f"choices {choices!r}: give one or more non-empty choices, comma-separated, such as "
                         "yes,no,maybe")
    items = list(dict.fromkeys(items))
    # A Lark grammar of string literals: json.dumps escapes quotes and backslashes as Lark's strings read them.
    grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in items))
    return Constraint("choices", ",".join(items), _checked(grammar, f"choices {','.join(items)}"))
