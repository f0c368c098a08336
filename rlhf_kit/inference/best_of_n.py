"""Best-of-N (rejection) sampling: N completions per prompt from a policy, scored by the reward model and/or reward
functions; the best one is kept.

    policy = load_policy("outputs/tiny/sft")
    funcs, weights, _ = load_reward_functions(RewardSources(reward_model_path="outputs/tiny/reward"), policy.tokenizer)
    picks = best_of_n(policy, prompts, n=4, reward_funcs=funcs, weights=weights)    # inference-time improvement
    write_best_of_n(policy, prompts, "outputs/bon", n=4, reward_funcs=funcs, weights=weights)  # a new SFT dataset

Used at inference, best-of-N improves a policy without training it; the KL from the policy it samples from is at
most log N - (N - 1) / N nats (Stiennon et al. 2020, https://huggingface.co/papers/2009.01325; Beirami et al. 2024,
https://huggingface.co/papers/2401.01879), the value the pipeline report gives it. Written as a dataset, the best
completions become SFT data: rejection-sampling fine-tuning. One iteration is best-of-N, then the SFT recipe on the
written directory (`dataset_name: <output_dir>`); the next iteration samples from that SFT output, and so on.

`write_best_of_n` writes `<output_dir>/train.jsonl` one chunk of prompts at a time, in prompt order, so a rerun
resumes after the last complete row. Each chunk is sampled with its own seed (`seed + index of its first prompt`), so
a resumed file is the file an uninterrupted run writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_kit.inference.generation import Generations, Policy, Sampling, generate
from rlhf_kit.rewards import as_completions, call_reward_func
from rlhf_kit.vllm_engine import check_backend, require_vllm

DATA_FILE = "train.jsonl"


@dataclass
class BestOfNArguments:
    """The best-of-N stage: sampling, selection and where the dataset goes (the reward keys are `RewardSources`')."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Directory for train.jsonl (an SFT dataset), the config and stage record."}
    )
    n: int = field(default=4, metadata={"help": "Completions sampled per prompt; the best one is kept."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most new tokens per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (plain softmax sampling)."})
    batch_size: int = field(
        default=64, metadata={"help": "Sequences per generate() call; a chunk is batch_size // n prompts."}
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first this many prompts."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward source, the reward model first; default 1 each."}
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed (each chunk adds the index of its first prompt)."})
    generation_backend: str = field(
        default="hf", metadata={"help": "What samples: transformers' generate (hf) or a vLLM engine (vllm, needs the "
                                "[vllm] extra)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir is required: the directory that receives train.jsonl")
        check_backend(self.generation_backend)
        if self.generation_backend == "vllm":
            require_vllm()
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}: N greedy completions are all the same")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")


@dataclass
class Pick:
    """One prompt's N completions, their weighted scores, each reward source's scores, and which one won."""

    prompt: Any
    completions: list[str]
    scores: list[float]
    components: dict[str, list[float]]
    best: int
    lengths: list[int]  # tokens of each completion, its stop token included
    stopped: list[bool]  # whether each completion emitted a stop token

    @property
    def response(self) -> str:
        return self.completions[self.best]


def best_of_n(policy: Policy, prompts: list, *, n: int, reward_funcs: list, weights: list[float],
              columns: dict[str, list] | None = None, max_new_tokens: int = 64, temperature: float = 1.0,
              batch_size: int = 64, seed: int = 0) -> list[Pick]:
    """Sample `n` completions for each prompt (num_return_sequences=n, `batch_size // n` prompts per generate()
    call) and pick the one with the highest weighted reward; ties go to the first sampled. `columns` are extra dataset
    columns, one value per prompt, handed to the reward functions as TRL's trainers hand them (with `completion_ids`).
    """
    if len(reward_funcs) != len(weights):
        raise ValueError(f"{len(reward_funcs)} reward functions but {len(weights)} weights")
    sampling = Sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed)
    gens = generate(policy, prompts, sampling=sampling, progress=False)
    return rerank(gens, reward_funcs=reward_funcs, weights=weights, columns=columns)


def rerank(gens: Generations, *, reward_funcs: list, weights: list[float],
           columns: dict[str, list] | None = None) -> list[Pick]:
    """Score the `gens.n` responses of each prompt with the weighted reward functions and pick the best of each
    (ties: the first sampled). The scoring half of `best_of_n`, for responses sampled with any settings."""
    if len(reward_funcs) != len(weights):
        raise ValueError(f"{len(reward_funcs)} reward functions but {len(weights)} weights")
    prompts, n = gens.prompts, gens.n
    repeated = [p for p in prompts for _ in range(n)]  # (P * n), the n samples of a prompt side by side
    completions = as_completions(repeated, gens.responses)
    extra = {k: [v for v in values for _ in range(n)] for k, values in (columns or {}).items()}
    extra["completion_ids"] = gens.response_ids  # the stop token kept, as the missing-stop penalty needs
    components, total = {}, torch.zeros(len(repeated))
    for func, weight in zip(reward_funcs, weights):
        values = call_reward_func(func, repeated, completions, extra)
        components[getattr(func, "__name__", repr(func))] = values.view(len(prompts), n).tolist()
        total += weight * values
    total = total.view(len(prompts), n)  # (P, n)
    best = total.argmax(dim=1).tolist()  # argmax returns the first of equal maxima
    return [Pick(prompt, gens.responses[i * n : (i + 1) * n], total[i].tolist(),
                 {name: rows[i] for name, rows in components.items()}, best[i],
                 [len(ids) for ids in gens.response_ids[i * n : (i + 1) * n]], gens.stopped[i * n : (i + 1) * n])
            for i, prompt in enumerate(prompts)]


def sft_row(prompt, response: str) -> dict[str, Any]:
    """A dataset row in the SFT formats rlhf_kit.data.loading reads: `messages` for a conversation, prompt/completion else."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": response}
    return {"messages": [*prompt, {"role": "assistant", "content": response}]}


def completed_rows(path: Path) -> int:
    """Rows already written; a last line cut off mid-write (no newline) is dropped from the file."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        path.write_bytes(keep)
    return keep.count(b"\n")


def write_best_of_n(policy: Policy, dataset, output_dir: str | Path, *, n: int, reward_funcs: list,
                    weights: list[float], max_new_tokens: int = 64, temperature: float = 1.0, batch_size: int = 64,
                    seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Best-of-N over a prompt dataset (a `prompt` column plus any extra columns), appended to
    `<output_dir>/train.jsonl`; resumes after the rows already there. Returns the run's summary metrics."""
    out = Path(output_dir) / DATA_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    done = completed_rows(out)
    if done > len(dataset):
        raise ValueError(f"{out} has {done} rows but there are only {len(dataset)} prompts: it was written from "
                         "other prompts; use another output_dir")
    chunk = max(1, batch_size // n)
    totals: dict[str, float] = {"best": 0.0, "mean": 0.0, "count": 0}
    bar = tqdm(total=len(dataset), initial=done, desc=f"best-of-{n}", unit="prompt", disable=not progress)
    # Chunks keep fixed boundaries (multiples of `chunk`) and seeds, so a rerun regenerates a partly written chunk
    # exactly and only appends the rows that are missing.
    for start in range(done - done % chunk, len(dataset), chunk):
        rows = dataset[start : start + chunk]
        columns = {k: v for k, v in rows.items() if k != "prompt"}
        picks = best_of_n(policy, rows["prompt"], n=n, reward_funcs=reward_funcs, weights=weights, columns=columns,
                          max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
                          seed=seed + start)
        with out.open("a") as f:
            for index, pick in enumerate(picks, start):
                if index >= done:
                    f.write(json.dumps(sft_row(pick.prompt, pick.response)) + "\n")
        for pick in picks[max(0, done - start):]:
            totals["best"] += pick.scores[pick.best]
            totals["mean"] += sum(pick.scores) / n
            totals["count"] += 1
            for name, values in pick.components.items():  # each source's score of the picked completion
                totals[f"best/{name}"] = totals.get(f"best/{name}", 0.0) + values[pick.best]
        bar.update(len(picks) - max(0, done - start))
    bar.close()
    count = max(totals["count"], 1)
    return {"rows": completed_rows(out), "new_rows": totals["count"], "n": n,
            "best_score": totals["best"] / count, "mean_score": totals["mean"] / count, "kl_bound": kl_bound(n),
            **{k: v / count for k, v in totals.items() if k.startswith("best/")}}


def kl_bound(n: int) -> float:
    """KL(best-of-n || policy) <= log n - (n - 1) / n, in nats: the upper bound, reached by continuous rewards."""
    return math.log(n) - (n - 1) / n


def evaluate_best_of_n(policy: Policy, prompts: list, *, n: int, reward_model, missing_eos_penalty: float | None = None,
                       task=None, max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
                       name: str | None = None):
    """Best-of-`n` of `policy` at inference, judged by `reward_model` (a RewardModel), as an evaluation row with
    the columns `evaluation.evaluate_policy` gives a trained policy. Its KL to `policy` is the analytic bound
    `kl_bound(n)`; its reward-model score is that of the picked completions, so it is optimistic by construction:
    the gold score says what the picks are worth. `task` (`task_loading.load_task`) adds its own columns."""
    from rlhf_kit.inference.evaluation import EvalResult, task_per_prompt
    from rlhf_kit.model import stop_token_ids
    from rlhf_kit.rewards import MissingStopPenalty, RewardModelFunction

    funcs = [RewardModelFunction(reward_model)]
    if missing_eos_penalty:
        funcs.append(MissingStopPenalty(stop_token_ids(policy.tokenizer, policy.model), missing_eos_penalty))
    picks = best_of_n(policy, prompts, n=n, reward_funcs=funcs, weights=[1.0] * len(funcs),
                      max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    responses = [p.response for p in picks]
    per_prompt = {**(task_per_prompt(task, prompts, responses) if task is not None else {}),
                  "response_tokens": [float(p.lengths[p.best]) for p in picks],
                  "stop_rate": [float(p.stopped[p.best]) for p in picks],
                  "reward_model_score": [p.components["reward_model"][p.best] for p in picks]}
    metrics = {
        **(task.metrics(prompts, responses) if task is not None else {}),
        "response_tokens": sum(per_prompt["response_tokens"]) / len(prompts),
        "stop_rate": sum(per_prompt["stop_rate"]) / len(prompts),
        "reward_model_score": sum(per_prompt["reward_model_score"]) / len(prompts),
        "kl_to_reference": kl_bound(n),
    }
    return EvalResult(name or f"best_of_{n}", metrics, responses, per_prompt)
