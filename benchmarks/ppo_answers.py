"""Where a policy's gold score goes on the review task: malformed answers against the gold of well-formed ones.

    python benchmarks/ppo_answers.py --sft outputs/tiny/sft --policy outputs/tiny/ppo --policy /tmp/ppo-180

Run it from the repository root: the main job's adapters name their base model by a path relative to it.

Every malformed answer scores -2 with the gold annotator, every well-formed one between -1 and +1, so a policy's
mean gold is (share well-formed) x (their gold) - 2 x (share malformed). This splits the two: for the SFT model and
each `--policy` (PPO stage outputs or checkpoints), `--samples` responses to each of the first `--prompts` held-out
prompts at PPO's temperature (fixed seeds, so every policy answers the same draws), and per policy:

- gold and KL to the SFT model (means over prompts, gold with its standard error);
- the share of answers in the review's shape that name another item than the prompt's, and of other malformed
  answers (without the shape, or with more than four adjectives);
- the gold of the well-formed answers alone;
- the paired gold difference to the first `--policy`, prompt by prompt.
"""

import argparse
from pathlib import Path

from rlhf_kit.data.loading import load_data
from rlhf_kit.inference.evaluation import evaluate_policy, standard_error
from rlhf_kit.inference.generation import load_policy
from rlhf_kit.tasks import review

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", required=True, help="the SFT stage output: the reference for KL, measured first")
    parser.add_argument("--policy", action="append", default=[], help="a policy to measure (repeatable)")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    prompts = load_data(REPO / "data/prompts", kind="prompt", split="test")["prompt"][: args.prompts]
    reference = load_policy(args.sft, "sft")
    rows = {}
    for path in [args.sft, *args.policy]:
        policy = reference if path == args.sft else load_policy(path, path)
        rows[path] = measure(policy, prompts, reference, args.samples, args.temperature)
    first = rows[args.policy[0]]["per_prompt_gold"] if args.policy else None
    print("| policy | gold | KL | other item | other malformed | gold of well-formed | vs first --policy |")
    print("|---|---|---|---|---|---|---|")
    for path, r in rows.items():
        paired = ""
        if first is not None and path != args.policy[0]:
            difference = [a - b for a, b in zip(r["per_prompt_gold"], first)]
            paired = f"{sum(difference) / len(difference):+.3f} ± {standard_error(difference):.3f}"
        print(f"| {path} | {r['gold']:+.3f} ± {r['gold_se']:.3f} | {r['kl']:.2f} | {r['wrong_item']:.3f} | "
              f"{r['other_malformed']:.3f} | {r['well_formed_gold']:+.3f} | {paired} |")


def measure(policy, prompts, reference, samples: int, temperature: float) -> dict:
    per_prompt_gold = [0.0] * len(prompts)
    kl, wrong_item, other_malformed, well_formed = [], 0, 0, []
    for seed in range(samples):
        result = evaluate_policy(policy, prompts, reference=reference, task=review, max_new_tokens=16,
                                 temperature=temperature, seed=seed)
        kl.extend(result.per_prompt["kl_to_reference"])
        for i, (prompt, response) in enumerate(zip(prompts, result.responses)):
            gold = review.gold_score(prompt, response)
            per_prompt_gold[i] += gold / samples
            if review.follows_format(prompt, response):
                well_formed.append(gold)
            elif review.has_review_shape(response) and response.split()[1] != review.item_of(prompt):
                wrong_item += 1  # "The {noun} is ...", with known adjectives, about another noun
            else:
                other_malformed += 1
    answers = samples * len(prompts)
    return {"gold": sum(per_prompt_gold) / len(prompts), "gold_se": standard_error(per_prompt_gold),
            "kl": sum(kl) / len(kl), "wrong_item": wrong_item / answers, "other_malformed": other_malformed / answers,
            "well_formed_gold": sum(well_formed) / max(len(well_formed), 1), "per_prompt_gold": per_prompt_gold}


if __name__ == "__main__":
    main()
