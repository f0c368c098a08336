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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlhf_kit.inference.constraints import Constraint
from rlhf_kit.inference.generation import Generations, Policy, Prompting, Sampling, generate
from rlhf_kit.inference.retrieval import Retriever, with_retrieval
from rlhf_kit.inference.selection import Vote, answer_extractor, majority_vote
from rlhf_kit.inference.tools import generate_with_tools


@dataclass
class EvalResult:
    """One model's row: the metrics, its responses, and each metric's value per prompt (for standard errors and paired
    differences between rows that answered the same prompts)."""

    name: str
    metrics: dict[str, float]
    responses: list[str] = field(default_factory=list)
    per_prompt: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self):
        for column, values in self.per_prompt.items():
            self.metrics.setdefault(f"{column}{SE}", standard_error(values))


SE = "_se"  # suffix of a metric's standard error in EvalResult.metrics (and report.json)


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of per-prompt values: sample std (n - 1) / sqrt(n); 0 for fewer than two."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def paired_difference(a: EvalResult, b: EvalResult, column: str) -> tuple[float, float]:
    """Mean of a - b over the prompts both rows answered, and its standard error (paired: the same prompts)."""
    diffs = [x - y for x, y in zip(a.per_prompt[column], b.per_prompt[column])]
    return sum(diffs) / len(diffs), standard_error(diffs)


def task_per_prompt(task, prompts: list, responses: list[str]) -> dict[str, list[float]]:
    """The task's columns for each prompt alone (its metrics are means over prompts, so these average to them).
    A column that some prompts do not have (exact match on one kind of question) has no per-prompt values."""
    rows = [task.metrics([p], [r]) for p, r in zip(prompts, responses)]
    return {column: [float(row[column]) for row in rows] for column in rows[0]
            if all(column in row for row in rows)} if rows else {}


@dataclass
class Assistance:
    """What a model is given besides the prompt: the top-k passages a retriever finds for it, and tools it may call
    (plain functions, `rlhf_kit.tools.load_tools`) up to `max_tool_rounds` times. The default gives nothing."""

    retriever: Retriever | None = None
    top_k: int = 3
    tools: Sequence = ()
    max_tool_rounds: int = 3
    tool_timeout: float = 5.0

    def sample(self, policy: Policy, prompts: list, sampling: Sampling, prompting: Prompting | None = None,
               logits_processor=None) -> Generations:
        """`sampling.n` responses per prompt, each the final answer after any tool rounds."""
        given = with_retrieval(prompts, self.retriever, self.top_k) if self.retriever is not None else prompts
        if not self.tools:
            return generate(policy, given, sampling=sampling, prompting=prompting, logits_processor=logits_processor)
        return generate_with_tools(policy, given, tools=list(self.tools), sampling=sampling, prompting=prompting,
                                   max_tool_rounds=self.max_tool_rounds, timeout=self.tool_timeout,
                                   logits_processor=logits_processor)


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
                    task=None, max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
                    prompting: Prompting | None = None, stop: Sequence[str] = (), name: str | None = None,
                    constraint: Constraint | None = None, assistance: Assistance | None = None) -> EvalResult:
    """Sample one response per prompt and measure it: length and stops always, the reward model's score, the KL to
    `reference` and the columns of `task` (`task_loading.load_task`) when given, each with its standard error.
    `prompting` (a system message, template, few-shot examples, raw document mode) and `stop` strings are
    generation's.

    With a `constraint` (`Constraint.from_options`) every response is generated to match it, and
    `constraint_complete_rate` says how many do: those that max_new_tokens cut short do not. The KL is then that of
    the two unconstrained models on the constrained samples.

    With `assistance` (retrieved passages, tools), the task, the reward model and the win rates judge the final
    answer to the prompt as given; `response_tokens` counts the tokens generated over every tool round, and
    `tool_calls` is the mean number of calls per response. The KL is left out where tools were called: the final
    turn's log-probabilities alone would not be the KL of the whole exchange."""
    assistance = assistance or Assistance()
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=stop)
    processors = constraint.logits_processor(policy) if constraint is not None else None
    gens = assistance.sample(policy, prompts, sampling, prompting, processors)
    tokens = getattr(gens, "generated_tokens", None) or [len(ids) for ids in gens.response_ids]
    per_prompt = {**(task_per_prompt(task, prompts, gens.responses) if task is not None else {}),
                  "response_tokens": [float(t) for t in tokens],
                  "stop_rate": [float(x) for x in gens.stopped]}
    if assistance.tools:
        per_prompt["tool_calls"] = [float(x) for x in gens.tool_calls]
    if constraint is not None:
        per_prompt["constraint_complete_rate"] = [float(x) for x in constraint.complete(policy, gens.response_ids)]
    # The task's own metrics as it defines them; the counts and rates are the means of their per-prompt values.
    metrics = {**(task.metrics(prompts, gens.responses) if task is not None else {}),
               **{column: sum(per_prompt[column]) / len(prompts)
                  for column in ("response_tokens", "stop_rate", "constraint_complete_rate", "tool_calls")
                  if column in per_prompt}}
    if reward_model is not None:
        scores = reward_model.score_texts_for(prompts, gens.responses)
        metrics["reward_model_score"] = scores.mean().item()
        per_prompt["reward_model_score"] = scores.tolist()
    if reference is not None and not assistance.tools:
        pad = policy.tokenizer.pad_token_id
        scale = temperature if temperature > 0 else 1.0  # greedy decoding: report the temperature-1 KL
        own = sequence_logprobs(policy.model, gens.prompt_ids, gens.response_ids, pad, temperature=scale)
        ref = sequence_logprobs(reference.model, gens.prompt_ids, gens.response_ids, pad, temperature=scale)
        metrics["kl_to_reference"] = (own - ref).mean().item()
        per_prompt["kl_to_reference"] = (own - ref).tolist()
    return EvalResult(name or policy.name, metrics, gens.responses, per_prompt)


@dataclass
class VoteResult(EvalResult):
    """The majority-vote row of `evaluate_self_consistency`: besides the kept responses, each prompt's vote and its n
    samples, from which every number of the three rows can be recomputed."""

    votes: list[Vote] = field(default_factory=list)
    samples: list[list[str]] = field(default_factory=list)


def evaluate_self_consistency(policy: Policy, prompts: list, *, task, n: int = 8, answer_pattern: str | None = None,
                              max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
                              assistance: Assistance | None = None, name: str | None = None) -> list[EvalResult]:
    """Exact match of one sampled answer against the majority vote over `n` (self-consistency, Wang et al. 2022,
    https://arxiv.org/abs/2203.11171), for a `task` whose metrics include ``exact_match``. Three rows, all read from
    the same `n` samples per prompt, so their differences are paired by prompt:

    - ``<policy>_one_sample``: each prompt's first sample, what sampling once gives;
    - ``<policy>_first_answer_of_<n>``: each prompt's first sample with an answer (`answer_extractor(answer_pattern)`
      finds one), what resampling until the answer is readable gives. A vote skips unreadable samples too, so the
      vote's gain over this row is the part that the majority itself brings;
    - ``<policy>_vote_of_<n>``: the sample `majority_vote` keeps, with ``gain_vs_one_sample`` and
      ``gain_vs_first_answer`` (each with its paired standard error) and ``pass_at_n``, the share of prompts where any
      sample is right: the most any way of choosing among them could reach.

    Every task column has its standard error (`standard_error`: for a 0/1 exact match, sqrt(p (1 - p) / (N - 1))).
    With `assistance`, each sample is a whole exchange with the passages and tools, and its final answer votes; the
    rows are then named after `name` (the policy's name by default).
    """
    if n < 2:
        raise ValueError(f"self-consistency votes among n >= 2 samples, got n={n}")
    extract = answer_extractor(answer_pattern)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, n=n)
    groups = (assistance or Assistance()).sample(policy, prompts, sampling).grouped()
    votes = [majority_vote([extract(r) for r in group]) for group in groups]
    picks = {"one_sample": [group[0] for group in groups],
             f"first_answer_of_{n}": [next((r for r in group if extract(r) is not None), group[0]) for group in groups],
             f"vote_of_{n}": [group[vote.index] for group, vote in zip(groups, votes)]}
    rows = []
    for label, responses in picks.items():
        row_type = VoteResult if label.startswith("vote") else EvalResult
        rows.append(row_type(f"{name or policy.name}_{label}", task.metrics(prompts, responses), responses,
                             task_per_prompt(task, prompts, responses)))
    if "exact_match" not in rows[0].metrics:
        raise ValueError(f"task {task.__name__} reports no exact_match, which self-consistency measures; its metrics "
                         f"are {sorted(rows[0].metrics)}")
    one, first_answer, vote = rows
    vote.votes, vote.samples = votes, groups
    for baseline, row in (("one_sample", one), ("first_answer", first_answer)):
        vote.metrics[f"gain_vs_{baseline}"], vote.metrics[f"gain_vs_{baseline}{SE}"] = paired_difference(
            vote, row, "exact_match")
    vote.metrics["pass_at_n"] = sum(any(task.metrics([p], [r])["exact_match"] for r in group)
                                    for p, group in zip(prompts, groups)) / len(prompts)
    return rows


def win_rate(prompts: list, ours: list[str], theirs: list[str], judge) -> float:
    """Share of prompts where `judge(prompt, response)` prefers ours; ties count one half."""
    wins = 0.0
    for p, a, b in zip(prompts, ours, theirs):
        sa, sb = judge(p, a), judge(p, b)
        wins += 1.0 if sa > sb else 0.5 if sa == sb else 0.0
    return wins / len(prompts)


def format_table(results: list[EvalResult], columns: list[str]) -> str:
    """A Markdown table, one row per model; a value with a standard error reads `0.123 ± 0.045`."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in results:
        cells = [("-" if c not in r.metrics else f"{r.metrics[c]:.3f}" +
                  (f" ± {r.metrics[c + SE]:.3f}" if c + SE in r.metrics else "")) for c in columns]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
