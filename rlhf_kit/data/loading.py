"""Loading, validating and mixing datasets for every stage.

    train = load_data("data/sft", kind="sft")                    # data/sft/train.jsonl
    test = load_data("data/sft", kind="sft", split="test")       # None when the directory has no test file
    mix = load_data("a.jsonl:0.7,org/pairs:0.3", kind="preference")

A source is a local file (.jsonl, .json, .csv, .parquet), a directory (files named after the split:
``<split>.<ext>``, shards ``<split>-*.<ext>``, or a ``<split>/`` subdirectory), a glob, or a Hub dataset name.
Each file is loaded on its own so that errors can name the file and the row; its format is detected from
its columns and every row is validated before anything trains. A bad row raises

    DataError("data/sft/train.jsonl: row 3: field 'messages[1].role': expected 'assistant' ..., got 'user'")

and nothing is ever dropped or repaired: rows are returned with the columns TRL expects.

Accepted formats (TRL's), by kind:
    text         text
    sft          messages | prompt + completion (plain or conversational) | text
    preference   prompt + chosen + rejected (plain or conversational) | chosen + rejected (implicit prompt);
                 an optional numeric `margin`
    prompt       prompt (a string, or a conversation ending with a user turn); extra columns are kept
                 because reward functions receive them

Conversations may call tools in TRL's format: a `tools` column of JSON schemas, assistant turns with `tool_calls`,
each answered by a `tool` turn (checked by rlhf_kit/data/tool_calls.py: declared tools, arguments against their
schemas, one result per call).

Other common formats are converted at load time by a source's `format:` (SOURCE_FORMATS: alpaca, sharegpt, hh,
ultrafeedback, openai), after renaming the file's columns by its `columns:`, and then validated as above:

    load_data({"path": "alpaca.json", "format": "alpaca"}, kind="sft")   # instruction/input/output -> messages
    load_data({"path": "qa.csv", "columns": {"prompt": "question", "completion": "answer"}}, kind="sft")

ShareGPT, UltraFeedback and OpenAI preference rows convert unasked (the kit's formats refuse them, and converting
them only renames); Alpaca and Anthropic HH text fail with the `format:` that converts them. data/README.md has a
one-row example of each.
"""

import csv
import difflib
import glob
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_kit.config import looks_like_path
from rlhf_kit.data.errors import DataError, RowError
from rlhf_kit.data.errors import describe as _describe
from rlhf_kit.data.tool_calls import check_tool_calls, check_tool_results, parse_tools, tool_parameters

FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "sft": ("messages", "prompt_completion", "prompt_completion_conversational", "text"),
    "preference": (
        "preference",
        "preference_conversational",
        "preference_implicit",
        "preference_implicit_conversational",
    ),
    "prompt": ("prompt", "prompt_conversational"),
}

# The columns each format requires (the conversational variants need the same columns as the plain ones).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "prompt_completion_conversational": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "preference_conversational": ("prompt", "chosen", "rejected"),
    "preference_implicit": ("chosen", "rejected"),
    "preference_implicit_conversational": ("chosen", "rejected"),
    "prompt": ("prompt",),
    "prompt_conversational": ("prompt",),
}

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's result, after a turn with tool_calls
# Columns that hold text or conversations: read as strings from CSV, never guessed as numbers or NA.
_TEXT_COLUMNS = ("text", "messages", "prompt", "completion", "chosen", "rejected")
_CONVERSATION_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")  # CSV cells may hold them as JSON
# pandas' default NA strings, still applied to the other CSV columns (pandas._libs.parsers.STR_NA_VALUES).
_PANDAS_NA = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
              "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null")
_FILES_ACCEPTED = (
    "Accepted sources: a .jsonl, .json, .csv or .parquet file; a directory holding <split>.<ext>, "
    "<split>-*.<ext> or a <split>/ subdirectory; a glob; or a Hub dataset name."
)


# ---------------------------------------------------------------------------------------------- sources


@dataclass
class DataSource:
    path: str  # file, directory, glob, or Hub dataset name
    split: str = "train"  # for directories / Hub datasets: which split; ignored for a single file or glob
    weight: float = 1.0  # mixing weight
    name: str | None = None  # Hub config name
    format: str | None = None  # a key of SOURCE_FORMATS: convert rows from Alpaca, ShareGPT, ... at load time
    columns: dict[str, str] | None = None  # {column the kit or `format` reads: the file's column}, renamed first

    def __post_init__(self):
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if not isinstance(self.path, str) or not self.path.strip():
            raise DataError(f"data source path must be a non-empty string, got {_describe(self.path)}")
        if not isinstance(self.split, str) or not self.split:
            raise DataError(f"{self.path}: split must be a non-empty string, got {_describe(self.split)}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise DataError(f"{self.path}: weight must be a number, got {_describe(self.weight)}")
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise DataError(f"{self.path}: weight must be a finite number > 0, got {self.weight} "
                            "(remove the source to leave it out)")
        if self.name is not None and not isinstance(self.name, str):
            raise DataError(f"{self.path}: name (the Hub config) must be a string, got {_describe(self.name)}")
        if self.format is not None and self.format not in SOURCE_FORMATS:
            close = difflib.get_close_matches(str(self.format).lower(), list(SOURCE_FORMATS), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DataError(f"{self.path}: unknown format {self.format!r}; expected one of "
                            f"{', '.join(SOURCE_FORMATS)} (leave it out for the kit's own formats).{hint}")
        if self.columns is not None:
            if not isinstance(self.columns, dict) or not all(
                    isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.columns.items()):
                raise DataError(f"{self.path}: columns must map the column the kit reads to the file's column, "
                                f"e.g. {{prompt: question, completion: answer}}, got {_describe(self.columns)}")
            if len(set(self.columns.values())) < len(self.columns):
                raise DataError(f"{self.path}: columns maps one file column to several names: {self.columns}")


def parse_sources(spec) -> list[DataSource]:
    """Read sources from a string ("a.jsonl", "a.jsonl,b.jsonl", "a.jsonl:0.7,b.jsonl:0.3"), a dict with
    DataSource's keys, a DataSource, or a list of any of these (YAML gives a list of dicts)."""
    if isinstance(spec, DataSource):
        sources = [spec]
    elif isinstance(spec, (list, tuple)):
        sources = [source for item in spec for source in parse_sources(item)]
    elif isinstance(spec, dict):
        sources = [_source_from_dict(spec)]
    elif isinstance(spec, (str, os.PathLike)):
        sources = [_source_from_str(part.strip()) for part in os.fspath(spec).split(",") if part.strip()]
    else:
        raise DataError(f"cannot read data sources from {_describe(spec)}; expected a path string like "
                        "'a.jsonl:0.7,b.jsonl:0.3', a dict with keys path/split/weight/name/format/columns, or a list "
                        "of these")
    if not sources:
        raise DataError(f"no data source given in {spec!r}; expected at least one path or Hub dataset name")
    return sources


def _source_from_str(text: str) -> DataSource:
    # "path:weight" -- the weight is whatever follows the last colon, if it is a number (so "C:\data" is a path)
    path, sep, tail = text.rpartition(":")
    try:
        weight = float(tail) if sep and path else None
    except ValueError:
        weight = None
    return DataSource(path=text) if weight is None else DataSource(path=path.strip(), weight=weight)


def _source_from_dict(spec: dict) -> DataSource:
    known = [f.name for f in fields(DataSource)]
    for key in spec:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DataError(f"unknown data source key '{key}' in {spec!r}; accepted keys: {', '.join(known)}.{hint}")
    if "path" not in spec:
        raise DataError(f"data source {spec!r} has no 'path'; accepted keys: {', '.join(known)}")
    return DataSource(**spec)


@dataclass
class DataArguments:
    """The data section of a recipe's YAML: which sources to load and which splits to take."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training data: a file, directory, glob or Hub dataset name; several as "
                  "'a.jsonl:0.7,b.jsonl:0.3', or in YAML a list of {path, split, weight, name, format, columns}."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of dataset_name to train on."})
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "Split to evaluate on, from eval_dataset_name or else dataset_name. A directory or Hub "
                  "dataset without it has no evaluation set; a single file is used whole."},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Evaluation data, when it is not dataset_name's dataset_test_split."}
    )

    def __post_init__(self):
        if self.dataset_name is None:
            raise DataError("dataset_name is required: a file, directory, glob or Hub dataset name")
        parse_sources(self.dataset_name)  # a malformed spec fails here, before any model loads
        if self.eval_dataset_name is not None:
            parse_sources(self.eval_dataset_name)

    @property
    def eval_source(self):
        """Where evaluation data comes from: eval_dataset_name, or else dataset_name."""
        return self.eval_dataset_name if self.eval_dataset_name is not None else self.dataset_name


# ---------------------------------------------------------------------------------------------- formats


def detect_format(columns: list[str], row: dict, kind: str, source: str) -> str:
    """The format of a source from its columns, and from its first `row` for plain vs conversational."""
    _check_kind(kind)
    cols = set(columns)

    def conversational(*names):
        return any(isinstance(row.get(name), list) for name in names)

    if kind == "text" and "text" in cols:
        return "text"
    if kind == "sft":
        if "messages" in cols and {"prompt", "completion"} <= cols:
            raise _source_error(source, "ambiguous format: both a 'messages' column and 'prompt' + 'completion' "
                                "columns; TRL would train on one and ignore the other, so keep only the columns "
                                "of the format you mean", columns, kind)
        if "messages" in cols:
            return "messages"
        if {"prompt", "completion"} <= cols:
            return "prompt_completion_conversational" if conversational("prompt", "completion") else "prompt_completion"
        if "text" in cols:
            return "text"
    if kind == "preference" and {"chosen", "rejected"} <= cols:
        if "prompt" in cols:
            return "preference_conversational" if conversational("prompt", "chosen", "rejected") else "preference"
        return "preference_implicit_conversational" if conversational("chosen", "rejected") else "preference_implicit"
    if kind == "prompt" and "prompt" in cols:
        return "prompt_conversational" if conversational("prompt") else "prompt"
    raise _source_error(source, f"no format accepted for kind '{kind}' matches the columns{_format_hint(cols, kind)}",
                        columns, kind)


def detect_dataset_format(dataset: datasets.Dataset, kind: str) -> str:
    """The format of a dataset returned by load_data (all its rows share it)."""
    return detect_format(dataset.column_names, dataset[0], kind, "dataset")


def _format_hint(cols: set, kind: str) -> str:
    if "conversations" in cols:
        return ("; a ShareGPT 'conversations' column ({'from', 'value'} turns) is converted by `format: sharegpt` "
                "in the data source")
    if kind == "sft" and "prompt" in cols:
        return "; a 'prompt' without 'completion' is prompt-only data (kind 'prompt', for PPO/GRPO)"
    if kind in ("sft", "text", "prompt") and {"chosen", "rejected"} & cols:
        return "; 'chosen'/'rejected' columns are preference data (kind 'preference')"
    if kind == "preference" and {"chosen", "rejected"} & cols:
        return "; a preference pair needs both 'chosen' and 'rejected'"
    if kind in ("text", "prompt") and "messages" in cols:
        return "; a 'messages' column is SFT data (kind 'sft')"
    known = {column for fmt in FORMATS[kind] for column in FORMAT_COLUMNS[fmt]}
    for column in sorted(cols, key=str):
        close = difflib.get_close_matches(str(column).strip().lower(), sorted(known), n=1)
        if close and close[0] != column:
            return f"; did you mean '{close[0]}' instead of '{column}'?"
    return "; to read columns of other names, map them with `columns: {<column below>: <yours>}` in the data source"


def validate_row(row: dict, fmt: str) -> None:
    """Raise RowError(field, expected) if `row` breaks `fmt` (a value of FORMATS); return None if it is valid.
    An optional `tools` column (TRL's tool-calling format, see rlhf_kit/data/tool_calls.py) declares the tools that
    the row's tool calls must match."""
    tools = tool_parameters(parse_tools(row.get("tools")))
    if fmt == "text":
        _text(_get(row, "text"), "text", fmt)
    elif fmt == "messages":
        _conversation(_get(row, "messages"), "messages", fmt, last="assistant", tools=tools)
    elif fmt == "prompt_completion":
        _text(_get(row, "prompt"), "prompt", fmt)
        _text(_get(row, "completion"), "completion", fmt)
    elif fmt == "prompt_completion_conversational":
        _conversation(_get(row, "prompt"), "prompt", fmt, last="user", tools=tools)
        _assistant_turns(_get(row, "completion"), "completion", fmt, tools)
    elif fmt == "prompt":
        _text(_get(row, "prompt"), "prompt", fmt)
    elif fmt == "prompt_conversational":
        _conversation(_get(row, "prompt"), "prompt", fmt, last="user", tools=tools)
    elif fmt in FORMATS["preference"]:
        _preference(row, fmt)
    else:
        known = ", ".join(f for fs in FORMATS.values() for f in dict.fromkeys(fs))
        raise ValueError(f"unknown format {fmt!r}; expected one of {known}")


def _preference(row: dict, fmt: str) -> None:
    conversational, implicit = fmt.endswith("_conversational"), "implicit" in fmt
    if not implicit:
        if conversational:
            _conversation(_get(row, "prompt"), "prompt", fmt, last="user")
        else:
            _text(_get(row, "prompt"), "prompt", fmt)
    for name in ("chosen", "rejected"):
        value = _get(row, name)
        if not conversational:
            _text(value, name, fmt)
        elif implicit:
            _conversation(value, name, fmt, last="assistant")
        else:
            _assistant_turns(value, name, fmt)
    chosen, rejected = row["chosen"], row["rejected"]
    if implicit and conversational:
        # the prompt is implicit: everything before the last assistant turn, which must be the same in both
        chosen_prompt, rejected_prompt = _turns(chosen[:-1]), _turns(rejected[:-1])
        if chosen_prompt != rejected_prompt:
            where = next((i for i, (a, b) in enumerate(zip(chosen_prompt, rejected_prompt)) if a != b), None)
            detail = (f"they differ at turn {where}" if where is not None else
                      f"chosen has {len(chosen_prompt)} prompt turns, rejected has {len(rejected_prompt)}")
            raise RowError("rejected", "chosen and rejected must share the same prompt turns (everything before "
                           f"the last assistant turn); {detail}")
    if _same(chosen, rejected):
        raise RowError("rejected", "chosen and rejected are identical; a preference pair needs two different responses")
    if "margin" in row:
        margin = row["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise RowError("margin", f"expected a finite number, got {_describe(margin)}")


# A token of a real tokenizer rarely spans more than ~16 characters; 64 per token of max_length is far more than a
# row that the trainer keeps (or truncates only a little) can hold.
CHARS_PER_TOKEN = 64


def row_char_limit(max_length: int | None) -> int | None:
    """The most characters of text a row may hold for a stage that cuts sequences at `max_length` tokens."""
    return None if max_length is None else CHARS_PER_TOKEN * max_length


def _check_size(row: dict, max_chars: int) -> None:
    # Checked before tokenizing: a 10 MB row takes the tokenizer tens of seconds and gigabytes, only to be cut
    # to max_length tokens or dropped by the trainer.
    sizes = {name: _chars(row[name]) for name in _TEXT_COLUMNS if name in row}
    total = sum(sizes.values())
    if total > max_chars:
        biggest = max(sizes, key=sizes.get)
        raise RowError(biggest, f"the row holds {total:,} characters of text ({sizes[biggest]:,} in '{biggest}'), "
                       f"more than {max_chars:,} ({CHARS_PER_TOKEN} per token of max_length), far beyond what the "
                       "trainer can use: shorten or split the row, remove it, or raise max_length")


def _chars(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    return 0


def _get(row: dict, field: str):
    if field not in row:
        raise RowError(field, f"missing: this row has no '{field}' key (other rows have it)")
    return row[field]


def _text(value, field: str, fmt: str | None = None) -> None:
    if isinstance(value, str):
        if value.strip():
            return
        raise RowError(field, f"expected a non-empty string, got {_describe(value)}")
    note = ""
    if isinstance(value, list) and fmt:
        note = (f" (the source is in '{fmt}' format, detected from its first row, and every row must use the "
                "same format)")
    raise RowError(field, f"expected a string{note}, got {_describe(value)}")


def _messages(value, field: str, fmt: str, tools: dict[str, dict] | None = None) -> list[str]:
    """Check a list of well-formed messages; return their roles."""
    if not isinstance(value, list):
        note = ""
        if isinstance(value, str):
            note = (f" (the source is in '{fmt}' format, detected from its first row, and every row must use "
                    "the same format)")
        raise RowError(field, f"expected a list of messages {{'role': ..., 'content': ...}}{note}, "
                       f"got {_describe(value)}")
    if not value:
        raise RowError(field, "expected a non-empty list of messages, got an empty list")
    for i, message in enumerate(value):
        _message(message, f"{field}[{i}]", tools)
    return [message["role"] for message in value]


# Keys a message may have besides role and content: TRL's tool-calling format.
_MESSAGE_KEYS = {"assistant": ("tool_calls",), "tool": ("name", "tool_call_id")}


def _message(message, field: str, tools: dict[str, dict] | None = None) -> None:
    if not isinstance(message, dict):
        raise RowError(field, f"expected a message {{'role': ..., 'content': ...}}, got {_describe(message)}")
    if message.get("role") is None:
        hint = (" (ShareGPT 'from'/'value' turns are converted by `format: sharegpt` in the data source)"
                if message.get("from") is not None else "")
        raise RowError(f"{field}.role", f"missing; expected one of 'system', 'user', 'assistant', 'tool'{hint}")
    role = message["role"]
    if role not in ROLES:
        hint = {"human": " (use 'user')", "gpt": " (use 'assistant')", "bot": " (use 'assistant')",
                "model": " (use 'assistant')", "function": " (use 'tool')", "ipython": " (use 'tool')"}.get(role, "")
        raise RowError(f"{field}.role", f"expected one of 'system', 'user', 'assistant', 'tool'{hint}, "
                       f"got {_describe(role)}")
    # an empty list is no calls (some exports write `"tool_calls": []` on every assistant turn)
    calls = message.get("tool_calls") or None if role == "assistant" else None
    if calls is not None:
        check_tool_calls(calls, f"{field}.tool_calls", tools)
        if message.get("content") is not None and not isinstance(message["content"], str):
            raise RowError(f"{field}.content", f"expected a string (or none, beside tool_calls), "
                           f"got {_describe(message['content'])}")
    elif role == "tool":
        if not isinstance(message.get("content"), str):  # a tool may well return an empty string
            raise RowError(f"{field}.content", f"expected the tool's result as a string, "
                           f"got {_describe(message.get('content'))}")
    elif "content" not in message:
        raise RowError(f"{field}.content", "missing; expected a non-empty string")
    else:
        _text(message["content"], f"{field}.content")
    # Keys that are None are not the data's: Arrow gives every message the union of the keys seen in the
    # column (one message with "name" gives all the others "name": None).
    allowed = ("role", "content", *_MESSAGE_KEYS.get(role, ()))
    extra = sorted(str(key) for key, value in message.items() if key not in allowed and value is not None)
    if extra:
        hint = (" (OpenAI's per-message 'weight' is read by `format: openai` in the data source)"
                if extra == ["weight"] else "")
        raise RowError(field, f"unexpected key(s) {', '.join(map(repr, extra))}: a message may only have 'role' "
                       f"and 'content' (and TRL's tool-calling keys: 'tool_calls' on an assistant turn, 'name' and "
                       f"'tool_call_id' on a tool turn; multimodal parts are not supported); remove them{hint}")


def _conversation(value, field: str, fmt: str, last: str, tools: dict[str, dict] | None = None) -> None:
    roles = _messages(value, field, fmt, tools)
    if last == "assistant" and value[-1].get("tool_calls"):  # its results, and the answer, would come after it
        raise RowError(field, "expected the conversation to end with an assistant turn without tool_calls (the "
                       "answer after the tool results), got an assistant turn with tool_calls as the last turn")
    i = 1 if roles[0] == "system" else 0
    expected = "user"
    while i < len(roles):
        role = roles[i]
        if role == "system":
            raise RowError(f"{field}[{i}].role", f"a 'system' turn is only allowed as the first message, "
                           f"found one at position {i}")
        if role == "tool":
            raise RowError(f"{field}[{i}].role", "a 'tool' message with no call to answer: tool results come right "
                           "after the assistant turn whose 'tool_calls' they answer, one per call")
        if role != expected:
            raise RowError(f"{field}[{i}].role", f"expected '{expected}' (after an optional first system turn, "
                           f"turns alternate user, assistant, user, ...; an assistant turn with tool_calls is "
                           f"followed by its tool results and then the assistant again), got '{role}'")
        if role == "assistant" and value[i].get("tool_calls"):
            i = check_tool_results(value, i, field)  # the assistant continues once it has the results
            continue
        expected = "assistant" if role == "user" else "user"
        i += 1
    if roles[-1] != last and not (last == "user" and roles[-1] == "tool"):  # a prompt may end with tool results
        article = "an" if last == "assistant" else "a"
        raise RowError(field, f"expected the conversation to end with {article} {last} turn, "
                       f"got '{roles[-1]}' as the last turn")


def _assistant_turns(value, field: str, fmt: str, tools: dict[str, dict] | None = None) -> None:
    for i, role in enumerate(_messages(value, field, fmt, tools)):
        if role != "assistant":
            raise RowError(f"{field}[{i}].role", f"expected 'assistant' ('{field}' holds only the assistant's "
                           f"response turns), got '{role}'")
        if value[i].get("tool_calls") and i < len(value) - 1:
            # its results would have to follow in the completion, where they would be trained as the model's text
            raise RowError(f"{field}[{i}].tool_calls", f"a call can only end '{field}': the tool results that answer "
                           "it are not the model's to learn; put the call and its results in the prompt, or train on "
                           "`messages` (assistant-only loss masks the results)")


def _turns(messages: list[dict]) -> list[tuple]:
    # content may be None beside tool_calls; the calls are part of the turn
    return [(m["role"], (m.get("content") or "").strip(), json.dumps(m.get("tool_calls"), sort_keys=True))
            for m in messages]


def _same(a, b) -> bool:
    if isinstance(a, str):
        return a.strip() == b.strip()
    return _turns(a) == _turns(b)


def _check_kind(kind: str) -> None:
    if kind not in FORMATS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(map(repr, FORMATS))}")


def _source_error(source: str, problem: str, columns, kind: str, files: bool = False) -> DataError:
    found = ", ".join(repr(c) for c in columns) if columns else "none"
    groups: dict[tuple, list[str]] = {}
    for fmt in FORMATS[kind]:
        groups.setdefault(FORMAT_COLUMNS[fmt], []).append(fmt)
    accepted = "; ".join(f"{' / '.join(fmts)} (columns {', '.join(cols)})" for cols, fmts in groups.items())
    message = f"{source}: {problem}. Columns found: {found}. Accepted formats for kind '{kind}': {accepted}."
    return DataError(f"{message} {_FILES_ACCEPTED}" if files else message)


# ---------------------------------------------------------------------------------------------- other formats
# A source in a common format that is not TRL's (Alpaca, ShareGPT, Anthropic HH, UltraFeedback, OpenAI) is
# converted row by row at load time into the kit's formats above and then validated like any other source, so
# errors still name the file and the row. The converters read the raw fields first and name those in errors.
# TRL's converters are imported where they are used: trl.data_utils imports torch and transformers (seconds),
# which the commands that only check data never need.


@dataclass(frozen=True)
class SourceFormat:
    """A format the loader converts; `needs` lists, per kind, the columns it reads ("a|b": either)."""

    convert: Callable[[dict, str], dict]  # (row, kind) -> a row in one of FORMATS[kind]
    needs: dict[str, tuple[str, ...]]
    looks_like: str  # how the error for an unconverted source describes it
    auto: bool  # converted without `format:` when the kit's own formats refuse the rows (a renaming, no choice)
    text_columns: tuple[str, ...] = ()  # read as strings from CSV


def _pop(row: dict, name: str):
    if name not in row:
        raise RowError(name, f"missing: this row has no '{name}' key (other rows have it)")
    return row.pop(name)


def _pop_text(row: dict, name: str, optional: bool = False) -> str | None:
    value = row.pop(name, None) if optional else _pop(row, name)
    if optional and (value is None or (isinstance(value, str) and not value.strip())):
        return None
    _text(value, name)
    return value


def _alpaca(row: dict, kind: str) -> dict:
    # The instruction and its input are one user turn, separated by a blank line (the Alpaca template puts them in
    # two paragraphs); `history` holds earlier [query, response] pairs, as in LLaMA-Factory.
    rest = dict(row)
    instruction, extra = _pop_text(rest, "instruction"), _pop_text(rest, "input", optional=True)
    system = _pop_text(rest, "system", optional=True)
    turns = [{"role": "system", "content": system}] if system else []
    for i, pair in enumerate(rest.pop("history", None) or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(f"history[{i}]", f"expected a [query, response] pair of strings, got {_describe(pair)}")
        _text(pair[0], f"history[{i}][0]")
        _text(pair[1], f"history[{i}][1]")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    turns.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    if kind == "sft":
        return {"messages": turns + [{"role": "assistant", "content": _pop_text(rest, "output")}], **rest}
    if kind == "prompt":  # `output` stays a column: reward functions receive it
        return {"prompt": turns, **rest}
    return {"prompt": turns, **{name: [{"role": "assistant", "content": _pop_text(rest, name)}]
                                for name in ("chosen", "rejected")}, **rest}


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt_turns(value, field: str) -> list[dict]:
    """Copies of well-formed {'from', 'value'} turns (TRL's converter renames the keys in place)."""
    if not isinstance(value, list) or not value:
        raise RowError(field, "expected a non-empty list of turns {'from': ..., 'value': ...}, "
                       f"got {_describe(value)}")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "from" not in turn:
            raise RowError(f"{field}[{i}]", f"expected a turn {{'from': ..., 'value': ...}}, got {_describe(turn)}")
        if turn["from"] not in _SHAREGPT_ROLES:
            tool = turn["from"] in ("function_call", "observation", "tool")
            tools = " (tool turns are not supported)" if tool else ""
            raise RowError(f"{field}[{i}].from", f"expected one of {', '.join(map(repr, _SHAREGPT_ROLES))}{tools}, "
                           f"got {_describe(turn['from'])}")
    return [dict(turn) for turn in value]


def _sharegpt(row: dict, kind: str) -> dict:
    # LLaMA-Factory's layout: the conversation in `conversations` (or `messages`), an optional `system` column, and
    # for preference data the prompt conversation plus one `chosen` and one `rejected` turn.
    rest = dict(row)
    column = "conversations" if "conversations" in rest else "messages"
    turns = _sharegpt_turns(_pop(rest, column), column)
    system = _pop_text(rest, "system", optional=True)
    if system:
        turns.insert(0, {"from": "system", "value": system})
    converted = {"messages": turns}
    if kind == "preference":
        for name in ("chosen", "rejected"):
            value = _pop(rest, name)
            converted[name] = _sharegpt_turns([value] if isinstance(value, dict) else value, name)
    from trl.data_utils import maybe_convert_to_chatml

    converted = maybe_convert_to_chatml(converted)  # TRL: 'from' -> 'role', 'value' -> 'content'
    for conversation in converted.values():
        for message in conversation:
            message["role"] = _SHAREGPT_ROLES[message["role"]]
    if kind == "sft":
        return {"messages": converted["messages"], **rest}
    return {"prompt": converted.pop("messages"), **converted, **rest}


_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


def _looks_like_hh(value) -> bool:
    return isinstance(value, str) and "\n\nAssistant:" in value and bool(re.search(r"(^|\n\n)Human:", value))


def _hh_turns(text, field: str) -> list[dict]:
    """'\\n\\nHuman: q\\n\\nAssistant: a' -> [user q, assistant a], contents stripped; a final empty Assistant: (the
    cue to answer, in prompts) is dropped."""
    if not isinstance(text, str):
        raise RowError(field, "expected a string of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns, "
                       f"got {_describe(text)}")
    parts = _HH_MARKER.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip() or len(parts) < 3:
        raise RowError(field, f"expected text that starts with 'Human:' and alternates '\\n\\nHuman: ...' and "
                       f"'\\n\\nAssistant: ...' turns, got {_describe(text)}")
    turns = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
             for speaker, content in zip(parts[1::2], parts[2::2])]
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"] and len(turns) > 1:
        turns.pop()
    return turns


def _hh(row: dict, kind: str) -> dict:
    rest = dict(row)
    if kind == "prompt":
        return {"prompt": _hh_turns(_pop(rest, "prompt"), "prompt"), **rest}
    # A `prompt` column (as in HH-derived sets) ends with "\n\nAssistant:"; each response continues it.
    prompt = rest.pop("prompt", "")
    if not isinstance(prompt, str):
        raise RowError("prompt", "expected a string of '\\n\\nHuman: ...\\n\\nAssistant:' turns, "
                       f"got {_describe(prompt)}")
    pair = {}
    for name in ("chosen", "rejected"):
        value = _pop(rest, name)
        _text(value, name)
        pair[name] = _hh_turns(prompt + value, name)
    from trl.data_utils import extract_prompt

    # chosen and rejected must be the same conversation up to their last assistant turns, which TRL's
    # extract_prompt then takes apart into prompt / chosen / rejected
    _preference(pair, "preference_implicit_conversational")
    return {**extract_prompt(pair), **rest}


def _ultrafeedback(row: dict, kind: str) -> dict:
    # HuggingFaceH4/ultrafeedback_binarized: a string `prompt` and chosen / rejected conversations that begin with
    # it as the user turn. The shared turns become the prompt (TRL's extract_prompt), and the string must repeat
    # the last user turn: it is dropped, so it may hold nothing else. Conversations of assistant turns only take the
    # string as their user turn.
    rest = dict(row)
    prompt = _pop_text(rest, "prompt")
    pair = {name: _pop(rest, name) for name in ("chosen", "rejected")}
    for name, value in pair.items():
        _messages(value, name, "preference_conversational")
    if all(value[0]["role"] == "assistant" for value in pair.values()):
        return {"prompt": [{"role": "user", "content": prompt}], **pair, **rest}
    from trl.data_utils import extract_prompt

    _preference(pair, "preference_implicit_conversational")
    converted = extract_prompt(pair)
    asked = converted["prompt"][-1]["content"] if converted["prompt"] else None
    if not isinstance(asked, str) or asked.strip() != prompt.strip():
        raise RowError("prompt", f"expected the text of the conversations' last user turn, {_describe(asked)}, "
                       f"which the conversion keeps; got {_describe(prompt)}")
    if rest.get("messages") == pair["chosen"]:
        del rest["messages"]  # the chosen conversation again (ultrafeedback_binarized); TRL refuses the extra key
    return {**converted, **rest}


def _openai_messages(value, field: str) -> list:
    # OpenAI's fine-tuning `weight` per assistant message: 1 trains it, as every assistant turn here; 0 cannot be
    # expressed, so it is refused rather than trained.
    if not isinstance(value, list):
        return value  # validated as a conversation after conversion
    messages = []
    for i, message in enumerate(value):
        if isinstance(message, dict) and "weight" in message:
            weight = message["weight"]  # None: Arrow gives every message the keys any message has (parquet, Hub)
            if weight is not None and (weight != 1 or isinstance(weight, bool)):
                raise RowError(f"{field}[{i}].weight", "expected 1 (trained); a message that is shown but not "
                               "trained (weight 0) is not supported: every assistant turn trains. Remove the "
                               f"turn or its weight, got {_describe(weight)}")
            message = {k: v for k, v in message.items() if k != "weight"}
        messages.append(message)
    _messages(messages, field, "openai")
    return messages


def _openai(row: dict, kind: str) -> dict:
    # Chat fine-tuning rows are the kit's `messages` already (per-message weights aside); preference fine-tuning
    # rows hold {'input': {'messages': [...]}, 'preferred_output': [...], 'non_preferred_output': [...]}.
    rest = dict(row)
    if kind == "sft":  # `tools` stays a column: OpenAI's tool schemas and calls are TRL's
        rest.pop("parallel_tool_calls", None)
        return {"messages": _openai_messages(_pop(rest, "messages"), "messages"), **rest}
    request = _pop(rest, "input")
    if not isinstance(request, dict) or "messages" not in request:
        raise RowError("input", f"expected an object {{'messages': [...]}}, got {_describe(request)}")
    if request.get("tools"):
        raise RowError("input.tools", "tool definitions are not supported; remove them")
    return {"prompt": _openai_messages(request["messages"], "input.messages"),
            "chosen": _openai_messages(_pop(rest, "preferred_output"), "preferred_output"),
            "rejected": _openai_messages(_pop(rest, "non_preferred_output"), "non_preferred_output"), **rest}


SOURCE_FORMATS: dict[str, SourceFormat] = {
    "alpaca": SourceFormat(
        _alpaca, {"sft": ("instruction", "output"), "prompt": ("instruction",),
                  "preference": ("instruction", "chosen", "rejected")},
        "Alpaca data (instruction / input / output)", auto=False,
        text_columns=("instruction", "input", "output", "system", "chosen", "rejected")),
    "sharegpt": SourceFormat(
        _sharegpt, {"sft": ("conversations|messages",), "prompt": ("conversations|messages",),
                    "preference": ("conversations|messages", "chosen", "rejected")},
        "ShareGPT data ('conversations' of {'from', 'value'} turns)", auto=True, text_columns=("system",)),
    "hh": SourceFormat(
        _hh, {"preference": ("chosen", "rejected"), "prompt": ("prompt",)},
        "Anthropic HH raw text ('\\n\\nHuman: ...\\n\\nAssistant: ...'), which would train as plain text without "
        "the conversation's roles", auto=False, text_columns=("prompt", "chosen", "rejected")),
    "ultrafeedback": SourceFormat(
        _ultrafeedback, {"preference": ("prompt", "chosen", "rejected")},
        "UltraFeedback data (a string prompt, chosen / rejected conversations)", auto=True),
    "openai": SourceFormat(
        _openai, {"sft": ("messages",), "preference": ("input", "preferred_output", "non_preferred_output")},
        "OpenAI preference fine-tuning data (input / preferred_output / non_preferred_output)", auto=True),
}


def _source_format(columns, row: dict, kind: str) -> str | None:
    """The SOURCE_FORMATS key that a source looks like, from its columns and first row; None for none."""
    cols = set(columns)
    if kind == "preference" and {"input", "preferred_output", "non_preferred_output"} <= cols:
        return "openai"
    turns = row.get("conversations", row.get("messages"))
    if (isinstance(turns, list) and turns and isinstance(turns[0], dict) and turns[0].get("from") is not None
            and turns[0].get("role") is None):  # .get: Arrow gives a turn every key any turn has, None if unset
        return "sharegpt"
    if "instruction" in cols:
        return "alpaca"
    if kind in ("preference", "prompt") and any(_looks_like_hh(row.get(c)) for c in ("prompt", "chosen", "rejected")):
        return "hh"
    if kind == "preference" and isinstance(row.get("prompt"), str) and all(
            isinstance(row.get(name), list) for name in ("chosen", "rejected")):
        return "ultrafeedback"
    return None


def _format_today(columns, row: dict, kind: str) -> str | None:
    """The kit's own format that takes the row as it is, if any (then it loads as before, whatever it looks like)."""
    try:
        fmt = detect_format(columns, row, kind, "-")
        validate_row(row, fmt)
    except DataError:
        return None
    return fmt


def _misread(name: str, fmt: str | None) -> bool:
    """Whether the kit's format `fmt` would take a source that looks like `name` but read it wrongly, silently."""
    if name == "hh":  # the markup becomes text to train on, and the roles are lost
        return True
    # Alpaca pairs without a prompt column pass as implicit-prompt pairs: the instruction would be ignored
    return name == "alpaca" and fmt in ("text", "preference_implicit", "preference_implicit_conversational")


def _conversion(source: DataSource, columns, first: dict, kind: str, path: str) -> Callable[[dict], dict] | None:
    """How to convert each row of `path` (a file of `source`), or None to read it as it is. Refuses a source that
    looks like a format it cannot convert unasked, naming the setting that converts it."""
    mapping = source.columns or {}
    _check_mapping(mapping, columns, path, kind)
    renamed = list(_rename(dict.fromkeys(columns), mapping))
    first = _rename(first, mapping)
    name = source.format
    if name is None:
        name = _source_format(renamed, first, kind)
        if name is not None:
            today = _format_today(renamed, first, kind)
            if today is not None and not _misread(name, today):
                name = None  # the kit's formats take it as it is: it loads as it always did
        if name is not None and not SOURCE_FORMATS[name].auto:
            raise _source_error(path, f"looks like {SOURCE_FORMATS[name].looks_like}; add `format: {name}` to this "
                                f"data source to convert it, e.g. in YAML `dataset_name: [{{path: {source.path}, "
                                f"format: {name}}}]`", columns, kind)
    if name is None:
        return (lambda row: _rename(row, mapping)) if mapping else None
    spec = SOURCE_FORMATS[name]
    if kind not in spec.needs:
        raise DataError(f"{path}: format '{name}' converts to {' / '.join(spec.needs)} data, not '{kind}' data")
    missing = [need for need in spec.needs[kind] if not set(need.split("|")) & set(renamed)]
    if missing:
        needs = ", ".join(need.replace("|", " or ") for need in spec.needs[kind])
        raise DataError(f"{path}: format '{name}' reads the column(s) {needs} for kind '{kind}', and this source has "
                        f"no {missing[0].replace('|', ' or ')} (columns found: {', '.join(map(repr, columns))}); "
                        f"name the file's column with `columns: {{{missing[0].split('|')[0]}: <its name>}}`")

    def convert(row: dict) -> dict:
        try:
            return spec.convert(_rename(row, mapping), kind)
        except RowError as error:  # name the file's own column
            root = re.match(r"[^.\[]*", error.field).group(0)
            if root not in mapping:
                raise
            raise RowError(mapping[root] + error.field[len(root):], error.expected) from None
    return convert


def _check_mapping(mapping: dict, columns, path: str, kind: str) -> None:
    for target, column in mapping.items():
        if column not in columns:
            raise _source_error(path, f"columns: maps '{column}' to '{target}', but the source has no column "
                                f"'{column}'", columns, kind)
        if target in columns and target not in mapping.values():
            raise _source_error(path, f"columns: maps '{column}' to '{target}', but the source has a '{target}' "
                                "column too; map or remove one of them", columns, kind)


def _rename(row: dict, mapping: dict) -> dict:
    if not mapping:
        return row
    names = {column: target for target, column in mapping.items()}
    return {names.get(key, key): value for key, value in row.items()}


# ---------------------------------------------------------------------------------------------- reading


def _extension(path: str) -> str | None:
    return next((ext for ext in EXTENSIONS if path.lower().endswith(ext)), None)


def _load_file(path: str, kind: str, max_chars: int | None, source: DataSource) -> tuple[datasets.Dataset, str]:
    """Load, convert (see `source.format`), detect and validate one file; return the dataset and its format."""
    try:
        return _read_file(path, kind, max_chars, source)
    except UnicodeDecodeError:
        raise _encoding_error(path) from None


def _encoding_error(path: str) -> DataError:
    """Where a text file stops being UTF-8: Python's own error gives only a position in an 8 KB read buffer."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return DataError(f"{path}: line {n}: byte 0x{line[error.start]:02x} at column {error.start + 1} is "
                                 "not UTF-8; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _read_file(path: str, kind: str, max_chars: int | None, source: DataSource) -> tuple[datasets.Dataset, str]:
    ext = _extension(path)
    if ext is None:
        raise _source_error(path, f"unknown file type; accepted extensions: {', '.join(EXTENSIONS)}", [], kind)
    if ext in (".jsonl", ".json"):
        return _load_json(path, kind, max_chars, source)
    if ext == ".csv":
        return _load_csv(path, kind, max_chars, source)
    schema = pq.read_schema(path) if os.path.getsize(path) else None
    if schema is None or pq.read_metadata(path).num_rows == 0:  # the builder fails on these without saying why
        raise _source_error(path, "empty file: no rows", schema.names if schema else [], kind)
    return _check_dataset(_build("parquet", path), path, kind, max_chars, source)


# A local file is read by its packaged builder directly: `datasets.load_dataset("json", ...)` also sends a download
# count to the Hub (datasets 5.2, `increase_load_count`) unless offline mode is set, a network call for local data.
_READERS = {"json": datasets.Dataset.from_json, "csv": datasets.Dataset.from_csv,
            "parquet": datasets.Dataset.from_parquet}


def _build(builder: str, path: str, **kwargs) -> datasets.Dataset:
    try:
        return _READERS[builder](path, split="train", **kwargs)
    except Exception as error:  # the builders raise many types (Arrow, pandas, DatasetGenerationError)
        raise DataError(f"{path}: could not be read as {builder.upper()}: {type(error).__name__}: {error}") from error


def json_records(path: str):
    """Yield (row number, record) from a JSON Lines file (row = line number) or a JSON list (row = position)."""
    with open(path, encoding="utf-8-sig") as f:
        while (first := f.read(1)) and first.isspace():
            pass
        f.seek(0)
        if first == "[":
            try:
                records = json.load(f)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: invalid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                                "expected a JSON list of row objects or JSON Lines") from None
            numbered = enumerate(records, 1)
        else:
            numbered = _json_lines(f, path)
        for n, record in numbered:
            if not isinstance(record, dict):
                raise DataError(f"{path}: row {n}: expected a JSON object with the columns as keys, "
                                f"got {_describe(record)}")
            yield n, record


def _json_lines(f, path: str):
    for n, line in enumerate(f, 1):
        if line.strip():  # blank lines are skipped by datasets' reader too, so row numbers stay line numbers
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: row {n}: invalid JSON ({error.msg} at column {error.colno}); expected "
                                "one JSON object per line (or a .json file holding a list of objects)") from None


def _load_json(path: str, kind: str, max_chars: int | None, source: DataSource) -> tuple[datasets.Dataset, str]:
    # Validate the rows as written, before Arrow sees them: Arrow would turn a missing key into null and
    # datasets 5.x JSON-encodes a column whose type varies between rows, hiding the bad row.
    columns, first, count = {}, None, 0
    for _, record in json_records(path):
        columns.update(dict.fromkeys(record))
        first = record if first is None else first
        count += 1
    if count == 0:
        raise _source_error(path, "empty file: no rows", [], kind)
    convert = _conversion(source, list(columns), first, kind, path)
    if convert is not None:
        return _converted(json_records(path), convert, kind, path, max_chars)
    fmt = detect_format(list(columns), first, kind, path)
    _validate_rows(json_records(path), fmt, path, max_chars)
    dataset = _build("json", path)
    if len(dataset) != count:
        raise DataError(f"{path}: datasets read {len(dataset)} rows but the file holds {count}; "
                        "check the file for records spanning several lines")
    return _drop_conflicting_columns(dataset, fmt, path), fmt


def _load_csv(path: str, kind: str, max_chars: int | None, source: DataSource) -> tuple[datasets.Dataset, str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header, first = next(reader, None), next(reader, None)
    if not header:
        raise _source_error(path, "empty file: no header and no rows", [], kind)
    if first is None:  # checked here: datasets' CSV builder fails on it with "corresponds to no data"
        raise _source_error(path, "no rows (only a header)", header, kind)
    # Text columns stay strings ("007" is not 7, "None" and "NA" are not missing); only an empty cell is null.
    text_columns = _csv_text_columns(header, source)
    na_values = {c: [""] if c in text_columns else list(_PANDAS_NA) for c in header}
    dataset = _build("csv", path, converters={c: str for c in text_columns}, keep_default_na=False,
                     na_values=na_values)
    rows = dataset.to_list()
    parsed = _parse_json_columns(rows, path, _csv_conversation_columns(header, source))
    convert = _conversion(source, header, rows[0], kind, path)
    if convert is not None:
        return _converted(enumerate(rows, 1), convert, kind, path, max_chars)
    fmt = detect_format(header, rows[0], kind, path)
    _validate_rows(enumerate(rows, 1), fmt, path, max_chars)
    if parsed:
        dataset = datasets.Dataset.from_list(rows)
    return _drop_conflicting_columns(dataset, fmt, path), fmt


def _csv_text_columns(header: list[str], source: DataSource) -> list[str]:
    names = _TEXT_COLUMNS + (SOURCE_FORMATS[source.format].text_columns if source.format else ())
    return [c for c in header if _renamed(c, source.columns) in names]


def _csv_conversation_columns(header: list[str], source: DataSource) -> list[str]:
    names = _CONVERSATION_COLUMNS + (("conversations",) if source.format == "sharegpt" else ())
    return [c for c in header if _renamed(c, source.columns) in names]


def _renamed(column: str, mapping: dict | None) -> str:
    """The name the kit reads `column` under, given a source's `columns` mapping."""
    return next((target for target, name in (mapping or {}).items() if name == column), column)


def _parse_json_columns(rows: list[dict], path: str, columns=_CONVERSATION_COLUMNS) -> bool:
    """CSV cannot hold conversations: parse a column written as JSON lists of messages. True if any was."""
    parsed = False
    for column in columns:
        first = next((row[column] for row in rows if row.get(column) is not None), None)
        if not _looks_like_conversation(first):
            continue
        for n, row in enumerate(rows, 1):
            if isinstance(row[column], str):
                try:
                    row[column] = json.loads(row[column])
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: row {n}: field '{column}': expected a JSON list of messages (this CSV "
                                    f"column holds conversations as JSON), got invalid JSON ({error.msg} at "
                                    f"character {error.pos})") from None
        parsed = True
    return parsed


def _looks_like_conversation(value) -> bool:
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return False
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        return False
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _check_dataset(dataset: datasets.Dataset, name: str, kind: str, max_chars: int | None,
                   source: DataSource) -> tuple[datasets.Dataset, str]:
    if len(dataset) == 0:
        raise _source_error(name, "no rows", dataset.column_names, kind)
    convert = _conversion(source, dataset.column_names, dataset[0], kind, name)
    if convert is not None:
        return _converted(enumerate(_rows(dataset), 1), convert, kind, name, max_chars)
    fmt = detect_format(dataset.column_names, dataset[0], kind, name)
    _validate_rows(enumerate(_rows(dataset), 1), fmt, name, max_chars)
    return _drop_conflicting_columns(dataset, fmt, name), fmt


def _converted(numbered_rows, convert: Callable[[dict], dict], kind: str, name: str,
               max_chars: int | None) -> tuple[datasets.Dataset, str]:
    """Convert every row (errors name the row), then detect and validate the result like any source."""
    rows = _convert_rows(numbered_rows, convert, name)
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    fmt = detect_format(columns, rows[0][1], kind, name)
    _validate_rows(rows, fmt, name, max_chars)
    # every column of every row (Dataset.from_list would keep only the first row's), null where a row lacks it, as
    # datasets' JSON reader does
    dataset = datasets.Dataset.from_dict({column: [row.get(column) for _, row in rows] for column in columns})
    return _drop_conflicting_columns(dataset, fmt, name), fmt


def _convert_rows(numbered_rows, convert: Callable[[dict], dict], name: str) -> list[tuple[int, dict]]:
    converted = []
    for n, row in numbered_rows:
        try:
            converted.append((n, convert(row)))
        except RowError as error:
            raise DataError(f"{name}: row {n}: {error}") from None
    return converted


def _rows(dataset: datasets.Dataset):
    for batch in dataset.iter(batch_size=1024):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield dict(zip(names, values))


def _validate_rows(numbered_rows, fmt: str, source: str, max_chars: int | None = None) -> None:
    for n, row in numbered_rows:
        try:
            if max_chars is not None:
                _check_size(row, max_chars)
            validate_row(row, fmt)
        except RowError as error:
            raise DataError(f"{source}: row {n}: {error}") from None


def _drop_conflicting_columns(dataset: datasets.Dataset, fmt: str, source: str) -> datasets.Dataset:
    # TRL's SFTTrainer takes any row with a 'prompt' key for prompt-completion data, and is_conversational()
    # looks at an arbitrary one of prompt/completion/messages, so a stray column (ultrachat_200k ships a
    # 'prompt' next to its 'messages') breaks training. Such a column only repeats the conversation.
    if fmt not in ("messages", "text"):
        return dataset
    stray = [c for c in ("prompt", "completion") if c in dataset.column_names]
    if not stray:
        return dataset
    warnings.warn(f"{source}: dropping column(s) {', '.join(map(repr, stray))} from '{fmt}' data: TRL would read "
                  "them as prompt-completion data", stacklevel=4)
    return dataset.remove_columns(stray)


# ---------------------------------------------------------------------------------------------- resolving


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def _is_local(path: str) -> bool:
    """Existing paths and globs are local; so is anything that looks like a path. The rest is a Hub name."""
    expanded = os.path.expanduser(path)
    return os.path.exists(expanded) or _is_glob(path) or _extension(path) is not None or looks_like_path(path)


def _local_files(source: DataSource, split: str, kind: str) -> list[str]:
    path = os.path.expanduser(source.path)
    if _is_glob(path):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        files = [p for p in matches if _extension(p)]
        if not files:
            seen = f" (it matches only {', '.join(matches[:5])})" if matches else ""
            raise _source_error(source.path, f"the pattern matches no {'/'.join(EXTENSIONS)} files{seen}", [],
                                kind, files=True)
        return files
    if os.path.isfile(path):
        return [source.path]
    if os.path.isdir(path):
        return _split_files(source.path, split)
    raise _source_error(source.path, f"file or directory not found (working directory {os.getcwd()})", [], kind,
                        files=True)


def _split_files(directory: str, split: str) -> list[str]:
    """Files of `split` in a directory: <split>.<ext>, shards <split>-*.<ext>, and all files in <split>/."""
    files = []
    for entry in sorted(os.listdir(os.path.expanduser(directory))):
        ext = _extension(entry)
        full = os.path.join(directory, entry)
        if ext and os.path.isfile(os.path.expanduser(full)):
            stem = entry[: -len(ext)]
            if stem == split or stem.startswith(split + "-"):
                files.append(full)
    subdirectory = os.path.join(directory, split)
    if os.path.isdir(os.path.expanduser(subdirectory)):
        for entry in sorted(os.listdir(os.path.expanduser(subdirectory))):
            full = os.path.join(subdirectory, entry)
            if _extension(entry) and os.path.isfile(os.path.expanduser(full)):
                files.append(full)
    return files


def _load_source(source: DataSource, split: str, kind: str,
                 max_chars: int | None = None) -> list[tuple[str, datasets.Dataset, str]] | None:
    """(name, dataset, format) for each file of the source; None if a non-train split does not exist."""
    # load_data(split="train") takes each source's own split (e.g. a Hub "train_sft"); other splits are literal
    wanted = source.split if split == "train" else split
    if not _is_local(source.path):
        loaded = _load_hub(source, wanted, kind, optional=split != "train", max_chars=max_chars)
        return None if loaded is None else [loaded]
    files = _local_files(source, wanted, kind)
    if not files:
        if split != "train":
            return None
        raise _no_split_file(source, wanted, kind)
    return [(path, *_load_file(path, kind, max_chars, source)) for path in files]


def _no_split_file(source: DataSource, split: str, kind: str) -> DataError:
    present = sorted(os.listdir(os.path.expanduser(source.path)))
    return _source_error(source.path, f"no file for split '{split}' in the directory: expected {split}.jsonl, "
                         f"{split}.json, {split}.csv, {split}.parquet, shards {split}-*.<ext> or a {split}/ "
                         f"subdirectory; the directory holds {', '.join(present) or 'nothing'}", [], kind, files=True)


def _load_hub(source: DataSource, split: str, kind: str, optional: bool,
              max_chars: int | None = None) -> tuple[str, datasets.Dataset, str] | None:
    label = f"{source.path}[{split}]"
    try:
        dataset = datasets.load_dataset(source.path, source.name, split=split)
    except ValueError as error:
        if optional and "Unknown split" in str(error):
            return None
        raise _hub_error(source, label, error, kind) from error
    except Exception as error:  # offline, not found, gated: datasets raises many types
        raise _hub_error(source, label, error, kind) from error
    return (label, *_check_dataset(dataset, label, kind, max_chars, source))


def _hub_error(source: DataSource, label: str, error: Exception, kind: str) -> DataError:
    return _source_error(label, f"'{source.path}' is not a local file or directory (working directory "
                         f"{os.getcwd()}), and loading it as a Hub dataset failed: {type(error).__name__}: {error}",
                         [], kind, files=True)


# ---------------------------------------------------------------------------------------------- checking ahead


def check_sources(sources, kind: str, split: str = "train", rows: int = 100, max_chars: int | None = None) -> None:
    """Check, without loading them, that the local files of `sources` exist and that their first `rows` rows are
    valid `kind` data: the pipeline runs this on every stage's data before the first stage trains. Hub datasets are
    left to the stage (no network before training starts); a non-train split that is missing is no error."""
    _check_kind(kind)
    for source in parse_sources(sources):
        if not _is_local(source.path):
            continue
        wanted = source.split if split == "train" else split
        files = _local_files(source, wanted, kind)
        if not files and split == "train":
            raise _no_split_file(source, wanted, kind)
        for path in files:
            _check_head(path, kind, rows, max_chars, source)


def _check_head(path: str, kind: str, rows: int, max_chars: int | None, source: DataSource) -> None:
    if _extension(path) is None:
        raise _source_error(path, f"unknown file type; accepted extensions: {', '.join(EXTENSIONS)}", [], kind)
    try:
        head = _head(path, rows, source)
    except UnicodeDecodeError:
        raise _encoding_error(path) from None
    if not head:
        raise _source_error(path, "empty file: no rows", [], kind)
    columns = list(dict.fromkeys(key for _, row in head for key in row))
    convert = _conversion(source, columns, head[0][1], kind, path)
    if convert is not None:
        head = _convert_rows(head, convert, path)
        columns = list(dict.fromkeys(key for _, row in head for key in row))
    _validate_rows(head, detect_format(columns, head[0][1], kind, path), path, max_chars)


def _head(path: str, rows: int, source: DataSource) -> list[tuple[int, dict]]:
    """The first `rows` (row number, row) of a file, read as `load_data` reads it."""
    ext = _extension(path)
    if ext in (".jsonl", ".json"):
        return list(itertools.islice(json_records(path), rows))
    if ext == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            records = [{k: (v if v != "" else None) for k, v in row.items()}
                       for row in itertools.islice(csv.DictReader(f), rows)]
        _parse_json_columns(records, path, _csv_conversation_columns(list(records[0]) if records else [], source))
        return list(enumerate(records, 1))
    batch = next(pq.ParquetFile(path).iter_batches(batch_size=rows), None) if os.path.getsize(path) else None
    return list(enumerate(batch.to_pylist(), 1)) if batch is not None else []


# ---------------------------------------------------------------------------------------------- mixing


def load_data(sources, kind: str, split: str = "train", seed: int = 0,
              max_chars: int | None = None) -> datasets.Dataset | None:
    """Load, validate and mix `sources` (anything parse_sources reads) as `kind` data ("text", "sft",
    "preference", "prompt"). With split "train" each source's own split is used; another split is taken
    as named, and sources without it are skipped (None if none has it). Several sources are mixed by
    weight: the largest mixture in which no source repeats a row, shuffled with `seed`. A row with more
    than `max_chars` characters of text (see `row_char_limit`) is refused, naming its file and row."""
    _check_kind(kind)
    loaded = []
    for source in parse_sources(sources):
        files = _load_source(source, split, kind, max_chars)
        if files is not None:
            loaded.append((source, files))
    if not loaded:
        return None
    formats = {name: fmt for _, files in loaded for name, _, fmt in files}
    if len(set(formats.values())) > 1:
        found = ", ".join(f"{name} is '{fmt}'" for name, fmt in formats.items())
        raise DataError(f"sources of one dataset must share one format, because TRL reads one format per dataset: "
                        f"{found}; convert them to one format")
    parts = [(source, _concat([d for _, d, _ in files], [n for n, _, _ in files])) for source, files in loaded]
    if len(parts) == 1:
        return parts[0][1]
    return _mix(parts, seed)


def load_files(sources, kind: str, split: str = "train", max_chars: int | None = None) -> list[tuple]:
    """Each file of `sources` loaded and validated on its own, as (name, dataset, format): what load_data mixes.
    Sources without a non-train `split` are left out."""
    _check_kind(kind)
    return [file for source in parse_sources(sources) for file in _load_source(source, split, kind, max_chars) or []]


def _mix(parts: list[tuple[DataSource, datasets.Dataset]], seed: int) -> datasets.Dataset:
    total = sum(source.weight for source, _ in parts)
    shares = [source.weight / total for source, _ in parts]
    # the largest size N for which share_i * N <= len_i for every source: no row is used twice
    size = min(len(dataset) / share for (_, dataset), share in zip(parts, shares))
    pieces, left_out = [], []
    for (source, dataset), share in zip(parts, shares):
        take = min(len(dataset), round(share * size))
        pieces.append(dataset.shuffle(seed=seed).select(range(take)))
        if take < len(dataset):
            left_out.append(f"{take} of {len(dataset)} rows of {source.path}")
    if left_out and len({source.weight for source, _ in parts}) == 1:
        sizes = ",".join(f"{source.path}:{len(dataset)}" for source, dataset in parts)
        warnings.warn(f"equal weights mix equal numbers of rows, so the mixture uses {'; '.join(left_out)}. "
                      f"To use every row, give weights proportional to the sizes, e.g. '{sizes}'", stacklevel=3)
    return _concat(pieces, [source.path for source, _ in parts]).shuffle(seed=seed)


def _concat(parts: list[datasets.Dataset], names: list[str]) -> datasets.Dataset:
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except (ValueError, TypeError, pa.ArrowException):
        # datasets 5.2 concatenates only identical Arrow types: string vs large_string (JSON vs CSV), int vs
        # float margins, or message structs with other keys all fail. Re-infer one schema from the rows.
        pass
    try:
        return datasets.Dataset.from_list([row for part in parts for row in _rows(part)])
    except (ValueError, TypeError, pa.ArrowException) as error:
        found = "; ".join(f"{name}: {part.features}" for name, part in zip(names, parts))
        raise DataError(f"cannot combine {', '.join(names)}: their columns have incompatible types ({found}): "
                        f"{error}") from error
