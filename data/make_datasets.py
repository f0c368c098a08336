"""Write the shipped datasets of the synthetic review task and of its questions with a checkable answer (see
data/README.md).

    python data/make_datasets.py                 # rewrite data/ in place
    python data/make_datasets.py --out /tmp/d    # somewhere else

Idempotent: every file draws from its own generator seeded by (seed, file
name), so re-running gives byte-identical files, and changing one file's size
leaves the others unchanged. tests/test_task.py checks that the committed files
are exactly what this script writes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from collections.abc import Iterable
from pathlib import Path

# So `python data/make_datasets.py` works from a fresh checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_kit.tasks import answers  # noqa: E402
from rlhf_kit.tasks import review as task  # noqa: E402
from rlhf_kit.inference.calculator import calculator  # noqa: E402
from rlhf_kit.inference.generation import documents_message  # noqa: E402
from rlhf_kit.model import TOOLS_INSTRUCTIONS, TOOLS_PREAMBLE  # noqa: E402
from rlhf_kit.tasks import shop  # noqa: E402

SYSTEM_FRACTION = 0.1  # share of SFT conversations that open with a system message
N_EXAMPLES = 20  # rows in each data/examples/ file
# Pairs that differ only in the item, added to the preference training split: without them the reward model stays
# near chance on the held-out pairs of that kind (README, issue 20).
WRONG_ITEM_PAIRS = 3000


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


# --- the main datasets, one builder per stage -------------------------------
def pretrain_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    return [{"text": text} for text in task.pretraining_corpus(rng, n, split)]


def sft_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    rows = []
    for prompt, response in task.sft_examples(rng, n, split):
        # A few system messages so the SFT chat template is exercised with and without one.
        system = [{"role": "system", "content": task.SYSTEM_PROMPT}] if rng.random() < SYSTEM_FRACTION else []
        rows.append({"messages": system + [user(prompt), assistant(response)]})
    return rows


def preference_rows(rng: random.Random, n: int, split: task.Split,
                    wrong_item_pairs: int = WRONG_ITEM_PAIRS) -> list[dict]:
    """`n` mixed pairs, then (train only) `wrong_item_pairs` more that differ only in the item; the tests' fast
    reward model asks for none, and gets the shipped split's mixed pairs exactly."""
    # Label noise only in train: test measures agreement with the gold annotator itself, on the generator's own mix.
    noise = 0.1 if split == "train" else 0.0
    pairs = task.preference_pairs(rng, n, split, noise=noise)
    if split == "train" and wrong_item_pairs:
        # Drawn after the mixed pairs, so those stay what they were; shuffled in so a file read in order is mixed too.
        pairs += task.wrong_item_pairs(rng, wrong_item_pairs, split, noise=noise)
        rng.shuffle(pairs)
    return [{"prompt": [user(p.prompt)], "chosen": [assistant(p.chosen)], "rejected": [assistant(p.rejected)]}
            for p in pairs]


def prompt_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    return [{"prompt": [user(p)], "item": task.item_of(p)} for p in task.rl_prompts(rng, n, split)]


# --- the questions with a one-word answer (rlhf_kit.tasks.answers), for self-consistency --------
def answers_sft_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    return [{"messages": [user(p), assistant(a)]} for p, a in answers.examples(rng, n, split)]


def answers_prompt_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    # The gold answer rides along as a column, as `item` does in prompts/: reward functions receive it.
    return [{"prompt": [user(p)], "answer": a} for p, a in answers.examples(rng, n, split)]


# --- the shop (rlhf_kit.tasks.shop): retrieval and the calculator -------------------------------
SHOP_K = 3  # passages retrieved per question, as the pipeline's `--retrieve` top-k
# Share of SFT demonstrations by kind of question. Mostly totals: they are most of the test prompts, and the only kind
# where the model must tell apart the passages of two items the question names (0.5 totals: exact match 0.16).
SHOP_KINDS = {"price": 0.15, "stock": 0.1, "total": 0.75}
SHOP_DOCUMENTS = 0.9  # share of demonstrations with retrieved passages (the rest: the question alone)
SHOP_TOOLS = 0.8  # share with the calculator listed (the rest answer a total themselves, as without tools)


# The system turn's tool listing in the shared format of the kit's ChatML (rlhf_kit/model.py), for the pretraining text.
SHOP_TOOLS_LISTING = TOOLS_PREAMBLE + json.dumps(shop.CALCULATOR_SCHEMA) + TOOLS_INSTRUCTIONS


def shop_documents(texts: list[str]) -> dict[str, str]:
    # The shared format of retrieved passages: a system message, numbered from 1, as inference renders them.
    return {"role": "system", "content": documents_message(texts)}


def shop_calculator_call(question: str, catalog: shop.Catalog) -> tuple[dict, str]:
    """The calculator call a total question needs (name and arguments) and what the calculator answers to it."""
    expression = shop.expression_of(question, catalog)
    return {"name": "calculator", "arguments": {"expression": expression}}, calculator(expression)


def shop_conversation(rng: random.Random, split: task.Split) -> dict:
    """One demonstration about its own random training catalog: the retrieved passages, the question, and the
    calculator's call and result before the answer when a total is asked and the tool is listed."""
    catalog = shop.train_catalog(rng)
    kind = rng.choices(list(SHOP_KINDS), weights=list(SHOP_KINDS.values()))[0]
    question = shop.make_prompt(shop.sample_question(rng, kind, split))
    documents = rng.random() < SHOP_DOCUMENTS
    tools = rng.random() < SHOP_TOOLS
    messages = [shop_documents(shop.retrieved(rng, question, catalog, SHOP_K))] if documents else []
    messages.append(user(question))
    gold, facts = str(shop.answer(question, catalog)), shop.facts_said(question, catalog)
    if kind == "total" and tools:
        # The answer quotes the calculator's "expression = value": a number after the same words is what a tiny
        # model learns to copy (a bare result right after the tool turn, it did not learn to copy at all).
        call, result = shop_calculator_call(question, catalog)
        messages += [{"role": "assistant", "content": facts, "tool_calls": [{"type": "function", "function": call}]},
                     {"role": "tool", "name": "calculator", "content": result}]
        messages.append(assistant(f"So they cost {result} dollars."))
    else:  # a price or a stock is the fact itself; a total without the calculator is the model's own arithmetic
        messages.append(assistant(facts if kind != "total" else f"{facts} So they cost {gold} dollars."))
    return {"tools": [shop.CALCULATOR_SCHEMA] if tools else [], "messages": messages}


def shop_sft_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    return [shop_conversation(rng, split) for _ in range(n)]


def shop_prompt_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    # Questions about the test catalog (the retrieval corpus), with their gold answer as a column. Test takes every
    # held-out price and stock question (there are few), then distinct totals.
    questions = [q for q in shop.all_single_questions() if shop.split_of(q) == split][:n // 4 if split == "train"
                                                                                      else n]
    while len(questions) < n:
        question = shop.sample_question(rng, "total", split)
        if question not in questions:
            questions.append(question)
    rng.shuffle(questions)
    return [{"prompt": [user(shop.make_prompt(q))], "answer": shop.answer(shop.make_prompt(q))} for q in questions]


def shop_pretrain_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    """Plain text in the shop's words, about random training catalogs (never a test fact): a few passages, then
    questions about them answered (a total by the calculator's call), so a from-scratch tokenizer has merges for the
    items, the numbers and the tool-call JSON."""
    rows = []
    for _ in range(n):
        catalog = shop.train_catalog(rng)
        shown = rng.sample(shop.ITEMS, rng.randint(2, 5))
        sentences = [shop.passage(item, catalog[item]) for item in shown]
        # Questions about items the paragraph has just listed, so their answers follow from the text.
        singles = [q for q in shop.all_single_questions() if q.items[0] in shown and shop.split_of(q) == split]
        # Many questions per paragraph: looking a fact up in the text above is what the model must learn first, and
        # two totals, each of which needs the facts of two items the paragraph lists told apart.
        for kind in [rng.choice(("price", "stock")) for _ in shown[:2]] + ["total", "total"]:
            mine = [q for q in singles if q.kind == kind]
            question = rng.choice(mine) if mine else shop.sample_question(rng, "total", split, items=shown)
            question = shop.make_prompt(question)
            facts = shop.facts_said(question, catalog)
            if kind == "total":  # the calculator's call as a model writes it, so its JSON gets merges too
                call, result = shop_calculator_call(question, catalog)
                sentences.append(f"{question} {facts}\n<tool_call>\n{json.dumps(call)}\n</tool_call>\n{result}\n"
                                 f"So they cost {result} dollars.")
            else:
                sentences.append(f"{question} {facts}")
        documents = shop_documents(sentences[:len(shown)])["content"]
        rows.append({"text": documents + "\n" + "\n".join(sentences[len(shown):])})
    # The tool listing the chat template puts in the system turn, in a few rows: several hundred characters that a
    # tokenizer without merges for them would spend one token each on, in every SFT demonstration.
    for i in range(0, n, 10):
        rows[i]["text"] += "\n\n" + SHOP_TOOLS_LISTING
    return rows


# --- small examples of every other accepted format --------------------------
# Plain-string responses start with a space, following TRL's convention for
# non-conversational data: the completion is appended to the prompt as is.
def sft_prompt_completion(rng: random.Random) -> list[dict]:
    return [{"prompt": p, "completion": " " + r} for p, r in task.sft_examples(rng, N_EXAMPLES)]


# The tools of the hand-written tool-calling example: a calculator and a price lookup.
_EXAMPLE_CALCULATOR = {'type': 'function',
                       'function': {'name': 'calculator',
                                    'description': 'Evaluate an arithmetic expression.',
                                    'parameters': {'type': 'object',
                                                   'properties': {'expression': {'type': 'string',
                                                                                 'description': 'The expression, e.g. '
                                                                                                "'3 * (4 + 5)'."}},
                                                   'required': ['expression']}}}
_EXAMPLE_PRICE = {'type': 'function',
                  'function': {'name': 'get_price',
                               'description': 'Look up the price of an item in the shop.',
                               'parameters': {'type': 'object',
                                              'properties': {'item': {'type': 'string',
                                                                      'description': "The item's name."},
                                                             'quantity': {'type': 'integer',
                                                                          'description': 'How many.'}},
                                              'required': ['item']}}}


def sft_tool_calls(rng: random.Random) -> list[dict]:
    # TRL's tool-calling format, written by hand (no generator: the calls and results are the point): a call and its
    # result, two calls in one turn answered by id, a turn with no call, and `tools` given as a JSON string.
    return [{"tools": [_EXAMPLE_CALCULATOR], "messages": [{'role': 'user', 'content': 'What is 17 times 23?'},
                      {'role': 'assistant',
                       'tool_calls': [{'type': 'function',
                                       'id': 'call_0',
                                       'function': {'name': 'calculator', 'arguments': {'expression': '17 * 23'}}}]},
                      {'role': 'tool', 'tool_call_id': 'call_0', 'name': 'calculator', 'content': '391'},
                      {'role': 'assistant', 'content': '17 times 23 is 391.'}]},
            {"tools": [_EXAMPLE_CALCULATOR, _EXAMPLE_PRICE],
             "messages": [{'role': 'system', 'content': "You are the shop's assistant."},
                      {'role': 'user', 'content': 'How much do 3 teapots and a lamp cost?'},
                      {'role': 'assistant',
                       'content': 'Let me look up both prices.',
                       'tool_calls': [{'type': 'function',
                                       'id': 'call_0',
                                       'function': {'name': 'get_price',
                                                    'arguments': {'item': 'teapot', 'quantity': 3}}},
                                      {'type': 'function',
                                       'id': 'call_1',
                                       'function': {'name': 'get_price', 'arguments': {'item': 'lamp'}}}]},
                      {'role': 'tool', 'tool_call_id': 'call_0', 'name': 'get_price', 'content': '36.00'},
                      {'role': 'tool', 'tool_call_id': 'call_1', 'name': 'get_price', 'content': '24.50'},
                      {'role': 'assistant',
                       'tool_calls': [{'type': 'function',
                                       'id': 'call_2',
                                       'function': {'name': 'calculator',
                                                    'arguments': {'expression': '36.00 + 24.50'}}}]},
                      {'role': 'tool', 'tool_call_id': 'call_2', 'name': 'calculator', 'content': '60.5'},
                      {'role': 'assistant', 'content': 'Together they cost 60.50.'}]},
            {"tools": [_EXAMPLE_CALCULATOR, _EXAMPLE_PRICE], "messages": [{'role': 'user', 'content': 'Hello!'},
                      {'role': 'assistant', 'content': 'Hello! Ask me about prices in the shop.'}]},
            {"tools": json.dumps([_EXAMPLE_PRICE]), "messages": [{'role': 'user', 'content': 'What does a tent cost?'},
                      {'role': 'assistant',
                       'tool_calls': [{'type': 'function',
                                       'function': {'name': 'get_price', 'arguments': '{"item": "tent"}'}}]},
                      {'role': 'tool', 'content': '120.00'},
                      {'role': 'assistant', 'content': 'A tent costs 120.00.'}]}]


def sft_prompt_completion_conversational(rng: random.Random) -> list[dict]:
    return [{"prompt": [user(p)], "completion": [assistant(r)]} for p, r in task.sft_examples(rng, N_EXAMPLES)]


def sft_text(rng: random.Random) -> list[dict]:
    return [{"text": f"{p} {r}"} for p, r in task.sft_examples(rng, N_EXAMPLES)]


def preference_implicit(rng: random.Random) -> list[dict]:
    return [
        {"chosen": [user(p.prompt), assistant(p.chosen)], "rejected": [user(p.prompt), assistant(p.rejected)]}
        for p in task.preference_pairs(rng, N_EXAMPLES, noise=0.0)
    ]


def preference_standard(rng: random.Random) -> list[dict]:
    return [
        {"prompt": p.prompt, "chosen": " " + p.chosen, "rejected": " " + p.rejected, "margin": round(p.margin, 4)}
        for p in task.preference_pairs(rng, N_EXAMPLES, noise=0.0)
    ]


def prompts_standard(rng: random.Random) -> list[dict]:
    return [{"prompt": p} for p in task.rl_prompts(rng, N_EXAMPLES)]


# --- writing ----------------------------------------------------------------
def to_jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    # lineterminator fixed so the bytes do not depend on the platform.
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


SIZES = {"pretrain": (4000, 200), "sft": (2000, 200), "preference": (3000, 300), "prompts": (1000, 100)}
STAGE_ROWS = {"pretrain": pretrain_rows, "sft": sft_rows, "preference": preference_rows, "prompts": prompt_rows}
ANSWERS_SIZES = {"sft": (2000, 200), "prompts": (1000, 100)}
ANSWERS_ROWS = {"sft": answers_sft_rows, "prompts": answers_prompt_rows}
SHOP_SIZES = {"pretrain": (3000, 100), "sft": (4000, 200), "prompts": (400, 100)}
SHOP_ROWS = {"pretrain": shop_pretrain_rows, "sft": shop_sft_rows, "prompts": shop_prompt_rows}
EXAMPLES = (sft_prompt_completion, sft_prompt_completion_conversational, sft_text,
            preference_implicit, preference_standard, prompts_standard, sft_tool_calls)


def file_rng(key: str, seed: int = 0) -> random.Random:
    """The generator that draws the rows of file `key` ("preference/train"): each file has its own, so changing one
    file's rows leaves every other file as it was."""
    # Seeding with a string is stable across runs (hashed with sha512, not `hash`).
    return random.Random(f"{seed}:{key}")


def build_files(seed: int = 0) -> dict[str, str]:
    """Every shipped file: its path relative to data/ -> its text."""

    def rng(key: str) -> random.Random:
        return file_rng(key, seed)

    files = {}
    for stage, (n_train, n_test) in SIZES.items():
        for split, n in (("train", n_train), ("test", n_test)):
            files[f"{stage}/{split}.jsonl"] = to_jsonl(STAGE_ROWS[stage](rng(f"{stage}/{split}"), n, split))
    for kind, (n_train, n_test) in ANSWERS_SIZES.items():
        for split, n in (("train", n_train), ("test", n_test)):
            name = f"answers/{kind}/{split}.jsonl"
            files[name] = to_jsonl(ANSWERS_ROWS[kind](rng(name), n, split))
    for kind, (n_train, n_test) in SHOP_SIZES.items():
        for split, n in (("train", n_train), ("test", n_test)):
            name = f"shop/{kind}/{split}.jsonl"
            files[name] = to_jsonl(SHOP_ROWS[kind](rng(name), n, split))
    # The retrieval corpus: one passage per item of the catalog the test questions are about.
    files["shop/catalog.jsonl"] = to_jsonl({"text": shop.passage(item, fact), "item": item}
                                           for item, fact in shop.TEST_CATALOG.items())
    # Few-shot examples for prompting the base model as a document (the report's base_raw rows): the first three SFT
    # training demonstrations, as prompt/completion rows.
    first = [json.loads(line)["messages"] for line in files["sft/train.jsonl"].splitlines()[:3]]
    files["few_shot/review.jsonl"] = to_jsonl({"prompt": m[0]["content"], "completion": m[1]["content"]} for m in first)
    for build in EXAMPLES:
        files[f"examples/{build.__name__}.jsonl"] = to_jsonl(build(rng(f"examples/{build.__name__}")))
    # Same key as the JSONL file, so the CSV holds the same rows in the other format.
    files["examples/sft_prompt_completion.csv"] = to_csv(sft_prompt_completion(rng("examples/sft_prompt_completion")))
    return files


def write_datasets(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write every dataset file under `out_dir` and return their paths."""
    paths = []
    for name, text in build_files(seed).items():
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="base seed; the shipped files use 0")
    args = parser.parse_args()
    for path in write_datasets(args.out, args.seed):
        print(f"{path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
