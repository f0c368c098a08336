"""Where a reward model disagrees with the gold annotator: held-out agreement by what tells a pair apart.

    python benchmarks/reward_diagnosis.py outputs/tiny/reward --policy outputs/tiny/sft

The held-out pairs of data/preference (the review task, labelled by the gold annotator, without the training set's
label noise) fall into three kinds:

- **wrong item**: the same review of another item ("The phone is great." to a prompt about the coffee);
- **malformed**: one side breaks the answer format (cut off, run on, a word that is not an adjective...);
- **other**: both well-formed and about the right item (sentiment, repeated or extra adjectives).

For each kind it prints the pairs and the reward model's agreement with gold. With `--policy` (the SFT model the
reward model starts from), also how often that policy's own log-probability of the response prefers gold's side of
the wrong-item pairs: a language model predicts the item from the prompt, so it tells them apart at the item's token;
a reward model that reads one vector at the end of the response has to carry the comparison there.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from rlhf_kit.inference.generation import load_policy
from rlhf_kit.rewards import RewardModel
from rlhf_kit.tasks.review import MALFORMED_SCORE, gold_score

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reward_model", help="a reward stage output")
    parser.add_argument("--policy", help="an SFT output: how its log-probabilities judge the wrong-item pairs")
    parser.add_argument("--pairs", default=str(REPO / "data/preference/test.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    kinds = [kind_of(text(r["prompt"]), text(r["chosen"]), text(r["rejected"])) for r in rows]
    reward_model = RewardModel.from_pretrained(args.reward_model)
    chosen = reward_model.score([r["prompt"] + r["chosen"] for r in rows])
    rejected = reward_model.score([r["prompt"] + r["rejected"] for r in rows])
    agree = defaultdict(list)
    for kind, c, r in zip(kinds, chosen.tolist(), rejected.tolist()):
        agree[kind].append(c > r)
        agree["all"].append(c > r)
    print(f"reward model {args.reward_model}: agreement with gold on {len(rows)} held-out pairs")
    for kind in ("wrong item", "malformed", "other", "all"):
        hits = agree[kind]
        print(f"  {kind:<11} {len(hits):>4} pairs  {sum(hits) / max(len(hits), 1):.3f}")

    if args.policy:
        policy = load_policy(args.policy)
        wrong = [r for r, kind in zip(rows, kinds) if kind == "wrong item"]
        prefers = [response_logprob(policy, r["prompt"], r["chosen"]) > response_logprob(policy, r["prompt"],
                                                                                         r["rejected"])
                   for r in wrong]
        print(f"policy {args.policy}: its log-probability prefers gold's side in {sum(prefers)} of {len(wrong)} "
              "wrong-item pairs")


def text(messages) -> str:
    return messages if isinstance(messages, str) else messages[-1]["content"]


def kind_of(prompt: str, chosen: str, rejected: str) -> str:
    a, b = chosen.split(), rejected.split()
    if len(a) > 2 and len(b) > 2 and a[1] != b[1] and a[2:] == b[2:]:  # "The {item} is ..." with only the item changed
        return "wrong item"
    if MALFORMED_SCORE in (gold_score(prompt, chosen), gold_score(prompt, rejected)):
        return "malformed"
    return "other"


@torch.no_grad()
def response_logprob(policy, prompt: list[dict], response: list[dict]) -> float:
    """log p(response | prompt) under the policy, the end-of-turn token included, with its chat template."""
    tokenizer = policy.tokenizer
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([full], device=policy.model.device)
    logprobs = policy.model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(head["input_ids"]) - 1 :].sum())


if __name__ == "__main__":
    main()
