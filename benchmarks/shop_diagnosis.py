"""Where a shop model's answers go wrong: each step of a total question, counted on the held-out prompts.

    python benchmarks/shop_diagnosis.py outputs/tiny-tools/sft                     # sampled at temperature 1
    python benchmarks/shop_diagnosis.py outputs/tiny-tools/sft --temperature 0     # greedy

The model answers the evaluation of a pipeline config (`--config`, by default
`recipes/configs/pipeline/tiny-tools.yaml`: 100 held-out prompts of data/shop/prompts, BM25 top 3 from
data/shop/catalog.jsonl, the calculator, two tool rounds), read from that file. Besides exact match by
kind of question, it splits the totals by the two steps a total needs (`rlhf_kit.tasks.shop`):

- **prices**: the calculator is called with the right expression, i.e. each item's price was copied from the passage
  that names it (the lookup by name), and the count from the question;
- **copy**: the final answer's number is the calculator's result;

and counts, for each item of a total, whether the price it was said to have is right, by the position of the item's
passage among the retrieved ones: a model that copies from the first passage instead of looking the item up is right
far more often when the item's passage is listed first.
"""

import argparse
import re
from collections import Counter

from rlhf_kit.data.loading import load_data
from rlhf_kit.inference.evaluation import Assistance
from rlhf_kit.inference.generation import Sampling, load_policy
from rlhf_kit.inference.retrieval import Retriever, with_retrieval
from rlhf_kit.pipeline import EVALUATION_DEFAULTS, PipelineConfig
from rlhf_kit.tasks import shop
from rlhf_kit.tools import load_tools


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--config", default="recipes/configs/pipeline/tiny-tools.yaml")
    parser.add_argument("--temperature", type=float, help="instead of the config's")
    args = parser.parse_args()

    settings = {**EVALUATION_DEFAULTS, **PipelineConfig.from_yaml(args.config).evaluation}
    temperature = settings["temperature"] if args.temperature is None else args.temperature
    prompts = load_data(settings["prompts"], kind="prompt", split=settings["split"])["prompt"]
    prompts = prompts[: settings["num_prompts"]]
    retriever, k = Retriever.from_corpus(settings["retrieve"]), settings["top_k"]
    assistance = Assistance(retriever=retriever, top_k=k, tools=load_tools(settings["tools"]),
                            max_tool_rounds=settings["max_tool_rounds"])
    out = assistance.sample(load_policy(args.model, "sft"), prompts,
                            Sampling(max_new_tokens=settings["max_new_tokens"], temperature=temperature,
                                     seed=settings["seed"]))
    print({name: round(v, 3) for name, v in shop.metrics(prompts, out.responses).items()})

    steps, by_position = Counter(), Counter()
    for prompt, given, transcript in zip(prompts, with_retrieval(prompts, retriever, k), out.transcripts):
        question = shop.question_of(prompt)
        if question.kind != "total":
            continue
        calls = [c["function"]["arguments"] for m in transcript for c in m.get("tool_calls", [])]
        results = [m["content"] for m in transcript if m["role"] == "tool"]
        prices = any(c.get("expression") == shop.expression_of(prompt) for c in calls)
        copied = bool(results) and str(shop.answer_of(transcript)) == results[-1].split(" = ")[-1]
        steps["totals"] += 1
        steps["prices right"] += prices
        steps["result copied"] += copied
        order = [re.match(r"The (\w+) costs", d["text"]).group(1) for d in given.documents]
        said = dict(re.findall(r"The (\w+) costs (\d+)", transcript[0]["content"] or ""))
        for item in question.items:
            position = order.index(item) + 1
            by_position[(position, "items")] += 1
            by_position[(position, "right")] += said.get(item) == str(shop.TEST_CATALOG[item].price)
    print(f"totals {steps['totals']}: the calculator called with both prices right {steps['prices right']}, "
          f"its result copied into the answer {steps['result copied']}")
    for position in sorted({p for p, _ in by_position}):
        n, right = by_position[(position, "items")], by_position[(position, "right")]
        print(f"an item whose passage is [{position}]: its price said right {right} of {n} ({right / n:.0%})")


if __name__ == "__main__":
    main()
