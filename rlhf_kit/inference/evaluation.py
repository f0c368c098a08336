"""Evaluating policies on held-out prompts: reward-model score, KL to a reference, length, stops, win rates, and the
columns of a task with a gold annotator when one is named.

    result = evaluate_policy(load_policy("outputs/tiny/ppo"), prompts, reward_model=rm,
                             reference=load_policy("outputs/tiny/sft"), task=load_task("rlhf_kit.tasks.review"))

Responses are *sampled* (with a fixed seed) at a temperature T, 1 by default; give PPO's sampling temperature to
score each policy on the distribution PPO optimized. KL is that of the sampling distributions, as PPO measures it:
per prompt, sum_t log pi_T(y_t) - log ref_T(y_t) over the sampled response tokens with both models' logits divided
by T (the k1 estimator, unbiased for KL(pi_T || ref_T)).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from rlhf_kit.inference.generation import Policy, Sampling, generate


@dataclass
class EvalResult:
    name: str
    metrics: dict[str, float]
    responses: list[str] = field(default_factory=list)


def load_task(name: str | None):
    """The task module `name` names (see `rlhf_kit.tasks`), checked for what evaluation calls; None for none."""
    if not name:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"task '{name}' cannot be imported ({e}); a task is a module path, such as "
                         "rlhf_kit.tasks.review") from None
    missing = [f for f in ("metrics", "gold_score") if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"task module '{name}' has no {' or '.join(missing)} function; a task provides "
                         "metrics(prompts, responses) and gold_score(prompt, response) (see rlhf_kit.tasks)")
    return module


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                      batch_size: int = 32, temperature: float = 1.0) -> torch.Tensor:
    """Sum of log p(response token | prefix) per sample, with the logits divided by `temperature`. (N,)"""
    totals = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [p + r for p, r in zip(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size])]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=model.device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, width-1): log p(ids[t+1] | ids[:t+1])
        for i, (p, r) in enumerate(zip(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size])):
            totals.append(token_logp[i, len(p) - 1 : len(p) - 1 + len(r)].sum().item())
    return torch.tensor(totals)


def evaluate_policy(policy: Policy, prompts: list, *, reward_model=None, reference: Policy | None = None,
                    task=None, max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0) -> EvalResult:
    """Sample one response per prompt and measure it: length and stops always, the reward model's score, the KL to
    `reference` and the columns of `task` (`load_task`) when given."""
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    gens = generate(policy, prompts, sampling=sampling)
    metrics = {
        **(task.metrics(prompts, gens.responses) if task is not None else {}),
        "response_tokens": sum(map(len, gens.response_ids)) / len(prompts),
        "stop_rate": sum(gens.stopped) / len(prompts),
    }
    if reward_model is not None:
        metrics["reward_model_score"] = reward_model.score_texts_for(prompts, gens.responses).mean().item()
    if reference is not None:
        pad = policy.tokenizer.pad_token_id
        scale = temperature if temperature > 0 else 1.0  # greedy decoding: report the temperature-1 KL
        own = sequence_logprobs(policy.model, gens.prompt_ids, gens.response_ids, pad, temperature=scale)
        ref = sequence_logprobs(reference.model, gens.prompt_ids, gens.response_ids, pad, temperature=scale)
        metrics["kl_to_reference"] = (own - ref).mean().item()
    return EvalResult(policy.name, metrics, gens.responses)


def win_rate(prompts: list, ours: list[str], theirs: list[str], judge) -> float:
    """Share of prompts where `judge(prompt, response)` prefers ours; ties count one half."""
    wins = 0.0
    for p, a, b in zip(prompts, ours, theirs):
        sa, sb = judge(p, a), judge(p, b)
        wins += 1.0 if sa > sb else 0.5 if sa == sb else 0.0
    return wins / len(prompts)


def format_table(results: list[EvalResult], columns: list[str]) -> str:
    """A Markdown table, one row per model."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in results:
        cells = [f"{r.metrics[c]:.3f}" if c in r.metrics else "-" for c in columns]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
