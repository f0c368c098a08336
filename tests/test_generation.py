"""The one generation layer: it gives the very responses the paths it replaced gave (so no report number moved), draws
the n samples of a prompt in one batched call, and renders system messages, templates and few-shot examples."""

import pytest
import torch
from conftest import REPO

from rlhf_kit.data.loading import load_data
from rlhf_kit.inference.generation import (Conversation, Prompting, Sampling, check_template, documents_message,
                                         generate, load_policy, render)
from rlhf_kit.model import stop_token_ids

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = load_data(REPO / "data/prompts", kind="prompt", split="test")["prompt"][:12]


@torch.no_grad()
def replaced_evaluation_generate(policy, prompts, *, max_new_tokens, temperature, batch_size, seed):
    """`evaluation.generate` as it was before the generation layer (commit 1f63133), kept as the reference."""
    tok, model = policy.tokenizer, policy.model
    stops = set(stop_token_ids(tok, model))
    torch.manual_seed(seed)
    responses, response_ids = [], []
    for start in range(0, len(prompts), batch_size):
        ids = [tok.apply_chat_template([{"role": "user", "content": p}] if isinstance(p, str) else list(p),
                                       add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for p in prompts[start : start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        gen = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0, temperature=temperature or None, top_k=0, top_p=1.0,
                             eos_token_id=sorted(stops), pad_token_id=tok.pad_token_id)
        for row in gen[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), None)
            response_ids.append(row[:cut] if cut else row)
            responses.append(tok.decode(response_ids[-1], skip_special_tokens=True).strip())
    return responses, response_ids


@pytest.fixture(scope="module")
def policy(tiny_sft):
    return load_policy(tiny_sft)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_the_same_responses_as_the_evaluation_path_it_replaced(policy, temperature):
    expected = replaced_evaluation_generate(policy, PROMPTS, max_new_tokens=12, temperature=temperature,
                                            batch_size=5, seed=3)
    gens = generate(policy, PROMPTS, sampling=Sampling(max_new_tokens=12, temperature=temperature, batch_size=5,
                                                       seed=3), progress=False)
    assert (gens.responses, gens.response_ids) == expected


def test_n_samples_in_one_call_equal_the_prompts_repeated_side_by_side(policy):
    """How best-of-N sampled before (each prompt repeated n times in the batch): num_return_sequences gives the same
    samples, so best-of-N's picks and the report's best-of-N row did not move."""
    repeated = [p for p in PROMPTS[:6] for _ in range(4)]
    expected, _ = replaced_evaluation_generate(policy, repeated, max_new_tokens=12, temperature=1.0, batch_size=8,
                                               seed=5)
    calls = []
    original = policy.model.generate
    policy.model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or original(**kw)
    try:
        gens = generate(policy, PROMPTS[:6], sampling=Sampling(n=4, max_new_tokens=12, batch_size=8, seed=5),
                        progress=False)
    finally:
        policy.model.generate = original
    assert gens.responses == expected
    assert calls == [2, 2, 2]  # 2 prompts per call, each expanded to 4 sequences inside generate
    assert gens.grouped()[1] == expected[4:8] and len(set(gens.grouped()[0])) > 1


def test_system_template_and_few_shot_become_chat_turns(policy):
    tok = policy.tokenizer
    prompting = Prompting(system="Be brief.", template="Task: {prompt}", few_shot=[("Review the tea.", "The tea is fun.")])
    ids = render(tok, "Review the coffee.", prompting)
    expected = tok.apply_chat_template([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Task: Review the tea."}, {"role": "assistant", "content": "The tea is fun."},
        {"role": "user", "content": "Task: Review the coffee."}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"]
    assert ids == expected


def test_raw_few_shot_is_a_document_and_stops_on_the_stop_string(policy):
    tok = policy.tokenizer
    prompting = Prompting(raw=True, few_shot=[("Review the tea.", "The tea is fun.")])
    text = tok.decode(render(tok, "Review the coffee.", prompting), skip_special_tokens=True)
    assert text == "Review the tea.\nThe tea is fun.\n\nReview the coffee.\n"
    settings = dict(max_new_tokens=24, seed=1)
    free = generate(policy, ["Review the coffee."] * 4, prompting=prompting, sampling=Sampling(**settings),
                    progress=False)
    cut = generate(policy, ["Review the coffee."] * 4, prompting=prompting,
                   sampling=Sampling(**settings, stop=[" and"]), progress=False)
    assert sum(" and" in r for r in free.responses) >= 2  # the stop string does come up
    assert cut.responses == [r.split(" and")[0].strip() for r in free.responses]
    assert cut.stopped == [True] * 4


@pytest.mark.parametrize("template, message", [
    ("no field at all", "must contain {prompt}"),
    ("{prompt} and {other}", "no other field"),
    ("{prompt", "not a valid template"),
])
def test_a_bad_prompt_template_is_refused_with_what_to_write(template, message):
    with pytest.raises(ValueError, match=message):
        check_template(template)


def test_greedy_with_several_samples_is_refused():
    with pytest.raises(ValueError, match="greedy samples would all be the same"):
        Sampling(n=4, temperature=0)


def test_documents_become_a_system_message_unless_the_template_lays_them_out(policy):
    tok = policy.tokenizer
    question = [{"role": "user", "content": "How much is the lamp?"}]
    documents = [{"text": "The lamp costs 12 dollars.", "title": "lamp"}, {"text": "The mug costs 3 dollars."}]
    text = tok.decode(render(tok, Conversation(question, documents)))
    assert ("<|im_start|>system\nDocuments:\n[1] The lamp costs 12 dollars.\n[2] The mug costs 3 dollars.<|im_end|>"
            in text)
    # Appended to a system message the prompt already has, and written as the passages training data holds.
    with_system = tok.decode(render(tok, Conversation(question, documents), Prompting(system="Be brief.")))
    assert "system\nBe brief.\n\n" + documents_message([d["text"] for d in documents]) + "<|im_end|>" in with_system
    # No documents: exactly the plain prompt.
    assert render(tok, Conversation(question)) == render(tok, question)

    class Laid:  # a template with its own documents slot (as Command R's and Granite's have) gets them as documents=
        chat_template = "{% for d in documents %}<<{{ d.title }}|{{ d.text }}>>{% endfor %}{{ messages[0].content }}"

        def apply_chat_template(self, messages, **kwargs):
            self.kwargs = kwargs
            return {"input_ids": [len(messages)]}

    laid = Laid()
    assert render(laid, Conversation(question, documents)) == [1]  # no system message added
    assert laid.kwargs["documents"] == [{"title": "lamp", "text": "The lamp costs 12 dollars."},
                                        {"text": "The mug costs 3 dollars."}]


def test_tools_are_listed_by_the_chat_template():
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: the expression, such as 3*12+2*4
        """
        return expression

    rendered = {}

    class Template:
        chat_template = "{{ tools }}"

        def apply_chat_template(self, messages, **kwargs):
            rendered.update(kwargs)
            return {"input_ids": [0]}

    render(Template(), "Hi", Prompting(tools=[calculator]))
    assert rendered["tools"] == [calculator]
    render(Template(), "Hi", Prompting())
    assert rendered.pop("tools", None) == [calculator]  # from the first call; the second passed none
    assert "tools" not in rendered
    with pytest.raises(ValueError, match="tools need a chat template"):
        Prompting(raw=True, tools=[calculator])
