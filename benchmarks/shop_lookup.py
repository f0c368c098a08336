"""Does a shop base model look an item's price up by name? How often its next token is the right price.

    python benchmarks/shop_lookup.py outputs/tiny-tools/pretrain [more models ...]
    python benchmarks/shop_lookup.py --write_lookup_text /tmp/lookup   # pretraining text made only of lookups
    python benchmarks/shop_lookup.py /tmp/lookup-base --no_question     # a model pretrained on that text
    python benchmarks/shop_lookup.py --write_lookup_text /tmp/adjacent --adjacent   # the price right after the name
    python benchmarks/shop_lookup.py /tmp/adjacent-base --adjacent
    python benchmarks/shop_lookup.py --write_copy_text /tmp/copy      # the textbook copying task
    python benchmarks/shop_lookup.py /tmp/copy-base --copy

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

Two controls for what the lookup asks of the model. `--adjacent` writes and probes the same text with the price right
after the name (``[1] mug 9 dollars, 3 in stock.`` then ``mug 9 dollars.``): the one-step copy an induction head makes
(the token that followed this token last time), where "The mug costs" needs two (the token that followed these two).
`--write_copy_text` writes the textbook task that forms induction heads, 30 random nonce words and then the same 30
again; `--copy` reports a model's loss on each half (the second half is free to a model that copies).
"""

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_kit.inference.generation import documents_message
from rlhf_kit.tasks import shop


def documents(catalog: shop.Catalog, items: list[str], adjacent: bool = False) -> str:
    if adjacent:
        return documents_message([f"{item} {catalog[item].price} dollars, {catalog[item].stock} in stock."
                                  for item in items])
    return documents_message([shop.passage(item, catalog[item]) for item in items])


def price_said(item: str, catalog: shop.Catalog, adjacent: bool) -> str:
    return f"{item} {catalog[item].price} dollars." if adjacent else f"The {item} costs {catalog[item].price} dollars."


def lookups(model_dir: str, sizes: tuple[int, ...], prompts: int, question: bool,
            adjacent: bool = False) -> dict[int, list[tuple[int, int]]]:
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
            if adjacent:  # as in the adjacent lookup text: one price said, then the asked item's name
                first = rng.choice(shown)
                start = f"{price_said(first, catalog, True)} {item}"
            else:
                start = (f"How much does the {item} cost? " if question else "") + f"The {item} costs"
            ids = tokenizer(f"{documents(catalog, shown, adjacent)}\n{start}", return_tensors="pt").input_ids
            with torch.no_grad():
                predicted = model(ids).logits[0, -1].argmax().item()
            price = tokenizer(f" {catalog[item].price}", add_special_tokens=False).input_ids[0]
            hits[position][0] += predicted == price
            hits[position][1] += 1
        counts[n] = [tuple(h) for h in hits]
    return counts


def write_text(out: Path, row: Callable[[random.Random], str], name: str) -> None:
    for split, rows in (("train", 3000), ("test", 100)):
        rng = random.Random(f"{name}: {split}")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"text": row(rng)}) + "\n" for _ in range(rows)))
    print(f"wrote {out}/train.jsonl and {out}/test.jsonl")


def lookup_row(rng: random.Random, adjacent: bool) -> str:
    catalog = shop.train_catalog(rng)
    shown = rng.sample(shop.ITEMS, 5)
    said = " ".join(price_said(rng.choice(shown), catalog, adjacent) for _ in range(12))
    return f"{documents(catalog, shown, adjacent)}\n{said}"


NONCE_WORDS = [f"w{a}{b}" for a in "abcdefghij" for b in "klmnopqrst"]


def copy_row(rng: random.Random) -> str:
    words = " ".join(rng.choice(NONCE_WORDS) for _ in range(30))
    return f"{words} | {words}"


def copy_losses(model_dir: str, rows: int = 50) -> tuple[float, float]:
    """A model's mean loss on the first half of copy rows and on the second, which repeats it."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng = random.Random("copy probe")
    first = second = 0.0
    for _ in range(rows):
        text = copy_row(rng)
        ids = tokenizer(text, return_tensors="pt").input_ids
        bar = len(tokenizer(text.split(" |")[0]).input_ids)
        with torch.no_grad():
            losses = -model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        first += losses[:bar - 1].mean().item() / rows  # the words after the first: unpredictable
        second += losses[bar + 1:].mean().item() / rows  # the second half after its first word: a copy
    return first, second


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 5], help="passages per prompt")
    parser.add_argument("--prompts", type=int, default=150, help="prompts per size")
    parser.add_argument("--no_question", action="store_true", help="start the answer right after the passages")
    parser.add_argument("--adjacent", action="store_true", help="the price right after the name")
    parser.add_argument("--write_lookup_text", type=Path, metavar="DIR")
    parser.add_argument("--write_copy_text", type=Path, metavar="DIR")
    parser.add_argument("--copy", action="store_true", help="the models' loss on copy text, by half")
    args = parser.parse_args()
    if args.write_lookup_text:
        # The same seed either way: the same catalogs and items, only the wording differs.
        return write_text(args.write_lookup_text, lambda rng: lookup_row(rng, args.adjacent), "shop lookup text")
    if args.write_copy_text:
        return write_text(args.write_copy_text, copy_row, "copy text")
    torch.set_num_threads(1)
    for model_dir in args.models:
        if args.copy:
            first, second = copy_losses(model_dir)
            print(f"{model_dir}\n  loss on the random words {first:.3f}, on their repetition {second:.3f}")
            continue
        counts = lookups(model_dir, tuple(args.sizes), args.prompts, not args.no_question, args.adjacent)
        print(model_dir)
        for n, hits in counts.items():
            right = sum(h for h, _ in hits)
            by_position = ", ".join(f"[{i}] {h}/{t}" for i, (h, t) in enumerate(hits, 1))
            print(f"  {n} passages: right {right}/{args.prompts} ({right / args.prompts:.2f}; copying one of them at "
                  f"random: {1 / n:.2f}); by position of the item's passage: {by_position}")


if __name__ == "__main__":
    main()
