"""Does a shop base model look an item's price up by name? How often its next token is the right price.

    python benchmarks/shop_lookup.py outputs/tiny-tools/pretrain [more models ...]
    python benchmarks/shop_lookup.py --write_lookup_text /tmp/lookup   # pretraining text made only of lookups
    python benchmarks/shop_lookup.py /tmp/lookup-base --no_question     # a model pretrained on that text

Each prompt lists n passages of a random training catalog, numbered as retrieval puts them in the conversation, asks
one item's price and starts the answer::

    Documents:
    [1] The vase costs 24 dollars. There are 17 vases in stock.
    [2] The mug costs 9 dollars. There are 3 mugs in stock.
    How much does the mug cost? The mug costs

A model that finds the item's passage by its name is right wherever the passage is listed; one that copies some price
from the passages, about 1 time in n; one that copies none, about 1 in 28. Counted by the passage's position, 150
prompts for each n (the counts are deterministic). `--write_lookup_text` writes the densest text for learning the
lookup: each row five passages, then twelve of their prices said again in a random order (a `text` column,
train.jsonl and test.jsonl), to pretrain on with `rlhf-kit train pretrain`.
"""

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_kit.inference.generation import documents_message
from rlhf_kit.tasks import shop


def documents(catalog: shop.Catalog, items: list[str]) -> str:
    return documents_message([shop.passage(item, catalog[item]) for item in items])


def lookups(model_dir: str, sizes: tuple[int, ...], prompts: int, question: bool) -> dict[int, list[tuple[int, int]]]:
    """For each number of passages n: (right, asked) by the position of the asked item's passage."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng = random.Random(0)
    counts = {}
    for n in sizes:
        hits = [[0, 0] for _ in range(n)]
        for _ in range(prompts):
            catalog = shop.train_catalog(rng)
            shown = rng.sample(shop.ITEMS, n)
            position = rng.randrange(n)
            item = shown[position]
            asked = f"How much does the {item} cost? " if question else ""
            ids = tokenizer(f"{documents(catalog, shown)}\n{asked}The {item} costs", return_tensors="pt").input_ids
            with torch.no_grad():
                predicted = model(ids).logits[0, -1].argmax().item()
            price = tokenizer(f" {catalog[item].price}", add_special_tokens=False).input_ids[0]
            hits[position][0] += predicted == price
            hits[position][1] += 1
        counts[n] = [tuple(h) for h in hits]
    return counts


def write_lookup_text(out: Path) -> None:
    for split, rows in (("train", 3000), ("test", 100)):
        rng = random.Random(f"shop lookup text: {split}")
        lines = []
        for _ in range(rows):
            catalog = shop.train_catalog(rng)
            shown = rng.sample(shop.ITEMS, 5)
            said = " ".join(f"The {item} costs {catalog[item].price} dollars."
                            for item in (rng.choice(shown) for _ in range(12)))
            lines.append(json.dumps({"text": f"{documents(catalog, shown)}\n{said}"}))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/train.jsonl and {out}/test.jsonl")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 5], help="passages per prompt")
    parser.add_argument("--prompts", type=int, default=150, help="prompts per size")
    parser.add_argument("--no_question", action="store_true", help="start the answer right after the passages")
    parser.add_argument("--write_lookup_text", type=Path, metavar="DIR")
    args = parser.parse_args()
    if args.write_lookup_text:
        return write_lookup_text(args.write_lookup_text)
    torch.set_num_threads(1)
    for model_dir in args.models:
        counts = lookups(model_dir, tuple(args.sizes), args.prompts, question=not args.no_question)
        print(model_dir)
        for n, hits in counts.items():
            right = sum(h for h, _ in hits)
            by_position = ", ".join(f"[{i}] {h}/{t}" for i, (h, t) in enumerate(hits, 1))
            print(f"  {n} passages: right {right}/{args.prompts} ({right / args.prompts:.2f}; copying one of them at "
                  f"random: {1 / n:.2f}); by position of the item's passage: {by_position}")


if __name__ == "__main__":
    main()
