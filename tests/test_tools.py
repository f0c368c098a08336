"""Tools: loading tool modules, the calculator, running calls in a worker (errors and timeouts come back as text),
parsing calls out of generated tokens for the kit's ChatML, Llama 3.1 and Qwen 2.5 templates, and the generate loop,
the CLI and GRPO running real calls end to end on the tiny model."""

import json
import re
import time

import pytest
from conftest import load_recipe
from transformers import AutoTokenizer
from trl.chat_template_utils import llama3_1_chat_template, qwen2_5_chat_template

from rlhf_kit.errors import UserError
from rlhf_kit.inference.calculator import calculator
from rlhf_kit.inference.constraints import Constraint
from rlhf_kit.inference.generation import Conversation, Sampling, load_policy
from rlhf_kit.inference.tools import generate_with_tools, parse_reply
from rlhf_kit.model import CHATML_TEMPLATE, require_response_template, response_template_for
from rlhf_kit.tasks.shop import CALCULATOR_SCHEMA
from rlhf_kit.tools import ToolRunner, load_tools, run_tool_call, tool_schema

pytestmark = pytest.mark.usefixtures("single_thread")

CALCULATOR = "rlhf_kit.inference.calculator"

def slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "woke"


def fails(x: int) -> str:
    """Raise.

    Args:
        x: anything
    """
    raise RuntimeError(f"broken on {x}")


def numbers(a: int, b: int = 2) -> dict:
    """Numbers, not text.

    Args:
        a: first
        b: second
    """
    return {"sum": a + b}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# ------------------------------------------------------------------------------------------------ the calculator


@pytest.mark.parametrize("expression, result", [("3*12+2*4", "44"), ("6/2", "3"), ("1/3", "0.3333333333"),
                                                ("-(2.5*4)", "-10"), ("7 // 2 + 7 % 2", "4"), ("2**10", "1024"),
                                                (" (1 + 2) * +3 ", "9"), ("0.1+0.2", "0.3")])
def test_calculator_does_arithmetic(expression, result):
    assert calculator(expression) == f"{expression.strip()} = {result}"  # what was computed, and its value


@pytest.mark.parametrize("expression, message", [("__import__('os')", "not allowed"), ("x + 1", "not allowed"),
                                                 ("abs(-1)", "not allowed"), ("(1).real", "not allowed"),
                                                 ("'a' * 3", "not allowed"), ("2**10**10", "exponent"),
                                                 ("(10**999)**1000", "digits"), ("1/0", "division by zero"),
                                                 ("1 +", "not an arithmetic"), ("1e308*10", "finite")])
def test_calculator_refuses_anything_but_bounded_arithmetic(expression, message):
    with pytest.raises(ValueError, match=message):
        calculator(expression)


def test_calculator_schema_is_the_one_training_data_holds():
    schema = tool_schema(calculator)["function"]
    assert schema["name"] == "calculator"
    assert schema["parameters"]["properties"].keys() == {"expression"}
    assert schema["parameters"]["properties"]["expression"]["type"] == "string"
    assert schema["parameters"]["required"] == ["expression"]
    # The shop task's demonstrations list exactly what inference lists.
    assert tool_schema(calculator) == CALCULATOR_SCHEMA


# ------------------------------------------------------------------------------------------------ loading tools


def test_tools_load_from_a_module_or_a_file(tmp_path):
    assert load_tools(CALCULATOR) == [calculator]
    module = tmp_path / "mytools.py"
    module.write_text('from rlhf_kit.inference.calculator import calculator\n\n\n'
                      'def shout(text: str) -> str:\n    """Shout.\n\n    Args:\n        text: what to shout\n    """\n'
                      '    return text.upper()\n\n\ndef _hidden(x: int) -> int:\n    return x\n')
    tools = load_tools([str(module)])  # the imported calculator and the private helper are not its tools
    assert [t.__name__ for t in tools] == ["shout"]
    listed = tmp_path / "listed.py"
    listed.write_text(module.read_text() + "\nTOOLS = [shout, calculator]\n")
    assert [t.__name__ for t in load_tools(str(listed))] == ["shout", "calculator"]
    with pytest.raises(UserError, match="two tools are named calculator"):
        load_tools([str(listed), CALCULATOR])


def test_a_tool_the_model_cannot_be_told_about_fails_when_loaded(tmp_path):
    bare = tmp_path / "bare.py"
    bare.write_text("def add(a, b):\n    return a + b\n")
    with pytest.raises(UserError, match=r"bare.py: tool 'add' .*type hint on every argument"):
        load_tools(str(bare))
    undocumented = tmp_path / "undocumented.py"
    undocumented.write_text('def add(a: int, b: int) -> int:\n    """Add."""\n    return a + b\n')
    with pytest.raises(UserError, match=r"undocumented.py: tool 'add' .*Args: section"):
        load_tools(str(undocumented))
    with pytest.raises(UserError, match="no such file"):
        load_tools(str(tmp_path / "missing.py"))
    with pytest.raises(UserError, match="neither a .py file nor an importable module"):
        load_tools("no_such_tools_module")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(UserError, match="no tools found"):
        load_tools(str(tmp_path / "empty.py"))


# ------------------------------------------------------------------------------------------------ running calls


def test_every_failure_comes_back_to_the_model_as_text():
    tools = [calculator, slow, fails, numbers]
    assert run_tool_call(call("calculator", expression="3*12+2*4"), tools) == "3*12+2*4 = 44"
    assert run_tool_call(call("numbers", a=1), tools) == '{"sum": 3}'  # not a string: JSON
    assert run_tool_call({"name": "numbers", "arguments": '{"a": 1, "b": 5}'}, tools) == '{"sum": 6}'
    assert run_tool_call(call("search", query="x"), tools).startswith("Error: there is no tool 'search'; the tools "
                                                                      "are calculator, fails, numbers, slow")
    assert run_tool_call(call("numbers", c=1), tools).startswith("Error: bad arguments for numbers:")
    assert run_tool_call({"name": "numbers", "arguments": "{a: 1"}, tools).startswith("Error: the arguments of "
                                                                                     "numbers are not valid JSON")
    assert run_tool_call(call("fails", x=3), tools) == "Error: fails raised RuntimeError: broken on 3"
    assert run_tool_call(call("calculator", expression="__import__('os')"), tools).startswith(
        "Error: calculator raised ValueError: \"__import__('os')\" is not allowed")


def test_a_hanging_tool_is_stopped_at_the_timeout_and_the_next_call_runs():
    with ToolRunner([slow, calculator], timeout=0.5) as run:
        began = time.perf_counter()
        assert run(call("slow", seconds=30)) == "Error: slow did not finish within 0.5 seconds and was stopped"
        assert time.perf_counter() - began < 5
        assert run(call("calculator", expression="2+2")) == "2+2 = 4"  # a fresh worker
        assert run(call("slow", seconds=0.01)) == "woke"


# ------------------------------------------------------------------------------------------------ parsing calls


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_sft):
    return AutoTokenizer.from_pretrained(tiny_sft)


def with_template(tokenizer, template):
    copy = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = template
    return copy


def round_trip(tok, reply_text, template):
    """Render a tool-using conversation, parse the hand-written reply's ids, run its calls, render the result."""
    tools = load_tools(CALCULATOR)
    schemas = [tool_schema(t) for t in tools]
    question = [{"role": "user", "content": "What do 3 lamps at 12 and 2 mugs at 4 cost?"}]
    prompt_ids = tok.apply_chat_template(question, tools=schemas, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    reply_ids = tok(reply_text, add_special_tokens=False)["input_ids"]
    reply = parse_reply(tok, template, reply_ids, prompt_ids, schemas)
    assert reply["tool_calls"] == [call("calculator", expression="3*12+2*4")]
    results = [{"role": "tool", "name": "calculator", "content": run_tool_call(c, tools)} for c in reply["tool_calls"]]
    assert results[0]["content"] == "3*12+2*4 = 44"
    again = tok.apply_chat_template([*question, reply, *results], tools=schemas, add_generation_prompt=True,
                                    tokenize=False)
    # The call is rendered back as the model wrote it, the result follows, and the model is asked to go on.
    prompt = tok.decode(prompt_ids)
    assert again.startswith(prompt) and "3*12+2*4" in again[len(prompt):] and "44" in again[len(prompt):]
    return again


def test_calls_round_trip_through_the_kits_chatml(chatml_tokenizer):
    tok = chatml_tokenizer
    assert tok.chat_template == CHATML_TEMPLATE
    template = require_response_template(tok)
    reply = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*12+2*4"}}\n</tool_call><|im_end|>'
    again = round_trip(tok, reply, template)
    assert again.endswith(reply + "\n<|im_start|>tool\n" + RESULT + "<|im_end|>\n<|im_start|>assistant\n")
    # Malformed JSON in the call: a final answer, as written; nothing is run.
    bad = tok("<tool_call>\n{\"name\": calculator}\n</tool_call><|im_end|>", add_special_tokens=False)["input_ids"]
    assert parse_reply(tok, template, bad, [], []) == {"role": "assistant",
                                                       "content": '<tool_call>\n{"name": calculator}\n</tool_call>'}


def test_calls_round_trip_through_llama_and_qwen_templates(chatml_tokenizer):
    llama = with_template(chatml_tokenizer, llama3_1_chat_template)
    llama.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                                                            "<|begin_of_text|>"]})
    round_trip(llama, '{"name": "calculator", "parameters": {"expression": "3*12+2*4"}}<|eot_id|>',
               require_response_template(llama))
    qwen = with_template(chatml_tokenizer, qwen2_5_chat_template)
    round_trip(qwen, '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*12+2*4"}}\n</tool_call>'
                     "<|im_end|>", require_response_template(qwen))


def test_a_template_nobody_parses_is_refused_before_generation(chatml_tokenizer):
    dropping = with_template(chatml_tokenizer, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match="does not render tool calls and tool results"):
        require_response_template(dropping)
    tok = with_template(chatml_tokenizer, "{{ messages | tojson }}")  # renders calls, but in no format anyone parses
    assert response_template_for(tok) is None
    with pytest.raises(UserError, match="Set tokenizer.response_template"):
        require_response_template(tok)
    # A response template the tokenizer carries is used, and saved with it (tokenizer_config.json).
    tok.response_template = {"fields": {"content": {"content": "text"}}}
    assert require_response_template(tok) == tok.response_template


def test_a_saved_response_template_loads_back(chatml_tokenizer, tmp_path):
    tok = with_template(chatml_tokenizer, qwen2_5_chat_template)
    tok.response_template = response_template_for(tok)
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).response_template == tok.response_template


# ------------------------------------------------------------------------------------------------ the loop, end to end

RESULT = "3*12+2*4 = 44"  # the calculator's answer to CALL: what it computed, and the value
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*12+2*4"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_policy(tiny_sft):
    """The tiny SFT model: rlhf-kit's ChatML, which lists tools and renders calls in the Qwen/Hermes format."""
    policy = load_policy(tiny_sft)
    assert policy.tokenizer.chat_template == CHATML_TEMPLATE
    return policy


def first_round_calls(policy):
    """A logits processor for the first generate() call only: the response is forced to be the calculator call."""
    forced, calls = Constraint.from_options(regex=re.escape(CALL)).logits_processor(policy), []

    def processors():
        calls.append(1)
        return forced() if len(calls) == 1 else None

    return processors


def test_a_real_call_runs_and_the_model_goes_on_with_its_result(tool_policy):
    tools = load_tools(CALCULATOR)
    question = [{"role": "user", "content": "What do 3 lamps at 12 and 2 mugs at 4 cost?"}]
    prompts = [Conversation(question, [{"text": "The lamp costs 12 dollars."}])]
    sampling = Sampling(n=2, max_new_tokens=96, temperature=1.0, seed=3)
    gens = generate_with_tools(tool_policy, prompts, tools=tools, sampling=sampling,
                               logits_processor=first_round_calls(tool_policy), progress=False)
    assert gens.tool_calls == [1, 1]
    for transcript, response, prompt_ids in zip(gens.transcripts, gens.responses, gens.prompt_ids):
        assert transcript[:2] == [{"role": "assistant", "content": "", "tool_calls": [call("calculator",
                                                                                            expression="3*12+2*4")]},
                                  {"role": "tool", "name": "calculator", "content": RESULT}]
        # The second round was free: the tiny model wrote no call, and that is the final answer.
        assert transcript[2:] == [{"role": "assistant", "content": response}] and "<tool_call>" not in response
        # It was generated after the documents, the tools, the call and its result, rendered by the template.
        context = tool_policy.tokenizer.decode(prompt_ids)
        assert "Documents:\n[1] The lamp costs 12 dollars." in context and '"name": "calculator"' in context
        assert context.endswith(f"{CALL}<|im_end|>\n<|im_start|>tool\n{RESULT}<|im_end|>\n<|im_start|>assistant\n")
    assert gens.generated_tokens[0] > len(gens.response_ids[0])  # both rounds counted
    # The same seed draws the same trajectories.
    again = generate_with_tools(tool_policy, prompts, tools=tools, sampling=sampling,
                                logits_processor=first_round_calls(tool_policy), progress=False)
    assert again.responses == gens.responses and again.transcripts == gens.transcripts


def test_calls_stop_after_max_tool_rounds(tool_policy):
    forced = Constraint.from_options(regex=re.escape(CALL)).logits_processor(tool_policy)  # every round calls
    gens = generate_with_tools(tool_policy, ["Hi"], tools=load_tools(CALCULATOR), max_tool_rounds=2,
                               sampling=Sampling(max_new_tokens=96, temperature=0), logits_processor=forced,
                               progress=False)
    assert gens.tool_calls == [2]
    assert [m["role"] for m in gens.transcripts[0]] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert gens.responses[0] == CALL and gens.transcripts[0][-1] == {"role": "assistant", "content": CALL}


def test_generate_file_rows_hold_the_exchange_and_resume_checks_the_tool_settings(tool_policy, tmp_path):
    from rlhf_kit.inference.batch import generate_file

    out = tmp_path / "out.jsonl"
    forced = Constraint.from_options(regex=re.escape(CALL))
    settings = dict(tools=[CALCULATOR], max_tool_rounds=1, max_new_tokens=96, n=2, select="vote")
    generate_file(tool_policy, ["Hi", "Hello"], out, constraint=forced, progress=False, **settings)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["tool_calls"] for row in rows] == [1, 1]
    assert [m["role"] for m in rows[0]["messages"]] == ["assistant", "tool", "assistant"]
    assert rows[0]["messages"][1]["content"] == RESULT and len(rows[0]["transcripts"]) == 2
    assert rows[0]["answer"] == CALL  # the vote is on the final responses
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["tools"]["modules"] == [CALCULATOR] and meta["tools"]["schemas"] == [tool_schema(calculator)]
    with pytest.raises(UserError, match="tools.max_rounds was 1, now 2"):
        generate_file(tool_policy, ["Hi", "Hello", "Hey"], out, constraint=forced, progress=False,
                      **{**settings, "max_tool_rounds": 2})
    with pytest.raises(UserError, match="raw prompting has none"):
        generate_file(tool_policy, ["Hi"], tmp_path / "raw.jsonl", raw=True, tools=[CALCULATOR])


# ------------------------------------------------------------------------------------------------ GRPO with tools

QUESTIONS = ["What is 3*12+2*4?", "What do 3 lamps at 12 and 2 mugs at 4 cost?", "Add 36 and 8.", "Total: 3*12+2*4"]


def used_a_tool(prompts, completions, **kwargs):
    """A reward for GRPO: 1 when the completion called a tool and got 44 back."""
    return [float(any(m["role"] == "tool" and m["content"] == RESULT for m in c)) for c in completions]


@pytest.fixture(scope="module")
def calling_policy(tiny_sft, tmp_path_factory):
    """The tiny SFT model taught in a few dozen steps to answer QUESTIONS with the calculator call (loss on the call
    only): a policy whose rollouts really call the tool."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("calling")
    tok = AutoTokenizer.from_pretrained(tiny_sft)
    model = AutoModelForCausalLM.from_pretrained(tiny_sft)
    schemas = [tool_schema(calculator)]
    call_ids = tok(CALL + "<|im_end|>", add_special_tokens=False)["input_ids"]
    rows = [tok.apply_chat_template([{"role": "user", "content": q}], tools=schemas, add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"] + call_ids for q in QUESTIONS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([[-100] * (len(r) - len(call_ids)) + call_ids + [-100] * (width - len(r)) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tok.pad_token_id), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, loss.item()
    # The tools listing makes prompts longer than the tiny model's 256 positions (RoPE has no hard limit), and
    # TRL drops a tool result that would run past max_position_embeddings.
    model.config.max_position_embeddings = 1024
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_grpo_rollouts_call_the_tools_of_the_recipe_settings(calling_policy, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    trainer = load_recipe("grpo")(["--config", "recipes/configs/grpo/tiny.yaml"], overrides={
        "model_name_or_path": calling_policy, "reward_model_path": None, "reward_funcs": ["test_tools:used_a_tool"],
        "eval_reward_funcs": [], "dataset_name": str(prompts), "output_dir": str(tmp_path / "grpo"),
        "tools": [CALCULATOR], "tool_timeout": 10, "max_steps": 2, "per_device_train_batch_size": 4,
        "num_generations": 2, "max_completion_length": 128, "eval_strategy": "no", "eval_on_start": False,
        "save_strategy": "no"})
    assert trainer.tools[0].__wrapped__ is calculator  # TRL calls it through the worker (`rlhf_kit.tools.guarded`)
    logged = [e for e in trainer.state.log_history if "tools/call_frequency" in e]
    assert len(logged) == 2 and all(e["tools/call_frequency"] > 0 for e in logged), logged
    assert all(e["tools/failure_frequency"] == 0 for e in logged)
    assert max(e["rewards/used_a_tool/mean"] for e in logged) > 0  # the calculator's 44 came back into the rollout
    assert "tools:\n- rlhf_kit.inference.calculator" in (tmp_path / "grpo" / "rlhf_kit_config.yaml").read_text()
    with pytest.raises(UserError, match="neither a .py file nor an importable module"):
        load_recipe("grpo")(["--config", "recipes/configs/grpo/tiny.yaml"], overrides={
            "model_name_or_path": "no/such/model", "reward_model_path": None,
            "reward_funcs": ["test_tools:used_a_tool"], "dataset_name": str(prompts),
            "output_dir": str(tmp_path / "bad"), "tools": ["no_such_tools_module"]})


# ------------------------------------------------------------------------------------------------ the commands


def test_generate_command_and_chat_run_the_tools(calling_policy, tmp_path):
    from rlhf_kit.cli import main
    from rlhf_kit.inference.chat import chat

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS[:2]))
    out = tmp_path / "out.jsonl"
    assert main(["generate", calling_policy, "--prompts", str(prompts), "--output", str(out), "--tools", CALCULATOR,
                 "--max_tool_rounds", "1", "--tool_timeout", "2", "--temperature", "0", "--max_new_tokens", "96"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["tool_calls"] for row in rows] == [1, 1]
    assert rows[0]["messages"][:2] == [{"role": "assistant", "content": "",
                                        "tool_calls": [call("calculator", expression="3*12+2*4")]},
                                       {"role": "tool", "name": "calculator", "content": RESULT}]
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["tools"]["timeout"] == 2.0

    written = []
    history = chat(calling_policy, lines=[QUESTIONS[0]], write=written.append, temperature=0, max_new_tokens=96,
                   tools=[CALCULATOR], max_tool_rounds=1)
    shown = "".join(written)
    assert '[calculator({"expression": "3*12+2*4"})]\n[-> 3*12+2*4 = 44]\n' in shown
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert shown.endswith(history[-1]["content"] + "\n")


def test_guarded_tools_keep_their_schemas_and_raise_what_went_wrong():
    """What GRPO hands TRL: the same functions to TRL's eyes, their calls run (and stopped) in the worker."""
    from rlhf_kit.tools import ToolError, guarded

    with ToolRunner([calculator, slow], timeout=0.5) as runner:
        calc, sleeper = guarded(runner)
        assert calc.__name__ == "calculator" and tool_schema(calc) == tool_schema(calculator)
        assert calc(expression="6/2") == "6/2 = 3"
        with pytest.raises(ToolError, match="did not finish within 0.5 seconds"):
            sleeper(seconds=30)
        with pytest.raises(ToolError, match="raised ValueError"):
            calc(expression="x")
        with pytest.raises(ToolError, match="bad arguments for calculator"):
            calc(text="1")


def test_evaluation_with_retrieval_and_tools_scores_the_final_answers_to_the_prompts_as_given(tool_policy, tmp_path):
    from types import SimpleNamespace

    from rlhf_kit.inference.evaluation import Assistance, evaluate_policy
    from rlhf_kit.inference.retrieval import Retriever

    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog/lamp.md").write_text("The lamp costs 12 dollars.\n")
    (tmp_path / "catalog/mug.md").write_text("The mug costs 4 dollars.\n")
    seen = []

    def metrics(prompts, responses):
        seen.extend(prompts)
        return {"exact_match": sum("44" in r for r in responses) / len(responses)}

    task = SimpleNamespace(metrics=metrics, gold_score=lambda p, r: float("44" in r))
    prompts = ["What do 3 lamps and 2 mugs cost?", "How much does the mug cost?"]
    assistance = Assistance(retriever=Retriever.from_corpus(tmp_path / "catalog"), top_k=1,
                            tools=load_tools(CALCULATOR), max_tool_rounds=1)
    forced = Constraint.from_options(regex=re.escape(CALL))  # every round calls: one round runs, then it stops
    result = evaluate_policy(tool_policy, prompts, task=task, reference=tool_policy, assistance=assistance,
                             constraint=forced, max_new_tokens=96, name="sft_retrieval_tools")
    assert result.metrics["tool_calls"] == 1.0 and result.per_prompt["tool_calls"] == [1.0, 1.0]
    assert result.responses == [CALL, CALL] and result.metrics["exact_match"] == 0.0  # forced to call again
    assert set(seen) == set(prompts)  # the task judged the prompts as given, not the retrieved conversations
    assert "kl_to_reference" not in result.metrics  # the final turn alone is not the exchange's KL
    # Both rounds' tokens counted: the call twice.
    assert result.metrics["response_tokens"] > 1.5 * len(tool_policy.tokenizer(CALL)["input_ids"])
