"""Constrained output: an untrained model sampling at temperature 1 still answers only in the constraint's language,
ends each answer with its own stop token, and says so when max_new_tokens cuts one short; bad constraints fail before
any model loads."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_kit.cli import main as cli
from rlhf_kit.inference.chat import chat
from rlhf_kit.inference.constraints import Constraint
from rlhf_kit.inference.generation import Sampling, generate, load_policy
from rlhf_kit.model import stop_token_ids
from rlhf_kit.tasks.review import has_review_shape
from test_chat_template import family_model

# The review task's shape, with words of its lists, bounded so that every sample can finish in 48 tokens.
REVIEW = r"The (coffee|tea|book) is (great|awful|small)( and (great|awful|small)){0,3}\."
SCHEMA = {"type": "object", "required": ["item", "stars", "tags"], "additionalProperties": False,
          "properties": {"item": {"enum": ["coffee", "tea"]}, "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}}}
CHOICES = ["yes", "no", 'say "maybe"', "back\\slash", "naïve"]  # quotes, a backslash, a non-ASCII letter: escaped
PROMPTS = ["Review the coffee.", "What do you think of the tea? Tell me all you know about it, in detail.", "Hi"]


def valid_json(text):
    """SCHEMA's rules, checked by hand (jsonschema is not a dependency)."""
    value = json.loads(text)
    return (set(value) == {"item", "stars", "tags"} and value["item"] in ("coffee", "tea")
            and type(value["stars"]) is int and 1 <= value["stars"] <= 5 and len(value["tags"]) <= 2
            and all(isinstance(t, str) and len(t) <= 6 for t in value["tags"]))


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema") / "review.json"
    path.write_text(json.dumps(SCHEMA))
    return str(path)


@pytest.fixture(scope="module", params=["chatml", "llama3.2"])
def untrained(request, tiny_base, tmp_path_factory):
    """The tiny base with fresh random weights (it never saw a review), with ChatML (the kit's template, stop token
    <|im_end|>) or Llama 3.2's tokens and template (stop tokens <|eot_id|> and <|end_of_text|>)."""
    path = tiny_base if request.param == "chatml" else family_model(tiny_base, request.param,
                                                                    tmp_path_factory.mktemp("llama3"))
    policy = load_policy(path)
    torch.manual_seed(0)
    policy.model = AutoModelForCausalLM.from_config(policy.model.config).eval()
    return policy


@pytest.mark.parametrize("kind", ["regex", "json_schema", "choices"])
def test_every_sample_of_an_untrained_model_matches_and_ends_with_its_stop_token(untrained, kind, schema_file,
                                                                                 single_thread):
    option = {"regex": REVIEW, "json_schema": schema_file, "choices": CHOICES}[kind]
    valid = {"regex": has_review_shape, "json_schema": valid_json, "choices": CHOICES.__contains__}[kind]
    constraint = Constraint.from_options(**{kind: option})
    # Temperature 1, 4 samples per prompt, prompts of different lengths in one left-padded batch. 96 new tokens hold
    # any answer of the three: SCHEMA's longest is 90 bytes (two tags of 6 characters of up to 4 UTF-8 bytes each,
    # which an untrained model does sample), and a byte-level token holds at least one byte. With 48, CI once cut
    # {"item":"tea","stars":2,"tags":["w coԍ𛉹"," w soᣣ"]} short.
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=96)
    gens = generate(untrained, PROMPTS, sampling=sampling, logits_processor=constraint.logits_processor(untrained))

    assert len(gens.responses) == 12 and len(set(gens.responses)) > 1  # sampled, not one forced string
    assert [r for r in gens.responses if not valid(r)] == []
    assert all(gens.stopped) and all(constraint.complete(untrained, gens.response_ids))
    stops = set(stop_token_ids(untrained.tokenizer, untrained.model))
    assert all(ids[-1] in stops for ids in gens.response_ids)
    if kind == "regex":  # the same model and seed, unconstrained: nothing of the kind
        free = generate(untrained, PROMPTS, sampling=sampling, progress=False)
        assert not any(map(has_review_shape, free.responses))


def test_a_stop_string_ends_a_constrained_response_early(untrained, single_thread):
    """A row a stop string ended is padded by transformers; its matcher must not choke on the padding."""
    constraint = Constraint.from_options(regex=REVIEW)
    gens = generate(untrained, PROMPTS, sampling=Sampling(n=4, max_new_tokens=48, stop=[" and"]),
                    logits_processor=constraint.logits_processor(untrained))
    assert all(gens.stopped) and all(re.fullmatch(r"The (coffee|tea|book) is (great|awful|small)\.?", r)
                                     for r in gens.responses)
    assert any(not r.endswith(".") for r in gens.responses)  # some were cut at " and"


def test_an_answer_cut_short_by_max_new_tokens_is_reported_not_hidden(tiny_base, tmp_path, capsys, single_thread):
    """`rlhf-kit eval --regex` on the review task with the base model (never fine-tuned to answer): every response
    has the shape; with too few tokens to finish none does, and eval and chat both say so."""
    out = tmp_path / "metrics.json"
    args = ["eval", tiny_base, "--task", "rlhf_kit.tasks.review", "--regex", REVIEW, "--num_prompts", "8"]
    assert cli([*args, "--max_new_tokens", "48", "--output", str(out)]) == 0
    metrics = next(iter(json.loads(out.read_text()).values()))
    assert metrics["shape_rate"] == 1.0 and metrics["constraint_complete_rate"] == 1.0
    assert metrics["stop_rate"] == 1.0

    capsys.readouterr()
    assert cli([*args, "--max_new_tokens", "3", "--output", str(out)]) == 0
    metrics = next(iter(json.loads(out.read_text()).values()))
    assert metrics["constraint_complete_rate"] == 0.0 and metrics["shape_rate"] == 0.0
    said = capsys.readouterr().err
    assert "8 of 8 responses reached --max_new_tokens 3 before their regex match was complete" in said

    written = []
    history = chat(tiny_base, lines=["Yes or no?", "Review the tea."], write=written.append, temperature=1.0,
                   constraint=Constraint.from_options(choices="yes,no"))
    assert [m["content"] for m in history if m["role"] == "assistant"][0] in ("yes", "no")
    chat(tiny_base, lines=["Review the tea."], write=written.append, max_new_tokens=2,
         constraint=Constraint.from_options(regex=REVIEW))
    assert "(cut short at max_new_tokens=2: the reply does not match the regex constraint)\n" in written


@pytest.mark.parametrize("options, message", [
    ({"regex": "The (coffee|tea"}, "regex 'The (coffee|tea' cannot constrain generation: error: unclosed group"),
    ({"regex": "(?=a)b"}, "look-around, including look-ahead and look-behind, is not supported"),
    ({"json_schema": "no/such/schema.json"}, "json_schema file no/such/schema.json cannot be read"),
    ({"choices": ""}, "give one or more non-empty choices"),
    ({"choices": "yes,,no"}, "give one or more non-empty choices"),
    ({"choices": []}, "give one or more non-empty choices"),
    ({"regex": "a", "choices": "a,b"}, "give one constraint, not regex and choices"),
])
def test_a_bad_constraint_is_refused_with_what_to_fix(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Constraint.from_options(**options)


@pytest.mark.parametrize("content, message", [
    ('{"type": "object",', "is not JSON (Expecting property name enclosed in double quotes at line 1, column 19)"),
    ("[1, 2]", "holds a list, not a JSON schema object"),
    ('{"type": "strin"}', "cannot constrain generation: Invalid type: strin"),
])
def test_a_bad_schema_file_is_named(tmp_path, content, message):
    path = tmp_path / "schema.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"json_schema file {path} {message}")):
        Constraint.from_options(json_schema=str(path))


def test_no_option_is_no_constraint():
    assert Constraint.from_options() is None


def test_the_commands_refuse_a_bad_constraint_before_loading_the_model(tmp_path, capsys):
    """An empty model directory, which would fail to load: the constraint's error comes first, and the exit status
    is a user error's. (A model path that does not exist is refused even before the constraint: test_user_errors.)"""
    (tmp_path / "no-model").mkdir()
    missing = str(tmp_path / "no-model")
    assert cli(["eval", missing, "--regex", "(("]) == 2
    assert "rlhf-kit eval: regex '((' cannot constrain generation" in capsys.readouterr().err
    assert cli(["chat", missing, "--json_schema", str(tmp_path / "none.json")]) == 2
    assert f"rlhf-kit chat: json_schema file {tmp_path / 'none.json'} cannot be read" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: the options exclude each other
        cli(["eval", missing, "--regex", "a", "--choices", "a,b"])
