"""rlhf_kit.data.loading: every format and file type loads, every bad row is named precisely, mixing keeps its weights."""

import json
from collections import Counter

import datasets
import pytest
from conftest import assistant, system, user, write_jsonl

from rlhf_kit.data.loading import (
    FORMATS,
    DataError,
    DataSource,
    RowError,
    detect_format,
    load_data,
    parse_sources,
    validate_row,
)


pytestmark = pytest.mark.usefixtures("offline_private_cache")


def write_csv(path, rows):
    # conversations go into CSV cells as JSON, as load_data expects
    datasets.Dataset.from_list(
        [{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]
    ).to_csv(str(path), index=False)
    return str(path)


# one valid row per format: (kind, row); row i of a file gets its texts suffixed with i so no two rows repeat
GOOD = {
    "text": ("text", {"text": "Once upon a time"}),
    "messages": ("sft", {"messages": [system("Be brief."), user("Hi"), assistant("Hello!"), user("Bye"),
                                      assistant("Bye!")]}),
    "prompt_completion": ("sft", {"prompt": "2 + 2 =", "completion": " 4"}),
    "prompt_completion_conversational": ("sft", {"prompt": [user("2 + 2?")], "completion": [assistant("4")]}),
    "preference": ("preference", {"prompt": "The sky is", "chosen": " blue", "rejected": " green", "margin": 1.5}),
    "preference_conversational": ("preference", {"prompt": [user("Sky?")], "chosen": [assistant("blue")],
                                                 "rejected": [assistant("green")]}),
    "preference_implicit": ("preference", {"chosen": "The sky is blue", "rejected": "The sky is green"}),
    "preference_implicit_conversational": (
        "preference",
        {"chosen": [user("Sky?"), assistant("blue")], "rejected": [user("Sky?"), assistant("green")]},
    ),
    "prompt": ("prompt", {"prompt": "The sky is", "answer": "blue"}),
    "prompt_conversational": ("prompt", {"prompt": [system("Be brief."), user("Sky?")], "answer": "blue"}),
}


def numbered(row, i):
    """A copy of `row` whose texts end with `i`, keeping the shared prompt of implicit pairs identical."""
    def bump(value):
        if isinstance(value, str):
            return f"{value} {i}"
        if isinstance(value, list):
            return value[:-1] + [{**value[-1], "content": f"{value[-1]['content']} {i}"}]
        return value
    return {k: bump(v) if k != "answer" else v for k, v in row.items()}


def good_rows(fmt, n):
    return [numbered(GOOD[fmt][1], i) for i in range(n)]


@pytest.mark.parametrize("fmt", list(GOOD))
def test_each_format_loads_as_written(tmp_path, fmt):
    kind, row = GOOD[fmt]
    rows = good_rows(fmt, 3)
    assert detect_format(list(row), row, kind, "x.jsonl") == fmt
    dataset = load_data(write_jsonl(tmp_path / "data.jsonl", rows), kind=kind)
    assert dataset.to_list() == rows  # every row, every column (extras too), unchanged


def test_sft_accepts_plain_text(tmp_path):
    rows = good_rows("text", 2)
    assert load_data(write_jsonl(tmp_path / "d.jsonl", rows), kind="sft").to_list() == rows


def test_formats_cover_every_kind():
    assert set(FORMATS) == {"text", "sft", "preference", "prompt"}
    assert {fmt for kind, _ in GOOD.values() for fmt in FORMATS[kind]} == set(GOOD)


def test_jsonl_json_csv_parquet_directory_and_glob_load_the_same_rows(tmp_path):
    rows = good_rows("preference_conversational", 4)
    for i, row in enumerate(rows):
        row["margin"] = i + 0.5
    paths = {
        "jsonl": write_jsonl(tmp_path / "a.jsonl", rows),
        "csv": write_csv(tmp_path / "b.csv", rows),
        "dir": write_jsonl(tmp_path / "dir" / "train.jsonl", rows).rsplit("/", 1)[0],
    }
    (tmp_path / "c.json").write_text(json.dumps(rows, indent=2))
    paths["json"] = str(tmp_path / "c.json")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    paths["parquet"] = str(tmp_path / "d.parquet")
    for path in paths.values():
        assert load_data(path, kind="preference").to_list() == rows, path
    write_jsonl(tmp_path / "shards" / "part-0.jsonl", rows[:3])
    write_jsonl(tmp_path / "shards" / "part-1.jsonl", rows[3:])
    (tmp_path / "shards" / "README.md").write_text("not data")
    assert load_data(str(tmp_path / "shards" / "*"), kind="preference").to_list() == rows


def test_csv_keeps_text_as_written_and_rows_numbered_from_one(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion,score\nNA,007,NA\n"multi\nline",None,3\nnull,"a, b",4\n')
    dataset = load_data(str(path), kind="sft")
    assert dataset["prompt"] == ["NA", "multi\nline", "null"]
    assert dataset["completion"] == ["007", "None", "a, b"]
    assert dataset["score"] == [None, 3, 4]  # other columns keep pandas' NA handling
    path.write_text("prompt,completion\na,b\nc,\n")
    with pytest.raises(DataError, match=r"d.csv: row 2: field 'completion': expected a string, got null"):
        load_data(str(path), kind="sft")


def test_parquet_and_json_list_errors_name_the_row(tmp_path):
    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{"prompt": "a", "completion": 5}] * 2).to_parquet(path)
    with pytest.raises(DataError, match=r"d.parquet: row 1: field 'completion': expected a string, got int 5"):
        load_data(path, kind="sft")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": ""}]))
    with pytest.raises(DataError, match=r"d.json: row 3: field 'text': expected a non-empty string"):
        load_data(str(tmp_path / "d.json"), kind="text")


def test_jsonl_row_is_the_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": 7}\n')
    with pytest.raises(DataError, match=r"d.jsonl: row 3: field 'text': expected a string, got int 7"):
        load_data(str(path), kind="text")
    path.write_text('{"text": "a"}\n{"text": "b",}\n')
    with pytest.raises(DataError, match=r"d.jsonl: row 2: invalid JSON"):
        load_data(str(path), kind="text")


def test_split_selection_in_a_directory(tmp_path):
    write_jsonl(tmp_path / "flat" / "train.jsonl", good_rows("text", 3))
    write_jsonl(tmp_path / "flat" / "test.jsonl", good_rows("text", 2))
    write_jsonl(tmp_path / "flat" / "dev.jsonl", good_rows("text", 1))
    flat = str(tmp_path / "flat")
    assert len(load_data(flat, kind="text")) == 3
    assert len(load_data(flat, kind="text", split="test")) == 2
    assert load_data(flat, kind="text", split="validation") is None  # no such split: no eval set
    assert len(load_data({"path": flat, "split": "dev"}, kind="text")) == 1  # the source's own split
    # shards and a subdirectory named after the split
    write_jsonl(tmp_path / "sharded" / "train-00000-of-00002.jsonl", good_rows("text", 2))
    write_jsonl(tmp_path / "sharded" / "train-00001-of-00002.jsonl", good_rows("text", 2))
    write_jsonl(tmp_path / "sharded" / "test" / "a.jsonl", good_rows("text", 1))
    assert len(load_data(str(tmp_path / "sharded"), kind="text")) == 4
    assert len(load_data(str(tmp_path / "sharded"), kind="text", split="test")) == 1
    write_jsonl(tmp_path / "no_train" / "test.jsonl", good_rows("text", 1))
    with pytest.raises(DataError, match=r"no_train: no file for split 'train'.*holds test.jsonl"):
        load_data(str(tmp_path / "no_train"), kind="text")


def make_sources(tmp_path, sizes):
    paths = {}
    for name, size in sizes.items():
        rows = [{"text": f"{name} {i}", "source": name} for i in range(size)]
        paths[name] = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return paths


def test_mixing_follows_the_weights_without_oversampling(tmp_path):
    paths = make_sources(tmp_path, {"a": 100, "b": 20})
    # N = min(100 / 0.7, 20 / 0.3) = 66.7: b gives all its 20 rows, a gives round(0.7 * 66.7) = 47
    mixed = load_data(f"{paths['a']}:0.7,{paths['b']}:0.3", kind="text", seed=1)
    assert Counter(mixed["source"]) == {"a": 47, "b": 20}
    assert len(set(mixed["text"])) == len(mixed)  # no row twice
    assert mixed["source"][:20] != sorted(mixed["source"])[:20]  # shuffled together, not a then b
    again = load_data([{"path": paths["a"], "weight": 7}, {"path": paths["b"], "weight": 3}], kind="text", seed=1)
    assert again["text"] == mixed["text"]  # weights are normalized; same seed, same mixture
    other = load_data(f"{paths['a']}:0.7,{paths['b']}:0.3", kind="text", seed=2)
    assert other["text"] != mixed["text"]
    # N = min(100 / 0.9, 20 / 0.1) = 111.1: a is the limit now
    assert Counter(load_data(f"{paths['a']}:0.9,{paths['b']}:0.1", kind="text")["source"]) == {"a": 100, "b": 11}


def test_equal_weights_warn_when_rows_are_left_out(tmp_path):
    paths = make_sources(tmp_path, {"a": 30, "b": 10})
    with pytest.warns(UserWarning, match=r"10 of 30 rows of .*a.jsonl.*a.jsonl:30,.*b.jsonl:10"):
        mixed = load_data(f"{paths['a']},{paths['b']}", kind="text")
    assert Counter(mixed["source"]) == {"a": 10, "b": 10}
    assert len(load_data(f"{paths['a']}:30,{paths['b']}:10", kind="text")) == 40  # weights = sizes: every row


def test_mixing_json_with_csv_and_int_with_float_columns(tmp_path):
    # CSV strings are Arrow large_string and JSON ones string; margins int in one file and float in the other
    rows = good_rows("preference", 4)
    a = write_jsonl(tmp_path / "a.jsonl", [{**row, "margin": 1} for row in rows[:2]])
    b = write_csv(tmp_path / "b.csv", rows[2:])
    mixed = load_data(f"{a}:1,{b}:1", kind="preference")
    assert sorted(mixed["margin"]) == [1, 1, 1.5, 1.5]


def test_sources_with_different_formats_are_refused(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", good_rows("messages", 2))
    b = write_jsonl(tmp_path / "b.jsonl", good_rows("prompt_completion", 2))
    with pytest.raises(DataError, match=r"share one format.*a.jsonl is 'messages'.*b.jsonl is 'prompt_completion'"):
        load_data([a, b], kind="sft")


def test_stray_prompt_next_to_messages_is_dropped_with_a_warning(tmp_path):
    # ultrachat_200k ships 'prompt' next to 'messages'; TRL would take the rows for prompt-completion data
    rows = [{**row, "prompt": "Hi", "prompt_id": "x"} for row in good_rows("messages", 2)]
    with pytest.warns(UserWarning, match=r"dropping column\(s\) 'prompt'"):
        dataset = load_data(write_jsonl(tmp_path / "d.jsonl", rows), kind="sft")
    assert dataset.column_names == ["messages", "prompt_id"]


# (format of the good rows, bad row 3, field named, what the message says)
BAD_ROWS = [
    ("messages", {"messages": [user("a"), {"role": "human", "content": "b"}]}, "messages[1].role",
     "expected one of 'system', 'user', 'assistant', 'tool' (use 'user'), got str 'human'"),
    ("messages", {"messages": [user("  "), assistant("b")]}, "messages[0].content",
     "expected a non-empty string, got a whitespace-only string"),
    ("messages", {"messages": [user(""), assistant("b")]}, "messages[0].content", "got an empty string"),
    ("messages", {"messages": [user("a"), {"role": "assistant"}]}, "messages[1].content", "missing"),
    ("messages", {"messages": [user("a"), assistant(3)]}, "messages[1].content", "expected a string, got int 3"),
    ("messages", {"other": "x"}, "messages", "missing: this row has no 'messages' key"),
    ("messages", {"messages": None}, "messages", "expected a list of messages"),
    ("messages", {"messages": "Hi"}, "messages", "got str 'Hi'"),
    ("messages", {"messages": []}, "messages", "expected a non-empty list of messages, got an empty list"),
    ("messages", {"messages": ["Hi"]}, "messages[0]", "expected a message {'role': ..., 'content': ...}, got str"),
    ("messages", {"messages": [user("a"), assistant("b"), user("c")]}, "messages",
     "expected the conversation to end with an assistant turn, got 'user' as the last turn"),
    ("messages", {"messages": [user("a"), system("b"), assistant("c")]}, "messages[1].role",
     "a 'system' turn is only allowed as the first message"),
    ("messages", {"messages": [user("a"), user("b"), assistant("c")]}, "messages[1].role",
     "expected 'assistant' (after an optional first system turn, turns alternate"),
    ("messages", {"messages": [assistant("a")]}, "messages[0].role", "expected 'user'"),
    ("messages", {"messages": [user("a"), {**assistant("b"), "tool_calls": [{"name": "f"}]}]},
     "messages[1].tool_calls[0]", "expected a call {'type': 'function', 'function'"),
    ("messages", {"messages": [user("a"), {**user("b"), "tool_calls": [{"name": "f"}]}]}, "messages[1]",
     "unexpected key(s) 'tool_calls'"),
    ("messages", {"messages": [{"from": "human", "value": "a"}]}, "messages[0].role", "ShareGPT"),
    ("prompt_completion", {"prompt": 5, "completion": "x"}, "prompt", "expected a string, got int 5"),
    ("prompt_completion", {"prompt": "x", "completion": ""}, "completion", "got an empty string"),
    ("prompt_completion", {"prompt": "x"}, "completion", "missing"),
    ("prompt_completion", {"prompt": [user("x")], "completion": "y"}, "prompt",
     "expected a string (the source is in 'prompt_completion' format, detected from its first row"),
    ("prompt_completion_conversational", {"prompt": [user("x")], "completion": [user("y")]}, "completion[0].role",
     "expected 'assistant'"),
    ("prompt_completion_conversational", {"prompt": [user("x"), assistant("y")], "completion": [assistant("z")]},
     "prompt", "expected the conversation to end with a user turn, got 'assistant'"),
    ("prompt_completion_conversational", {"prompt": [user("x")], "completion": "y"}, "completion",
     "every row must use the same format"),
    ("text", {"text": ["a"]}, "text", "expected a string"),
    ("text", {"text": None}, "text", "got null"),
    ("preference", {"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected",
     "chosen and rejected are identical"),
    ("preference", {"prompt": "p", "chosen": "same", "rejected": " same\n"}, "rejected", "identical"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "high"}, "margin",
     "expected a finite number, got str 'high'"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("inf")}, "margin",
     "expected a finite number, got float inf"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": None}, "margin", "got null"),
    ("preference", {"prompt": None, "chosen": "a", "rejected": "b", "margin": 1}, "prompt", "got null"),
    ("preference", {"prompt": "p", "chosen": "a", "margin": 1}, "rejected", "missing"),
    ("preference_conversational", {"prompt": [user("p")], "chosen": [user("a")], "rejected": [assistant("b")]},
     "chosen[0].role", "expected 'assistant'"),
    ("preference_conversational", {"prompt": [user("p")], "chosen": [assistant("a")],
                                   "rejected": [assistant("a")]}, "rejected", "identical"),
    ("preference_conversational", {"prompt": [user("p")], "chosen": [assistant("a")], "rejected": []}, "rejected",
     "got an empty list"),
    ("preference_implicit", {"chosen": "a", "rejected": 2}, "rejected", "expected a string, got int 2"),
    ("preference_implicit_conversational", {"chosen": [user("p"), assistant("a")],
                                            "rejected": [user("q"), assistant("b")]},
     "rejected", "chosen and rejected must share the same prompt turns"),
    ("preference_implicit_conversational", {"chosen": [user("p"), assistant("a")], "rejected": [user("p")]},
     "rejected", "end with an assistant turn"),
    ("preference_implicit_conversational", {"chosen": [user("p"), assistant("a")],
                                            "rejected": [assistant("p"), assistant("b")]},
     "rejected[0].role", "expected 'user'"),
    ("prompt", {"prompt": "   ", "answer": "x"}, "prompt", "whitespace-only"),
    ("prompt_conversational", {"prompt": [user("x"), assistant("y")], "answer": "x"}, "prompt",
     "end with a user turn"),
    ("prompt_conversational", {"prompt": [{"role": 1, "content": "x"}], "answer": "x"}, "prompt[0].role",
     "got int 1"),
    ("prompt_conversational", {"prompt": [system("x")], "answer": "x"}, "prompt", "got 'system' as the last turn"),
]


@pytest.mark.parametrize("fmt, bad, field, expected", BAD_ROWS, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in
                                                                         enumerate(BAD_ROWS)])
def test_bad_row_names_file_row_field_and_expectation(tmp_path, fmt, bad, field, expected):
    kind = GOOD[fmt][0]
    path = write_jsonl(tmp_path / "bad.jsonl", good_rows(fmt, 2) + [bad] + good_rows(fmt, 2))
    with pytest.raises(DataError) as info:
        load_data(path, kind=kind)
    message = str(info.value)
    assert message.startswith(f"{path}: row 3: field '{field}': "), message
    assert expected in message, message


def test_validate_row_raises_row_error_without_location():
    validate_row(GOOD["messages"][1], "messages")
    with pytest.raises(RowError) as info:
        validate_row({"text": 5}, "text")
    assert (info.value.field, str(info.value)) == ("text", "field 'text': expected a string, got int 5")


def test_empty_file_and_missing_column_are_source_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: empty file.*Columns found: none.*kind 'sft': messages"):
        load_data(str(tmp_path / "empty.jsonl"), kind="sft")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv: empty file.*Columns found: none"):
        load_data(str(tmp_path / "empty.csv"), kind="sft")
    (tmp_path / "header.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match=r"header.csv: no rows.*Columns found: 'prompt', 'completion'"):
        load_data(str(tmp_path / "header.csv"), kind="sft")
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load_data(path, kind="sft")
    assert "qa.jsonl: no format accepted for kind 'sft'" in str(info.value)
    assert "Columns found: 'question', 'answer'" in str(info.value)
    assert "prompt_completion / prompt_completion_conversational (columns prompt, completion)" in str(info.value)
    path = write_jsonl(tmp_path / "typo.jsonl", [{"Prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"did you mean 'prompt' instead of 'Prompt'"):
        load_data(path, kind="sft")
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q"}])
    with pytest.raises(DataError, match=r"prompt-only data \(kind 'prompt'"):
        load_data(path, kind="sft")


def test_missing_paths_unknown_files_and_offline_hub_names_are_source_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file or directory not found.*Accepted sources"):
        load_data(str(tmp_path / "nope.jsonl"), kind="text")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.txt: unknown file type; accepted extensions: .jsonl"):
        load_data(str(tmp_path / "notes.txt"), kind="text")
    with pytest.raises(DataError, match=r"the pattern matches no"):
        load_data(str(tmp_path / "*.parquet"), kind="text")
    with pytest.raises(DataError, match=r"no-such-org/no-such-set\[train\]: 'no-such-org/no-such-set' is not a local"):
        load_data("no-such-org/no-such-set", kind="text")
    with pytest.raises(DataError, match=r"unknown data kind 'dpo'"):
        load_data(str(tmp_path / "notes.txt"), kind="dpo")


def test_nothing_is_silently_dropped(tmp_path):
    texts = ["None", "NA", "null", "", "  padded  ", "line\nbreak", "tab\tquote\"", "ünïcødé ✓", "0", "[1, 2]"]
    rows = [{"prompt": f"q{i}", "completion": text or "x", "id": i} for i, text in enumerate(texts * 5)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows[:25]) + "\n\n\n" +
                    "\n".join(json.dumps(row) for row in rows[25:]) + "\n")
    assert load_data(str(path), kind="sft").to_list() == rows
    assert load_data(write_csv(tmp_path / "d.csv", rows), kind="sft").to_list() == rows


def test_parse_sources_forms():
    assert parse_sources("a.jsonl") == [DataSource("a.jsonl")]
    assert parse_sources("a.jsonl:0.7, b.jsonl:0.3") == [DataSource("a.jsonl", weight=0.7),
                                                         DataSource("b.jsonl", weight=0.3)]
    assert parse_sources("org/set,c.csv") == [DataSource("org/set"), DataSource("c.csv")]
    assert parse_sources({"path": "org/set", "split": "train_sft", "name": "cfg"}) == [
        DataSource("org/set", split="train_sft", name="cfg")]
    assert parse_sources([{"path": "a.jsonl", "weight": 2}, "b.jsonl:1", DataSource("c")]) == [
        DataSource("a.jsonl", weight=2), DataSource("b.jsonl", weight=1.0), DataSource("c")]
    with pytest.raises(DataError, match=r"unknown data source key 'wieght'.*Did you mean 'weight'"):
        parse_sources([{"path": "a.jsonl", "wieght": 2}])
    with pytest.raises(DataError, match=r"weight must be a finite number > 0"):
        parse_sources("a.jsonl:-1")
    with pytest.raises(DataError, match=r"no data source"):
        parse_sources([])
    with pytest.raises(DataError, match=r"no 'path'"):
        parse_sources({"split": "train"})


def test_empty_parquet_is_a_source_error(tmp_path):
    path = str(tmp_path / "d.parquet")
    features = datasets.Features({"text": datasets.Value("string")})
    datasets.Dataset.from_dict({"text": []}, features=features).to_parquet(path)
    with pytest.raises(DataError, match=r"d.parquet: empty file: no rows. Columns found: 'text'"):
        load_data(path, kind="text")
    (tmp_path / "zero.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"zero.parquet: empty file"):
        load_data(str(tmp_path / "zero.parquet"), kind="text")


def test_data_arguments_and_detect_dataset_format(tmp_path):
    from rlhf_kit.data.loading import DataArguments, detect_dataset_format

    args = DataArguments(dataset_name="a.jsonl:0.5,b.jsonl:0.5")
    assert args.eval_source == "a.jsonl:0.5,b.jsonl:0.5"
    assert DataArguments(dataset_name="a.jsonl", eval_dataset_name="b.jsonl").eval_source == "b.jsonl"
    with pytest.raises(DataError, match="dataset_name is required"):
        DataArguments()
    with pytest.raises(DataError, match="weight must be a finite number > 0"):
        DataArguments(dataset_name="a.jsonl:0")
    dataset = load_data(write_jsonl(tmp_path / "d.jsonl", good_rows("prompt_completion_conversational", 2)), "sft")
    assert detect_dataset_format(dataset, "sft") == "prompt_completion_conversational"
