"""Over-optimization against one reward model and against a conservative ensemble, measured on gold (issue 20).

    python benchmarks/reward_ensemble.py --sft outputs/tiny/sft --out /tmp/overopt     # about 40 min on 2 cores

1. Trains a reward ensemble of `--members` LoRA reward models on the SFT model (`recipes/reward.py` with
   ensemble_size; skipped when `<out>/reward-ensemble` is finished).
2. Runs PPO twice from the SFT model at the over-optimizing setting (`--kl_coef`, 0.05 by default: the weak penalty
   that lost gold with the pipeline's first reward model), with a checkpoint every `--every` updates: once against
   one reward model (the ensemble's first member, trained exactly like the others) and once against the whole
   ensemble scored conservatively (`--aggregate`, mean_minus_std with `--coef` 1 by default).
3. Evaluates every checkpoint of both runs the same way on the held-out prompts (`--samples` each at PPO's
   temperature, fixed seeds): gold score with its standard error over prompts, KL to the SFT model, and the ensemble
   members' disagreement on those responses (std across members, the over-optimization monitor's signal). One sample
   per prompt leaves a standard error near 0.14 on 100 prompts, too coarse to tell the two runs' last checkpoints
   apart, hence 4 by default; the last checkpoints are also compared paired, prompt by prompt.

Writes results.json, results.md (the table and the paired comparison) and overoptimization.png (gold and
disagreement against PPO updates).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from rlhf_kit.data.loading import load_data
from rlhf_kit.inference.evaluation import evaluate_policy, standard_error
from rlhf_kit.inference.generation import load_policy
from rlhf_kit.rewards import RewardEnsemble, disagreement
from rlhf_kit.runs import read_stage
from rlhf_kit.tasks import review

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", required=True, help="an SFT stage output (the policy and the reward models' base)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--kl_coef", type=float, default=0.05)
    parser.add_argument("--aggregate", default="mean_minus_std")
    parser.add_argument("--coef", type=float, default=1.0)
    parser.add_argument("--max_steps", type=int, default=90)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4, help="samples per held-out prompt at each evaluation")
    args = parser.parse_args()
    out = Path(args.out)
    ensemble_dir = out / "reward-ensemble"

    if read_stage(ensemble_dir) is None:
        run("recipes/reward.py", "recipes/configs/reward/tiny.yaml", model_name_or_path=args.sft,
            output_dir=ensemble_dir, use_peft="true", learning_rate=1e-3, ensemble_size=args.members)
    runs = {"ppo-single": {"reward_model_path": ensemble_dir / "member-0"},
            "ppo-ensemble": {"reward_model_path": ensemble_dir, "reward_aggregate": args.aggregate,
                         "reward_aggregate_coef": args.coef}}
    for name, reward in runs.items():
        if read_stage(out / name) is None:
            run("recipes/ppo.py", "recipes/configs/ppo/tiny.yaml", model_name_or_path=args.sft, output_dir=out / name,
                kl_coef=args.kl_coef, max_steps=args.max_steps, save_steps=args.every, save_total_limit=100,
                eval_strategy="no", eval_on_start="false", **reward)

    torch.set_num_threads(os.cpu_count() or 1)
    prompts = load_data(REPO / "data/prompts", kind="prompt", split="test")["prompt"][: args.prompts]
    monitor = RewardEnsemble.from_pretrained(str(ensemble_dir), aggregate="mean")
    reference = load_policy(args.sft, "sft")
    start = measure(reference, prompts, monitor, reference, step=0, samples=args.samples)
    results = {name: [start] for name in runs}
    for name in runs:
        for step in range(args.every, args.max_steps + 1, args.every):
            policy = load_policy(str(out / name / f"checkpoint-{step}"), name)
            results[name].append(measure(policy, prompts, monitor, reference, step=step, samples=args.samples))
            print(name, {k: v for k, v in results[name][-1].items() if k != "per_prompt_gold"}, flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    (out / "results.json").write_text(json.dumps({"settings": settings, "runs": results}, indent=2))
    report = table(results) + "\n" + paired_last(results)
    (out / "results.md").write_text(report)
    plot(results, out / "overoptimization.png", args)
    print(report)


def run(script: str, config: str, **overrides) -> None:
    argv = [sys.executable, script, "--config", config]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    subprocess.run(argv, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def measure(policy, prompts, monitor: RewardEnsemble, reference, *, step: int, samples: int) -> dict:
    """Each column per prompt, averaged over `samples` responses (seeds 0..samples-1), then over prompts."""
    columns = {"gold": [], "kl": [], "ensemble_mean": [], "disagreement": []}
    for seed in range(samples):
        result = evaluate_policy(policy, prompts, reference=reference, task=review, max_new_tokens=16,
                                 temperature=0.7, seed=seed)
        members = monitor.score_members_for(prompts, result.responses)  # scored once: mean and spread both from it
        columns["gold"].append(result.per_prompt["gold_score"])
        columns["kl"].append(result.per_prompt["kl_to_reference"])
        columns["ensemble_mean"].append(monitor.combine(members).tolist())
        columns["disagreement"].append(disagreement(members).tolist())
    per_prompt = {name: [sum(values) / samples for values in zip(*runs)] for name, runs in columns.items()}
    row = {"step": step, **{name: sum(values) / len(values) for name, values in per_prompt.items()}}
    return {**row, "gold_se": standard_error(per_prompt["gold"]),
            "disagreement_se": standard_error(per_prompt["disagreement"]), "per_prompt_gold": per_prompt["gold"]}


def paired_last(results: dict) -> str:
    """The ensemble run's last checkpoint against the single model's, prompt by prompt: the difference in gold with
    its standard error (the prompts' own difficulty cancels)."""
    single, ensemble = results["ppo-single"][-1], results["ppo-ensemble"][-1]
    difference = [e - s for e, s in zip(ensemble["per_prompt_gold"], single["per_prompt_gold"])]
    mean, se = sum(difference) / len(difference), standard_error(difference)
    return (f"Last checkpoint (update {single['step']}), ensemble minus single, paired over "
            f"{len(difference)} prompts: gold {mean:+.3f} ± {se:.3f} ({mean / se:+.1f} standard errors).\n")


def table(results: dict) -> str:
    lines = ["| run | update | gold | KL | ensemble mean | disagreement |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['step']} | {r['gold']:+.3f} ± {r['gold_se']:.3f} | {r['kl']:.3f} | "
                         f"{r['ensemble_mean']:+.3f} | {r['disagreement']:.3f} ± {r['disagreement_se']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, png: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gold_ax, spread_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        steps = [r["step"] for r in rows]
        label = ("one reward model" if name == "ppo-single"
                 else f"ensemble of {args.members}, {args.aggregate}" + (f" ({args.coef})" if "std" in args.aggregate
                                                                          else ""))
        gold_ax.errorbar(steps, [r["gold"] for r in rows], yerr=[r["gold_se"] for r in rows], marker="o",
                         capsize=3, label=label)
        spread_ax.plot(steps, [r["disagreement"] for r in rows], marker="o", label=label)
    gold_ax.set(xlabel="PPO update", ylabel="gold score (held-out prompts)", title=f"gold, kl_coef {args.kl_coef}")
    spread_ax.set(xlabel="PPO update", ylabel="std across reward models", title="ensemble disagreement")
    for ax in (gold_ax, spread_ax):
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
