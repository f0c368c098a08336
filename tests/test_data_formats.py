"""rlhf_kit.data.loading: common formats (Alpaca, ShareGPT, Anthropic HH, UltraFeedback, OpenAI) convert at load time
with a source's `format:` / `columns:`, or fail naming the setting; converted rows are validated like any other."""

import contextlib
import io
import json

import datasets
import pytest
from conftest import REPO, assistant, load_recipe, read_jsonl, system, user, write_jsonl

from rlhf_kit.data.loading import DataError, check_sources, load_data, parse_sources


pytestmark = pytest.mark.usefixtures("offline_private_cache")


HH_CHOSEN = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Review the tea.\n\nAssistant: The tea is great."
HH_REJECTED = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Review the tea.\n\nAssistant: The tea is awful."
HH_PAIR = {"prompt": [user("Hi"), assistant("Hello!"), user("Review the tea.")],
           "chosen": [assistant("The tea is great.")], "rejected": [assistant("The tea is awful.")]}

# (case, kind, the source's settings, rows as written, rows as loaded, what loading without the settings does:
#  "auto" = the same rows, else a text the error must contain)
CASES = [
    ("alpaca", "sft", {"format": "alpaca"},
     [{"instruction": "Review the tea.", "input": "", "output": "The tea is great."},
      {"instruction": "Summarize.", "input": "The tea is hot.", "output": "Hot tea.", "system": "Be brief.", "id": 7}],
     [{"messages": [user("Review the tea."), assistant("The tea is great.")], "id": None},  # as JSON reads it
      {"messages": [system("Be brief."), user("Summarize.\n\nThe tea is hot."), assistant("Hot tea.")], "id": 7}],
     "looks like Alpaca data (instruction / input / output); add `format: alpaca` to this data source"),
    ("alpaca-history", "sft", {"format": "alpaca"},
     [{"instruction": "And the coffee?", "output": "Bitter.", "history": [["Review the tea.", "Great."]]}],
     [{"messages": [user("Review the tea."), assistant("Great."), user("And the coffee?"), assistant("Bitter.")]}],
     "add `format: alpaca`"),
    ("alpaca-prompt", "prompt", {"format": "alpaca"},
     [{"instruction": "Review the tea.", "input": "", "output": "The tea is great."}],
     [{"prompt": [user("Review the tea.")], "output": "The tea is great."}],  # the reference answer stays a column
     "add `format: alpaca`"),
    ("alpaca-preference", "preference", {"format": "alpaca"},
     [{"instruction": "Review", "input": "the tea", "chosen": "Great.", "rejected": "Awful."}],
     [{"prompt": [user("Review\n\nthe tea")], "chosen": [assistant("Great.")], "rejected": [assistant("Awful.")]}],
     "add `format: alpaca`"),
    ("alpaca-renamed", "sft", {"format": "alpaca", "columns": {"instruction": "question", "output": "answer"}},
     [{"question": "Review the tea.", "answer": "The tea is great."}],
     [{"messages": [user("Review the tea."), assistant("The tea is great.")]}],
     "no format accepted for kind 'sft'"),
    ("sharegpt", "sft", {"format": "sharegpt"},
     [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Review the tea."},
                         {"from": "gpt", "value": "Great."}], "id": "a"},
      {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], "id": "b",
       "system": "Be kind."}],
     [{"messages": [system("Be brief."), user("Review the tea."), assistant("Great.")], "id": "a"},
      {"messages": [system("Be kind."), user("Hi"), assistant("Hello!")], "id": "b"}],
     "auto"),
    ("sharegpt-messages-column", "sft", {"format": "sharegpt"},
     [{"messages": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}]}],
     [{"messages": [user("Hi"), assistant("Hello!")]}],
     "auto"),
    ("sharegpt-prompt", "prompt", {"format": "sharegpt"},
     [{"conversations": [{"from": "human", "value": "Review the tea."}], "item": "tea"}],
     [{"prompt": [user("Review the tea.")], "item": "tea"}],
     "auto"),
    ("sharegpt-preference", "preference", {"format": "sharegpt"},  # LLaMA-Factory's layout
     [{"conversations": [{"from": "human", "value": "Review the tea."}], "chosen": {"from": "gpt", "value": "Great."},
       "rejected": {"from": "gpt", "value": "Awful."}}],
     [{"prompt": [user("Review the tea.")], "chosen": [assistant("Great.")], "rejected": [assistant("Awful.")]}],
     "auto"),
    ("hh", "preference", {"format": "hh"},
     [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}],
     [HH_PAIR],
     "looks like Anthropic HH raw text"),
    ("hh-prompt-column", "preference", {"format": "hh"},  # HH-derived sets: the prompt ends with the Assistant: cue
     [{"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Review the tea.\n\nAssistant:",
       "chosen": " The tea is great.", "rejected": " The tea is awful."}],
     [HH_PAIR],
     "add `format: hh`"),
    ("hh-prompt", "prompt", {"format": "hh"},
     [{"prompt": "\n\nHuman: Review the tea.\n\nAssistant:"}],
     [{"prompt": [user("Review the tea.")]}],
     "add `format: hh`"),
    ("ultrafeedback", "preference", {"format": "ultrafeedback"},
     [{"prompt": "Review the tea.", "prompt_id": "x1",
       "chosen": [user("Review the tea."), assistant("Great.")],
       "rejected": [user("Review the tea."), assistant("Awful.")],
       "messages": [user("Review the tea."), assistant("Great.")], "score_chosen": 9.0, "score_rejected": 2.0}],
     [{"prompt": [user("Review the tea.")], "chosen": [assistant("Great.")], "rejected": [assistant("Awful.")],
       "prompt_id": "x1", "score_chosen": 9.0, "score_rejected": 2.0}],
     "auto"),
    ("ultrafeedback-responses-only", "preference", {"format": "ultrafeedback"},
     [{"prompt": "Review the tea.", "chosen": [assistant("Great.")], "rejected": [assistant("Awful.")]}],
     [{"prompt": [user("Review the tea.")], "chosen": [assistant("Great.")], "rejected": [assistant("Awful.")]}],
     "auto"),
    ("openai", "sft", {"format": "openai"},
     [{"messages": [system("Be brief."), user("Hi"), {**assistant("Hello!"), "weight": 1}, user("Review the tea."),
                    assistant("Great.")]}],
     [{"messages": [system("Be brief."), user("Hi"), assistant("Hello!"), user("Review the tea."),
                    assistant("Great.")]}],
     "'weight' is read by `format: openai`"),
    ("openai-system", "sft", {},  # OpenAI's chat format with a system turn is the kit's own
     [{"messages": [system("Be brief."), user("Hi"), assistant("Hello!")]}],
     [{"messages": [system("Be brief."), user("Hi"), assistant("Hello!")]}],
     "auto"),
    ("openai-preference", "preference", {"format": "openai"},
     [{"input": {"messages": [system("Be brief."), user("Review the tea.")], "tools": [], "parallel_tool_calls": True},
       "preferred_output": [assistant("Great.")], "non_preferred_output": [assistant("Awful.")]}],
     [{"prompt": [system("Be brief."), user("Review the tea.")], "chosen": [assistant("Great.")],
       "rejected": [assistant("Awful.")]}],
     "auto"),
    ("columns", "sft", {"columns": {"prompt": "question", "completion": "answer"}},
     [{"question": "2 + 2 =", "answer": " 4", "id": 1}],
     [{"prompt": "2 + 2 =", "completion": " 4", "id": 1}],
     "map them with `columns: {<column below>: <yours>}` in the data source"),
]


@pytest.mark.parametrize("case, kind, settings, written, loaded, unset", CASES, ids=[c[0] for c in CASES])
def test_each_format_loads_with_its_setting(tmp_path, case, kind, settings, written, loaded, unset):
    path = write_jsonl(tmp_path / f"{case}.jsonl", written)
    assert load_data({"path": path, **settings}, kind=kind).to_list() == loaded
    check_sources([{"path": path, **settings}], kind)  # the pipeline's check before any stage runs agrees
    if unset == "auto":
        assert load_data(path, kind=kind).to_list() == loaded
        return
    for read in (lambda: load_data(path, kind=kind), lambda: check_sources(path, kind)):
        with pytest.raises(DataError) as info:
            read()
        assert str(info.value).startswith(path) and unset in str(info.value), str(info.value)


def test_setting_in_the_error_is_the_exact_yaml(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", CASES[0][3])
    with pytest.raises(DataError, match=rf"e.g. in YAML `dataset_name: \[{{path: {path}, format: alpaca}}\]`"):
        load_data(path, kind="sft")


def test_hh_text_is_no_longer_plain_preference_text(tmp_path):
    # Before: chosen/rejected strings with HH markup loaded as plain implicit-prompt pairs, a reward model trained on
    # them without a chat template, and PPO refused it later with an unrelated message.
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    with pytest.raises(DataError, match=r"hh.jsonl: looks like Anthropic HH raw text.*add `format: hh`"):
        load_data(path, kind="preference")
    # a converted HH source mixes with the shipped conversational pairs: both are prompt / chosen / rejected
    shipped = write_jsonl(tmp_path / "shipped.jsonl", read_jsonl(REPO / "data/preference/train.jsonl", limit=3))
    mixed = load_data([{"path": path, "format": "hh", "weight": 1}, f"{shipped}:3"], kind="preference")
    assert sorted(map(json.dumps, mixed.to_list())) == sorted(map(json.dumps, [HH_PAIR] + read_jsonl(shipped)))


def test_sharegpt_in_csv_and_parquet_and_mixed_with_messages(tmp_path):
    rows, loaded = CASES[5][3][:1], CASES[5][4][:1]
    csv = tmp_path / "s.csv"
    datasets.Dataset.from_list([{"conversations": json.dumps(r["conversations"]), "id": r["id"]} for r in rows]).to_csv(
        str(csv), index=False)
    assert load_data({"path": str(csv), "format": "sharegpt"}, kind="sft").to_list() == loaded
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "s.parquet"))
    assert load_data(str(tmp_path / "s.parquet"), kind="sft").to_list() == loaded
    shipped = read_jsonl(REPO / "data/sft/train.jsonl", limit=3)
    write_jsonl(tmp_path / "m.jsonl", shipped)
    mixed = load_data([f"{tmp_path / 'm.jsonl'}:3", {"path": str(tmp_path / "s.parquet"), "weight": 1}], kind="sft")
    assert sorted(map(json.dumps, mixed["messages"])) == sorted(map(json.dumps, [r["messages"] for r in shipped] +
                                                                    [loaded[0]["messages"]]))


SHAREGPT_ROW = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
def test_openai_weights_read_from_parquet(tmp_path):
    # Arrow gives every message a 'weight' key once one message has it: None elsewhere, not a weight of its own
    case = next(c for c in CASES if c[0] == "openai")
    datasets.Dataset.from_list(case[3]).to_parquet(str(tmp_path / "o.parquet"))
    assert load_data({"path": str(tmp_path / "o.parquet"), "format": "openai"}, kind="sft").to_list() == case[4]


# (kind, settings, rows as written where row 2 is bad, the error after "<file>: row 2: ")
BAD = [
    ("sft", {"format": "alpaca"}, [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}],
     "field 'output': expected a non-empty string, got an empty string"),
    ("sft", {"format": "alpaca", "columns": {"instruction": "q", "output": "a"}},
     [{"q": "a", "a": "b"}, {"q": "c", "a": 3}],
     "field 'a': expected a string, got int 3"),  # the file's own column
    ("sft", {"format": "sharegpt"}, [SHAREGPT_ROW, {"conversations": [{"from": "human", "value": "a"},
                                                                   {"from": "observation", "value": "b"}]}],
     "field 'conversations[1].from': expected one of 'human', 'user', 'gpt', 'assistant', 'system' (tool turns are not "
     "supported), got str 'observation'"),
    ("sft", {"format": "sharegpt"}, [SHAREGPT_ROW, {"conversations": [{"from": "human", "value": "a"},
                                                                   {"from": "human", "value": "b"},
                                                                   {"from": "gpt", "value": "c"}]}],
     "field 'messages[1].role': expected 'assistant'"),  # checked after conversion, as every source is
    ("preference", {"format": "hh"}, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                                      {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("Hi", "Hey")}],
     "field 'rejected': chosen and rejected must share the same prompt turns"),
    ("preference", {"format": "hh"}, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
                                      {"chosen": "Hello there", "rejected": HH_REJECTED}],
     "field 'chosen': expected text that starts with 'Human:'"),
    ("preference", {"format": "ultrafeedback"},
     [{"prompt": "a", "chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]},
      {"prompt": "other", "chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]}],
     "field 'prompt': expected the text of the conversations' last user turn, str 'a'"),
    ("sft", {"format": "openai"}, [{"messages": [user("a"), assistant("b")]},
                                  {"messages": [user("a"), {**assistant("b"), "weight": 0}, user("c"),
                                                assistant("d")]}],
     "field 'messages[1].weight': expected 1 (trained)"),
    ("sft", {"format": "openai"}, [{"messages": [user("a"), assistant("b")]},
                                  {"messages": [user("a"), assistant("b")], "tools": [{"type": "function"}]}],
     "field 'tools[0]': expected a function schema"),
]


@pytest.mark.parametrize("kind, settings, rows, expected", BAD, ids=[f"{b[1].get('format')}-{i}" for i, b in
                                                                    enumerate(BAD)])
def test_bad_row_after_conversion_names_file_and_row(tmp_path, kind, settings, rows, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_data({"path": path, **settings}, kind=kind)
    assert str(info.value).startswith(f"{path}: row 2: {expected}"), str(info.value)


def test_settings_are_checked(tmp_path):
    with pytest.raises(DataError, match=r"unknown format 'shargpt'.*Did you mean 'sharegpt'"):
        parse_sources([{"path": "a.jsonl", "format": "shargpt"}])
    with pytest.raises(DataError, match=r"columns must map the column the kit reads to the file's column"):
        parse_sources([{"path": "a.jsonl", "columns": ["prompt"]}])
    path = write_jsonl(tmp_path / "a.jsonl", CASES[0][3])
    with pytest.raises(DataError, match=r"a.jsonl: format 'alpaca' converts to sft / prompt / preference data, not "
                                        r"'text' data"):
        load_data({"path": path, "format": "alpaca"}, kind="text")
    with pytest.raises(DataError, match=r"format 'sharegpt' reads the column\(s\) conversations or messages for kind "
                                        r"'sft', and this source has no conversations or messages \(columns found: "
                                        r"'instruction', 'input', 'output', 'system', 'id'\); name the file's "
                                        r"column with `columns: {conversations: <its name>}`"):
        load_data({"path": path, "format": "sharegpt"}, kind="sft")
    with pytest.raises(DataError, match=r"columns: maps 'question' to 'prompt', but the source has no column "
                                        r"'question'"):
        load_data({"path": path, "columns": {"prompt": "question"}}, kind="sft")
    with pytest.raises(DataError, match=r"maps 'input' to 'instruction', but the source has a 'instruction' "
                                        r"column too"):
        load_data({"path": path, "columns": {"instruction": "input"}}, kind="sft")


def test_shipped_data_loads_as_written():
    # the kit's own formats are never converted: every shipped file loads row for row as it is written
    for directory, kind in (("sft", "sft"), ("preference", "preference"), ("prompts", "prompt")):
        assert load_data(f"data/{directory}", kind=kind, split="test").to_list() == read_jsonl(
            REPO / f"data/{directory}/test.jsonl")
    for name, kind in (("preference_standard", "preference"), ("preference_implicit", "preference"),
                       ("prompts_standard", "prompt"), ("sft_prompt_completion", "sft")):
        assert load_data(f"data/examples/{name}.jsonl", kind=kind).to_list() == read_jsonl(
            REPO / f"data/examples/{name}.jsonl")


def test_sft_recipe_trains_on_sharegpt_data(tiny_base, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": row["messages"][-2]["content"]},
                               {"from": "gpt", "value": row["messages"][-1]["content"]}]}
            for row in read_jsonl(REPO / "data/sft/train.jsonl", limit=16)]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml"], overrides={
            "model_name_or_path": tiny_base, "output_dir": str(tmp_path / "out"),
            "dataset_name": [{"path": path, "format": "sharegpt"}], "max_steps": 2, "per_device_train_batch_size": 8,
            "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "max_length": 64, "disable_tqdm": True,
            "report_to": "none"})
    assert trainer.state.global_step == 2
    row = trainer.train_dataset[0]
    trained = trainer.processing_class.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained.endswith("<|im_end|>") and "user" not in trained  # the gpt turns became assistant turns


def test_readme_examples_load_as_shown(tmp_path):
    # data/README.md shows each format as one row written and the row it loads as; keep them true
    section = (REPO / "data/README.md").read_text().split("## Your own data", 1)[1]
    blocks = [block.split("\n```", 1)[0].strip().splitlines() for block in section.split("```json\n")[1:]]
    settings = [("sft", {"format": "alpaca"}), ("sft", {"format": "sharegpt"}), ("preference", {"format": "hh"}),
                ("preference", {"format": "ultrafeedback"}), ("preference", {"format": "openai"}),
                ("sft", {"columns": {"prompt": "question", "completion": "answer"}})]
    assert len(blocks) == len(settings)
    for i, ((written, loaded), (kind, setting)) in enumerate(zip(blocks, settings)):
        path = write_jsonl(tmp_path / f"{i}.jsonl", [json.loads(written)])
        assert load_data({"path": path, **setting}, kind=kind).to_list() == [json.loads(loaded)], written
