"""Tool-calling data (TRL's format: a `tools` column, assistant turns with `tool_calls`, `tool` turns) through every
stage: validated row by row with the field named, rendered by the kit's ChatML and by real families' templates, and
trained on with the loss on exactly the assistant's turns (its tool calls included, the tool results not)."""

import copy
import json

import pytest
from transformers import AutoTokenizer

from conftest import REPO, load_recipe
from datasets import Dataset

from rlhf_kit.data.chat_template import (MARKERS, RENDERED, TemplateError, assistant_mask_source,
                                         check_tool_support, tokenize_conversation, tokenize_for_assistant_loss,
                                         uses_tools)
from rlhf_kit.data.lengths import count_over_length
from rlhf_kit.data.loading import DataError, check_sources, load_data
from rlhf_kit.model import CHATML_TEMPLATE, prepare_tokenizer
from test_chat_template import family_model, family_tokenizer

EXAMPLE = REPO / "data" / "examples" / "sft_tool_calls.jsonl"

ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
# One parameter of each JSON type, for the type checks.
TYPED = {"type": "function", "function": {
    "name": "typed", "description": "Takes one of each.",
    "parameters": {"type": "object", "properties": {
        "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"},
        "a": {"type": "array", "items": {"type": "string"}}, "o": {"type": "object"}}}}}


def call(name="add", arguments=None, id=None):
    made = {"type": "function", "function": {"name": name, "arguments": {"a": 1, "b": 2} if arguments is None
                                             else arguments}}
    return made if id is None else {**made, "id": id}


def tool_row(calls=None, results=None, tools=(ADD,)):
    """user asks, assistant calls, one tool result per call, assistant answers."""
    calls = [call()] if calls is None else calls
    results = [{"role": "tool", "content": "3"} for _ in calls] if results is None else results
    return {"tools": list(tools), "messages": [
        {"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "tool_calls": calls}, *results,
        {"role": "assistant", "content": "The sum is 3."}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ------------------------------------------------------------------------------------------------ validation


def test_the_shipped_example_loads_with_its_tools_column():
    dataset = load_data(str(EXAMPLE), kind="sft")
    assert dataset.column_names == ["tools", "messages"] and len(dataset) == 4
    check_sources(str(EXAMPLE), kind="sft")


def test_tools_as_a_json_string_ids_names_and_string_arguments_are_accepted(tmp_path):
    rows = [tool_row(tools=[]) | {"tools": json.dumps([ADD])},
            tool_row(calls=[call(id="c1"), call(arguments='{"a": 4, "b": 5}', id="c2")],
                     results=[{"role": "tool", "tool_call_id": "c2", "name": "add", "content": "9"},
                              {"role": "tool", "tool_call_id": "c1", "content": "3"}]),
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello",
                                                              "tool_calls": []}]}]
    assert len(load_data(write_jsonl(tmp_path / "t.jsonl", rows), kind="sft")) == 3


def test_a_row_without_tools_leaves_its_calls_unchecked_against_schemas(tmp_path):
    row = tool_row(calls=[call("anything", {"x": [1]})])
    del row["tools"]
    assert len(load_data(write_jsonl(tmp_path / "t.jsonl", [row]), kind="sft")) == 1


def test_prompt_data_keeps_its_tools_column(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "tools": [ADD], "answer": "3"},
            {"prompt": "What is 2 + 2?", "tools": json.dumps([ADD]), "answer": "4"}]
    dataset = load_data(write_jsonl(tmp_path / "p.jsonl", rows[:1]), kind="prompt")
    assert dataset.column_names == ["prompt", "tools", "answer"]
    assert dataset[0]["tools"][0]["function"]["name"] == "add"
    assert load_data(write_jsonl(tmp_path / "q.jsonl", rows[1:]), kind="prompt")[0]["answer"] == "4"


def test_prompt_completion_rows_may_end_the_prompt_with_results_or_the_completion_with_a_call(tmp_path):
    messages = tool_row()["messages"]
    rows = [{"prompt": messages[:3], "completion": messages[3:], "tools": [ADD]},
            {"prompt": messages[:1], "completion": messages[1:2], "tools": [ADD]}]
    assert len(load_data(write_jsonl(tmp_path / "pc.jsonl", rows), kind="sft")) == 2
    bad = [rows[0], {"prompt": messages[:1], "completion": [messages[1], messages[3]], "tools": [ADD]}]
    with pytest.raises(DataError, match=r"row 2: field 'completion\[0\].tool_calls': a call can only end 'comp"):
        load_data(write_jsonl(tmp_path / "bad.jsonl", bad), kind="sft")
    bad = [rows[0], {"prompt": messages[:1], "completion": messages[1:], "tools": [ADD]}]
    with pytest.raises(DataError, match=r"row 2: field 'completion\[0\].tool_calls': a call can only end"):
        load_data(write_jsonl(tmp_path / "bad.jsonl", bad), kind="sft")
    bad = [rows[0], {"prompt": messages[:3], "completion": [messages[3], messages[2]], "tools": [ADD]}]
    with pytest.raises(DataError, match=r"row 2: field 'completion\[1\].role': expected 'assistant'"):
        load_data(write_jsonl(tmp_path / "bad.jsonl", bad), kind="sft")
    bad = [rows[0], {"prompt": messages[:1], "completion": [messages[1] | {"tool_calls": [call("sub")]}],
                     "tools": [ADD]}]
    with pytest.raises(DataError, match=r"row 2: field 'completion\[0\].tool_calls\[0\].function.name': calls"):
        load_data(write_jsonl(tmp_path / "bad.jsonl", bad), kind="sft")


def test_a_template_that_refuses_a_tool_row_names_the_row(tiny_base):
    tokenizer = family_tokenizer(tiny_base, "llama3.1")  # one call per assistant turn only
    rows = [tool_row(), tool_row(calls=[call(), call()])]
    with pytest.raises(TemplateError, match=r"rows, row 2: the chat template refuses this conversation: .*single"):
        tokenize_for_assistant_loss(Dataset.from_list(rows), tokenizer, "rows")


def test_templates_that_take_tools_pass_the_check_and_others_fail_before_the_model_loads(
        tiny_base, chatml_tokenizer, tmp_path):
    rows = Dataset.from_list([tool_row()])
    assert uses_tools(rows) and not uses_tools(Dataset.from_list([{"messages": tool_row()["messages"][:1]}]))
    for tokenizer in [chatml_tokenizer] + [family_tokenizer(tiny_base, f) for f in ("llama3.1", "qwen2.5")]:
        check_tool_support(tokenizer, rows, "rows")
    # a plain ChatML renders a tool turn but drops the calls and never lists the tools
    model_dir = family_model(tiny_base, "chatml", tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()  # loading it would fail: the check must come first
    with pytest.raises(TemplateError, match=r"sft_tool_calls.jsonl holds tool calls, and this tokenizer's chat "
                                            r"template does not render the tools"):
        load_recipe("sft")([], overrides={
            "model_name_or_path": model_dir, "dataset_name": str(EXAMPLE), "output_dir": str(tmp_path / "out"),
            "use_peft": False, "max_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none"})


def test_the_readme_tool_row_loads(tmp_path):
    section = (REPO / "data/README.md").read_text().split("### Tool calling", 1)[1]
    row = json.loads(section.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert load_data(write_jsonl(tmp_path / "readme.jsonl", [row]), kind="sft").to_list() == [row]


def with_messages(row, edit):
    row = copy.deepcopy(row)
    edit(row["messages"])
    return row


# (bad row, field named, what the message says): the good row first in the file, the bad one in row 2
BAD_ROWS = {
    "undeclared tool": (tool_row(calls=[call("subtract")]), "messages[1].tool_calls[0].function.name",
                        "calls 'subtract', which the row's 'tools' do not declare (declared: 'add')"),
    "arguments not JSON": (tool_row(calls=[call(arguments='{"a": 1,')]), "messages[1].tool_calls[0].function.arguments",
                           "expected a JSON object of arguments, got invalid JSON"),
    "arguments not an object": (tool_row(calls=[call(arguments=[1, 2])]),
                                "messages[1].tool_calls[0].function.arguments", "expected an object of arguments"),
    "arguments a JSON list": (tool_row(calls=[call(arguments="[1, 2]")]),
                              "messages[1].tool_calls[0].function.arguments", "expected an object of arguments"),
    "required argument missing": (tool_row(calls=[call(arguments={"a": 1})]),
                                  "messages[1].tool_calls[0].function.arguments",
                                  "'add' requires the argument 'b', which the call does not give"),
    "unknown argument": (tool_row(calls=[call(arguments={"a": 1, "b": 2, "c": 3})]),
                         "messages[1].tool_calls[0].function.arguments.c",
                         "'add' takes no argument 'c' (its parameters: 'a', 'b')"),
    "call without a name": (tool_row(calls=[{"type": "function", "function": {"arguments": {}}}]),
                            "messages[1].tool_calls[0].function.name", "expected the called tool's name"),
    "call without function": (tool_row(calls=[{"name": "add", "arguments": {"a": 1, "b": 2}}]),
                              "messages[1].tool_calls[0]", "expected a call {'type': 'function', 'function'"),
    "tool message without a call": (
        with_messages(tool_row(), lambda m: m.insert(1, {"role": "tool", "content": "3"})), "messages[1].role",
        "a 'tool' message with no call to answer"),
    "more results than calls": (tool_row(results=[{"role": "tool", "content": "3"}] * 2), "messages[3].role",
                                "a 'tool' message with no call to answer: messages[1] makes 1 call(s)"),
    "fewer results than calls": (tool_row(calls=[call(), call()], results=[{"role": "tool", "content": "3"}]),
                                 "messages[3]", "expected a 'tool' message with the result of call 1 of "
                                 "messages[1].tool_calls (one per call: 2), got 'assistant'"),
    "result for another id": (tool_row(calls=[call(id="c1")], results=[{"role": "tool", "tool_call_id": "c9",
                                                                          "content": "3"}]),
                              "messages[2].tool_call_id", "expected the id of one of the calls of messages[1] ('c1')"),
    "result for a tool not called": (tool_row(results=[{"role": "tool", "name": "sub", "content": "3"}]),
                                     "messages[2].name", "expected the name of a tool called in messages[1] ('add')"),
    "tool result not a string": (tool_row(results=[{"role": "tool", "content": 3}]), "messages[2].content",
                                 "expected the tool's result as a string, got int 3"),
    "ends with a call": (tool_row() | {"messages": tool_row()["messages"][:2]}, "messages",
                         "end with an assistant turn without tool_calls"),
    "tool_calls on a user turn": (with_messages(tool_row(), lambda m: m[0].update(tool_calls=[call()])),
                                  "messages[0]", "unexpected key(s) 'tool_calls'"),
    "tools entry not a function schema": (tool_row(tools=[{"name": "add"}]), "tools[0]",
                                          "expected a function schema"),
    "tools entry without a name": (tool_row(tools=[{"type": "function", "function": {
        "parameters": {"type": "object", "properties": {}}}}]), "tools[0].function.name", "expected the tool's name"),
    "tools entry without parameters": (tool_row(tools=[{"type": "function", "function": {"name": "add"}}]),
                                       "tools[0].function.parameters", "expected a JSON schema of the arguments"),
    "tools declared twice": (tool_row(tools=[ADD, ADD]), "tools[1].function.name", "'add' is declared twice"),
    "tools not a list": (tool_row() | {"tools": {"add": ADD}}, "tools", "expected a list of tool schemas"),
    "tools invalid JSON": (tool_row() | {"tools": "[{"}, "tools", "got invalid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_tool_row_names_file_row_and_field(tmp_path, case):
    bad, field, expected = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [tool_row(), bad])
    for check in (lambda: load_data(path, kind="sft"), lambda: check_sources(path, kind="sft")):
        with pytest.raises(DataError) as info:
            check()
        message = str(info.value)
        assert message.startswith(f"{path}: row 2: field '{field}': "), message
        assert expected in message, message


@pytest.mark.parametrize("name, value, declared", [
    ("s", 1, "string"), ("i", "1", "integer"), ("i", 1.5, "integer"), ("i", True, "integer"), ("n", "1.5", "number"),
    ("b", 1, "boolean"), ("a", "x", "array"), ("o", [1], "object")])
def test_an_argument_of_the_wrong_json_type_is_refused(tmp_path, name, value, declared):
    good = tool_row(calls=[call("typed", {"s": "x", "i": 2.0, "n": 1, "b": False, "a": ["x"], "o": {}})],
                    tools=[TYPED])
    bad = tool_row(calls=[call("typed", {name: value})], tools=[TYPED])
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError, match=rf"row 2: field 'messages\[1\].tool_calls\[0\].function.arguments.{name}': "
                                        rf"'typed' declares this argument as {declared}, got"):
        load_data(path, kind="sft")


# ------------------------------------------------------------------------------------------------ rendering

# The kit's ChatML before it learned tools: without tools it must render byte for byte as this (the main job's
# numbers were measured with it).
CHATML_BEFORE_TOOLS = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PLAIN = [[{"role": "user", "content": "Review the tea."}, {"role": "assistant", "content": "Good tea."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": " Hello!\n"}, {"role": "user", "content": "Review the lamp."}]]


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    prepare_tokenizer(tokenizer)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("messages", PLAIN)
@pytest.mark.parametrize("prompt", [False, True])
def test_chatml_without_tools_renders_exactly_as_before(chatml_tokenizer, messages, prompt):
    for tokenize in (False, True):
        kwargs = {"tokenize": tokenize, "add_generation_prompt": prompt}
        if tokenize:
            kwargs |= {"return_dict": True, "return_assistant_tokens_mask": True}
        before = chatml_tokenizer.apply_chat_template(messages, chat_template=CHATML_BEFORE_TOOLS, **kwargs)
        assert chatml_tokenizer.apply_chat_template(messages, **kwargs) == before
        assert chatml_tokenizer.apply_chat_template(messages, tools=[], **kwargs) == before


TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n<tools>\n"
    + json.dumps(ADD) + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>")
CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def test_chatml_renders_tools_calls_and_results_in_the_shared_format(chatml_tokenizer):
    row = tool_row()
    text = chatml_tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert text == (f"<|im_start|>system\n{TOOLS_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n"
                    f"<|im_start|>assistant\n{CALL_TEXT}<|im_end|>\n<|im_start|>tool\n3<|im_end|>\n"
                    "<|im_start|>assistant\nThe sum is 3.<|im_end|>\n")
    # an existing system turn gets the tools after a blank line; content before calls, calls joined by a newline
    messages = [{"role": "system", "content": "Be brief."}, row["messages"][0],
                {"role": "assistant", "content": "Adding.", "tool_calls": [call(), call(arguments='{"a": 1, "b": 2}')]}]
    text = chatml_tokenizer.apply_chat_template(messages, tools=row["tools"], tokenize=False)
    assert text.startswith(f"<|im_start|>system\nBe brief.\n\n{TOOLS_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"<|im_start|>assistant\nAdding.\n{CALL_TEXT}\n{CALL_TEXT}<|im_end|>\n")
    assert "documents" not in CHATML_TEMPLATE  # retrieval puts documents in a system turn for this template


def test_trls_response_template_parses_a_chatml_tool_call(chatml_tokenizer):
    from trl.chat_template_utils import qwen3_template

    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.response_template = qwen3_template
    ids = tokenizer(f"{CALL_TEXT}<|im_end|>", add_special_tokens=False)["input_ids"]
    parsed = tokenizer.parse_response(ids, prefix="<|im_start|>assistant\n")
    assert parsed["tool_calls"] == [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]


# ------------------------------------------------------------------------------------------------ masking


def masked_text(tokenizer, ids, mask):
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def test_chatml_markers_mask_exactly_the_assistant_turns_with_their_calls(chatml_tokenizer):
    row = tool_row()
    assert assistant_mask_source(chatml_tokenizer) == MARKERS
    out = chatml_tokenizer.apply_chat_template(row["messages"], tools=row["tools"], return_dict=True,
                                               return_assistant_tokens_mask=True)
    assert masked_text(chatml_tokenizer, out["input_ids"], out["assistant_masks"]) == (
        f"{CALL_TEXT}<|im_end|>The sum is 3.<|im_end|>")
    # the kit's renderer (used for templates without markers) agrees with the markers on the same template
    rendered = tokenize_conversation(chatml_tokenizer, row["messages"], row["tools"])
    assert rendered == {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}


# family: (the assistant turns' text as the template renders them, end-of-turn included)
FAMILY_TURNS = {
    "llama3.1": '{"name": "add", "parameters": {"a": 1, "b": 2}}<|eot_id|>The sum is 3.<|eot_id|>',
    "qwen2.5": f"{CALL_TEXT}<|im_end|>The sum is 3.<|im_end|>",
}


@pytest.mark.parametrize("family", list(FAMILY_TURNS))
def test_family_templates_mask_exactly_the_assistant_turns_with_their_calls(tiny_base, family):
    tokenizer = family_tokenizer(tiny_base, family)
    assert assistant_mask_source(tokenizer) == RENDERED
    row = tool_row()
    out = tokenize_conversation(tokenizer, row["messages"], row["tools"])
    text = tokenizer.decode(out["input_ids"])
    assert '"name": "add"' in text and "The sum is 3." in text and '"required"' in text  # the tools are listed
    assert masked_text(tokenizer, out["input_ids"], out["assistant_masks"]) == FAMILY_TURNS[family]
    # the tool's result and the tools listing are context, never targets
    unmasked = masked_text(tokenizer, out["input_ids"], [1 - m for m in out["assistant_masks"]])
    assert "3" in unmasked.split("What is 1 + 2?")[1] and '"required"' in unmasked


def test_a_dataset_of_tool_rows_masks_as_each_row_alone(tiny_base):
    # Arrow may give every message every key (tool_calls: None on plain turns): Llama 3.1's template asks
    # `'tool_calls' in message`, so the None keys must not reach it.
    tokenizer = family_tokenizer(tiny_base, "llama3.1")
    rows = [tool_row(), {"messages": [{"role": "user", "content": "Hi", "tool_calls": None},
                                      {"role": "assistant", "content": "Hello", "tool_calls": None}], "tools": None}]
    dataset = tokenize_for_assistant_loss(Dataset.from_list(rows), tokenizer, "rows")
    plain = [{k: v for k, v in m.items() if v is not None} for m in rows[1]["messages"]]
    assert dataset.to_list() == [tokenize_conversation(tokenizer, rows[0]["messages"], rows[0]["tools"]),
                                 tokenize_conversation(tokenizer, plain)]


def test_length_counts_include_each_rows_tools(chatml_tokenizer):
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    tools = [row["tools"] if isinstance(row["tools"], list) else json.loads(row["tools"]) for row in rows]
    def length(messages, tools=None):
        return len(chatml_tokenizer.apply_chat_template(messages, tools=tools, return_dict=True)["input_ids"])

    lengths = [length(row["messages"], row_tools) for row, row_tools in zip(rows, tools)]
    without_tools = max(length(row["messages"]) for row in rows)
    counts = count_over_length(str(EXAMPLE), "sft", "train", chatml_tokenizer, without_tools)
    assert counts == {str(EXAMPLE): (4, sum(n > without_tools for n in lengths))} and counts[str(EXAMPLE)][1] >= 3


def chatml_turn(message):
    """What the kit's ChatML trains of an assistant turn: its content, its calls, <|im_end|>."""
    calls = [c["function"] for c in message.get("tool_calls") or []]
    calls = ['<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (
        c["name"], c["arguments"] if isinstance(c["arguments"], str) else json.dumps(c["arguments"])) for c in calls]
    return "\n".join(([message["content"]] if message.get("content") else []) + calls) + "<|im_end|>"


def test_sft_trains_on_the_shipped_tool_calling_example(tiny_base, tmp_path, single_thread):
    trainer = load_recipe("sft")([], overrides={
        "model_name_or_path": tiny_base, "dataset_name": str(EXAMPLE), "output_dir": str(tmp_path / "out"),
        "use_peft": False, "max_steps": 3, "per_device_train_batch_size": 2, "max_length": 4096,
        "learning_rate": 1e-3, "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "logging_steps": 1})
    tokenizer = trainer.processing_class
    assert trainer.args.assistant_only_loss
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    for row, example in zip(rows, trainer.train_dataset):
        trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
        assert len(example["input_ids"]) < 4096, "truncated: the test would not see the whole row"
        assert trained == "".join(chatml_turn(m) for m in row["messages"] if m["role"] == "assistant")
        context = tokenizer.decode(example["input_ids"])
        assert "# Tools" in context and all(f"<|im_start|>tool\n{m['content']}<|im_end|>" in context
                                            for m in row["messages"] if m["role"] == "tool")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
