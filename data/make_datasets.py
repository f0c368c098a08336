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

SYSTEM_FRACTION = 0.1  # share of SFT conversations that open with a system message
N_EXAMPLES = 20  # rows in each data/examples/ file


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


def preference_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    # Label noise only in train: test measures agreement with the gold annotator itself.
    noise = 0.1 if split == "train" else 0.0
    return [
        {"prompt": [user(p.prompt)], "chosen": [assistant(p.chosen)], "rejected": [assistant(p.rejected)]}
        for p in task.preference_pairs(rng, n, split, noise=noise)
    ]


def prompt_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    return [{"prompt": [user(p)], "item": task.item_of(p)} for p in task.rl_prompts(rng, n, split)]


# --- the questions with a one-word answer (rlhf_kit.tasks.answers), for self-consistency --------
def answers_sft_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    return [{"messages": [user(p), assistant(a)]} for p, a in answers.examples(rng, n, split)]


def answers_prompt_rows(rng: random.Random, n: int, split: task.Split) -> list[dict]:
    # The gold answer rides along as a column, as `item` does in prompts/: reward functions receive it.
    return [{"prompt": [user(p)], "answer": a} for p, a in answers.examples(rng, n, split)]


# --- small examples of every other accepted format --------------------------
# Plain-string responses start with a space, following TRL's convention for
# non-conversational data: the completion is appended to the prompt as is.
def sft_prompt_completion(rng: random.Random) -> list[dict]:
    return [{"prompt": p, "completion": " " + r} for p, r in task.sft_examples(rng, N_EXAMPLES)]


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
EXAMPLES = (sft_prompt_completion, sft_prompt_completion_conversational, sft_text,
            preference_implicit, preference_standard, prompts_standard)


def build_files(seed: int = 0) -> dict[str, str]:
    """Every shipped file: its path relative to data/ -> its text."""

    def rng(key: str) -> random.Random:
        # Seeding with a string is stable across runs (hashed with sha512, not `hash`).
        return random.Random(f"{seed}:{key}")

    files = {}
    for stage, (n_train, n_test) in SIZES.items():
        for split, n in (("train", n_train), ("test", n_test)):
            files[f"{stage}/{split}.jsonl"] = to_jsonl(STAGE_ROWS[stage](rng(f"{stage}/{split}"), n, split))
    for kind, (n_train, n_test) in ANSWERS_SIZES.items():
        for split, n in (("train", n_train), ("test", n_test)):
            name = f"answers/{kind}/{split}.jsonl"
            files[name] = to_jsonl(ANSWERS_ROWS[kind](rng(name), n, split))
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
