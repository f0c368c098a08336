"""Batch inference: responses to every prompt of a dataset, K samples each and one of them selected, as rows or as a
resumable JSONL file. `rlhf-kit generate` is this module behind a command line.

    rows = generate_responses("outputs/tiny/sft", ["Review the coffee."], n=8, select="vote")
    generate_file("outputs/tiny/sft", load_data("data/prompts", kind="prompt", split="test"), "out.jsonl", n=4,
                  select="reward", reward_model="outputs/tiny/reward")

Selection among the K samples of a prompt (all K drawn in one batched generate call, `num_return_sequences`):
    first   the first sample (with K = 1: plain sampling, as `evaluation.evaluate_policy` samples)
    reward  best-of-N at inference: the highest weighted score of the reward model and/or reward functions
            (`best_of_n.rerank`); ties go to the first sampled
    vote    self-consistency: the majority answer (`selection.majority_vote`; the answer is extracted by a regex or
            a `module:function`, else the whole response); ties go to the answer sampled first, and the response
            kept is the first sample that gave it. It needs K >= 2 (a vote of one is the first sample): K = 1 is
            refused rather than silently meaning `first`.

Prompts are processed in chunks of `batch_size // n` prompts (one generate call each), and chunk i is sampled with
seed `seed + index of its first prompt`, as `best_of_n.write_best_of_n` does: rows are appended chunk by chunk, so an
interrupted file resumes after its last complete row (a half-written last line is dropped and redone) and ends up
byte for byte the file an uninterrupted run writes. The first chunk is seeded with `seed` itself, so with K = 1,
`first` and the same seed, each chunk's responses are those `evaluate_policy(chunk, seed=seed + start)` samples.
`<output>.meta.json` records the settings and prompts a file was written from; a rerun with others is refused.

Reflection (`reflect=K`): after a response is kept, a judge says whether it meets the request. By default the judge
is the model itself, asked REFLECT_QUESTION after its answer, its reply greedy and held to "yes" or "no" by a
constraint; with `reflect_min_score=X` and select reward, the kept response's reward score is the judge (passes at
>= X). On "no" the prompt is sampled again (all n samples, selected as before, with a fixed seed per retry), up to K
times; each row's `reflection` lists every response it kept, with its verdict (and score), the last one its final
`response`. A model that has not learned to judge its own answers (the tiny one) says what it says: the reward score
is the more reliable judge where there is a reward model.

Tools (`tools=[module, ...]`, `--tools`): each sample is a trajectory that may call them, up to `max_tool_rounds`
rounds (`inference.tools.generate_with_tools`); selection works on the final answers, and each row keeps the kept
sample's exchange with the tools (`messages`, `tool_calls`). The tool settings and schemas are recorded in the meta.

With `raw=True` (base models: no chat template, the prompt is a document to continue, few-shot examples written
before it as "question\\nanswer" paragraphs) and no `stop`, a response ends at the first newline (`RAW_STOP`): the
examples teach a one-line answer, and a base model would otherwise go on to write the next question itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlhf_kit.data.loading import RowError, validate_row
from rlhf_kit.errors import UserError
from rlhf_kit.inference.best_of_n import completed_rows, rerank
from rlhf_kit.inference.generation import (Conversation, Policy, Prompting, Sampling, check_template, generate,
                                          load_few_shot, load_policy, with_documents)
from rlhf_kit.inference.retrieval import Retriever, with_retrieval
from rlhf_kit.inference.selection import answer_extractor, majority_vote
from rlhf_kit.inference.tools import ToolUse, generate_with_tools
from rlhf_kit.model import load_tokenizer, prepare_tokenizer
from rlhf_kit.rewards import RewardSources, import_reward_func, load_reward_functions
from rlhf_kit.rewards import reward_weights as check_reward_weights
from rlhf_kit.vllm_engine import check_backend, require_vllm

SELECT = ("first", "reward", "vote")
RAW_STOP = ("\n",)  # the default stop of raw prompting: one-line answers
META_SUFFIX = ".meta.json"


@dataclass
class Selection:
    """How the one response of a prompt is chosen among its samples (see the module docstring)."""

    mode: str = "first"
    reward_model: str | None = None  # a reward stage output (select reward)
    reward_funcs: Sequence[str] = ()  # 'module:function' reward functions (select reward)
    reward_weights: Sequence[float] | None = None  # one per source, the reward model first; default 1 each
    answer_pattern: str | None = None  # a regex or 'module:function' (select vote); None: the whole response

    def check(self, n: int) -> None:
        """The choice makes sense with `n` samples and its options are given where they are used, else UserError."""
        if self.mode not in SELECT:
            raise UserError(f"select must be one of {', '.join(SELECT)}, got {self.mode!r}")
        rewarded = bool(self.reward_model or self.reward_funcs)
        if self.mode == "reward" and not rewarded:
            raise UserError("select reward needs a reward source: a reward model (--reward_model, a reward stage "
                            "output) and/or reward functions (--reward_funcs module:function ...)")
        if self.mode != "reward" and (rewarded or self.reward_weights):
            raise UserError(f"reward models, functions and weights are only used with select reward (select is "
                            f"{self.mode})")
        if self.mode == "vote" and n < 2:
            raise UserError(f"select vote needs n >= 2 samples per prompt to vote among (got n={n}); a vote of one "
                            "sample is just that sample")
        if self.mode != "vote" and self.answer_pattern is not None:
            raise UserError(f"an answer pattern is only used with select vote (select is {self.mode})")


@dataclass
class Reflection:
    """A second look at each kept response (see the module docstring): up to `rounds` new draws for a prompt whose
    response the judge rejects. The judge is the model itself, asked REFLECT_QUESTION after its answer and held to
    "yes" or "no"; with `min_score` (select reward) it is the kept response's reward score instead."""

    rounds: int = 0
    min_score: float | None = None

    def check(self, selection: Selection, prompting: Prompting) -> None:
        if self.rounds < 0:
            raise UserError(f"reflect (rounds of retries) must be >= 0, got {self.rounds}")
        if self.min_score is not None and (selection.mode != "reward" or not self.rounds):
            raise UserError("reflect_min_score makes the reward score the judge of a reflection: it needs select "
                            "reward and reflect >= 1")
        if self.rounds and self.min_score is None and prompting.raw:
            raise UserError("a base model prompted as a raw document cannot be asked about its answer: drop --raw, "
                            "or judge by the reward score (select reward with --reflect_min_score)")


# Asked after the model's answer when the model is its own judge; its reply is held to "yes" or "no".
REFLECT_QUESTION = "Does your answer fully meet the request? Answer yes or no."
# Retry r of the chunk starting at prompt i is sampled with seed + i + r * RETRY_SEEDS: fixed, so a file resumes.
RETRY_SEEDS = 1_000_003


@dataclass
class Job:
    """Everything that decides the rows: checked as a whole, before any model loads, and recorded with a file."""

    sampling: Sampling
    prompting: Prompting
    selection: Selection
    constraint: Any = None  # rlhf_kit.inference.constraints.Constraint, or None
    extract: Any = field(default=None, repr=False)  # the vote's answer extractor, built by `make_job`
    reflection: Reflection = field(default_factory=Reflection)
    retriever: Retriever | None = field(default=None, repr=False)  # passages put into every prompt (`retrieval`)
    top_k: int = 3  # passages per prompt
    tool_use: ToolUse = field(default_factory=ToolUse)
    tools: list = field(default_factory=list, repr=False)  # the loaded tool functions, by `make_job`
    generation_backend: str = "hf"  # "vllm": a vLLM engine samples (rlhf_kit.vllm_engine)

    @property
    def chunk(self) -> int:
        return max(1, self.sampling.batch_size // self.sampling.n)

    def settings(self) -> dict[str, Any]:
        sampling, prompting = asdict(self.sampling), asdict(self.prompting)
        sampling["stop"], prompting["few_shot"] = list(sampling["stop"]), [list(p) for p in prompting["few_shot"]]
        selection = {**asdict(self.selection), "reward_funcs": list(self.selection.reward_funcs)}
        # A constraint is recorded by its repr, memory addresses left out (they differ from run to run).
        constraint = None if self.constraint is None else re.sub(r" at 0x[0-9a-fA-F]+", "", repr(self.constraint))
        settings = {"sampling": sampling, "prompting": prompting, "selection": selection, "constraint": constraint}
        if self.reflection.rounds:  # only when used: files written before reflection existed still resume
            settings["reflection"] = asdict(self.reflection)
        if self.retriever is not None:  # the corpus by its path and content (the index key): an edit is a change
            r = self.retriever
            settings["retrieval"] = {"corpus": str(Path(r.corpus).resolve()), "method": r.method, "index_key": r.key,
                                     "top_k": self.top_k}
        if self.tools:  # only when used, as reflection
            settings["tools"] = self.tool_use.settings(self.tools)
        if self.generation_backend != "hf":  # another sampler draws other samples: a resumed file must not mix them
            settings["generation_backend"] = self.generation_backend
        return settings

    def conversations(self, prompts: list) -> list:
        """The prompts as the model is given them: with their top-k passages when retrieving."""
        return prompts if self.retriever is None else with_retrieval(prompts, self.retriever, self.top_k)


def make_job(*, n: int = 1, select: str = "first", max_new_tokens: int = 64, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 32, stop: Sequence[str] = (),
             system: str | None = None, template: str | None = None,
             few_shot: Sequence[tuple[str, str]] | str | Path = (), raw: bool = False, reward_model: str | None = None,
             reward_funcs: Sequence[str] = (), reward_weights: Sequence[float] | None = None,
             answer_pattern: str | None = None, constraint=None, reflect: int = 0,
             reflect_min_score: float | None = None, retrieve: Retriever | str | Path | None = None,
             top_k: int | None = None, tools: Sequence[str] = (), max_tool_rounds: int = 3,
             tool_timeout: float = 5.0, generation_backend: str = "hf") -> Job:
    """The checked settings of a run; any mistake raises ValueError here, before a model loads. `few_shot` is a list
    of (prompt, completion) pairs or a JSONL file of prompt/completion rows (`generation.load_few_shot`). `retrieve`:
    a Retriever or a corpus path (`Retriever.from_corpus`), whose `top_k` (default 3) passages go into each prompt."""
    if n < 1:
        raise UserError(f"n (samples per prompt) must be >= 1, got {n}")
    if top_k is not None and (retrieve is None or top_k < 1):
        raise UserError(f"top_k is the number of passages retrieved per prompt: it needs a corpus to retrieve from "
                        f"(--retrieve) and must be >= 1, got {top_k}")
    if isinstance(retrieve, (str, Path)):
        retrieve = Retriever.from_corpus(retrieve)
    if isinstance(few_shot, (str, Path)):
        few_shot = load_few_shot(few_shot)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed,
                        batch_size=batch_size, stop=tuple(stop) or (RAW_STOP if raw else ()))
    prompting = Prompting(system=system, template=template, few_shot=tuple(map(tuple, few_shot)), raw=raw)
    selection = Selection(select, reward_model, tuple(reward_funcs), reward_weights, answer_pattern)
    selection.check(n)
    if selection.mode == "reward":  # imported and counted now: a typo fails here, not after the models load
        check_reward_weights(bool(reward_model), [import_reward_func(f) for f in reward_funcs], reward_weights)
    extract = answer_extractor(answer_pattern) if selection.mode == "vote" else None
    reflection = Reflection(reflect, reflect_min_score)
    reflection.check(selection, prompting)
    tool_use = ToolUse(tuple(tools), max_tool_rounds, tool_timeout)
    try:
        check_backend(generation_backend)
    except ValueError as e:
        raise UserError(str(e)) from None
    if generation_backend == "vllm":
        if constraint is not None:
            raise UserError("constrained output (--regex, --json_schema, --choices) runs on the transformers backend "
                            "only; drop --generation_backend vllm or the constraint")
        require_vllm()
    return Job(sampling, prompting, selection, constraint, extract, reflection, retrieve, top_k or 3, tool_use,
               tool_use.load(prompting), generation_backend)


def read_template(path: str | Path) -> str:
    """A prompt template from a text file ("You are an expert reviewer. {prompt}"); the file's final newline is not
    part of it. A template without exactly one `{prompt}` field is refused, naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"prompt template file {path} cannot be read: {e}") from None
    text = text[:-1] if text.endswith("\n") else text
    try:
        check_template(text)
    except ValueError as e:
        raise UserError(f"prompt template file {path}: {e}") from None
    return text


def _columns(prompts) -> tuple[list, dict[str, list]]:
    """The prompts and their extra columns (which reward functions receive), from a list or a prompt dataset; a
    list is checked as a prompt file's rows are (a string, or chat messages ending with a user turn)."""
    if isinstance(prompts, (list, tuple)):
        for i, prompt in enumerate(prompts):
            try:
                validate_row({"prompt": prompt}, "prompt" if isinstance(prompt, str) else "prompt_conversational")
            except RowError as e:
                raise UserError(f"prompts[{i}]: {e}") from None
        return list(prompts), {}
    table = prompts.to_dict() if hasattr(prompts, "column_names") else prompts  # a Dataset, or {column: values}
    if not isinstance(table, dict) or "prompt" not in table:
        one = " (one prompt: put it in a list)" if isinstance(prompts, str) else ""
        raise UserError(f"prompts must be a list of prompts or a dataset with a 'prompt' column, got "
                        f"{type(prompts).__name__}{one}")
    return list(table["prompt"]), {k: list(v) for k, v in table.items() if k != "prompt"}


def _load(model: str | Policy, job: Job) -> tuple[Policy, list, list[float]]:
    """The policy and, for select reward, its reward functions and weights (the reward model gated before the
    policy loads: a failing gate costs a tokenizer load, not a model load)."""
    funcs, weights = [], []
    if job.selection.mode == "reward":
        tokenizer = model.tokenizer if isinstance(model, Policy) else load_tokenizer(model)
        if not isinstance(model, Policy):
            prepare_tokenizer(tokenizer)
        sources = RewardSources(reward_model_path=job.selection.reward_model,
                                reward_funcs=list(job.selection.reward_funcs))
        funcs, weights, _ = load_reward_functions(sources, tokenizer, weights=job.selection.reward_weights)
    policy = model if isinstance(model, Policy) else load_policy(model, backend=job.generation_backend)
    return policy, funcs, weights


def _chunks(policy: Policy, prompts: list, columns: dict[str, list], job: Job, funcs: list, weights: list[float],
            first: int = 0):
    """(start, rows, generated tokens) per chunk of prompts, from the chunk holding prompt `first` on."""
    processors = None if job.constraint is None else job.constraint.logits_processor(policy)
    for start in range(first - first % job.chunk, len(prompts), job.chunk):
        batch = prompts[start : start + job.chunk]
        given = job.conversations(batch)
        extra = {k: v[start : start + job.chunk] for k, v in columns.items()}
        rows, tokens = _rows(policy, given, extra, job, funcs, weights, processors, job.sampling.seed + start)
        if job.reflection.rounds:
            tokens += _reflect(policy, given, extra, rows, job, funcs, weights, processors, job.sampling.seed + start)
        if job.retriever is not None:  # the prompt as given, and the passages it was answered from
            for row, prompt, conversation in zip(rows, batch, given):
                row.update(prompt=prompt, passages=[{k: d[k] for k in ("text", "title", "source", "score")}
                                                    for d in conversation.documents])
        yield start, rows, tokens


def _rows(policy: Policy, batch: list, columns: dict[str, list], job: Job, funcs: list, weights: list[float],
          processors, seed: int) -> tuple[list[dict[str, Any]], int]:
    """One row per prompt of `batch`, its n samples drawn with `seed` and one selected; and the tokens generated."""
    n, pad = job.sampling.n, policy.tokenizer.pad_token_id
    sampling = replace(job.sampling, seed=seed)
    if job.tools:
        gens = generate_with_tools(policy, batch, tools=job.tools, sampling=sampling, prompting=job.prompting,
                                   max_tool_rounds=job.tool_use.max_rounds, timeout=job.tool_use.timeout,
                                   logits_processor=processors, progress=False)
    else:
        gens = generate(policy, batch, sampling=sampling, prompting=job.prompting, logits_processor=processors,
                        progress=False)
    grouped = gens.grouped()
    rows = [{"prompt": p, "response": responses[0]} for p, responses in zip(batch, grouped)]
    if n > 1:
        for row, responses in zip(rows, grouped):
            row.update(responses=responses, selected=0)
    if job.selection.mode == "reward":
        # Scored as the model saw them: a retrieved prompt with its passages in the system message.
        seen = [p if not isinstance(p, Conversation) else with_documents(p.messages, p.documents) if p.documents
                else p.messages for p in gens.prompts]
        picks = rerank(replace(gens, prompts=seen), reward_funcs=funcs, weights=weights, columns=columns)
        for row, pick in zip(rows, picks):
            row.update(response=pick.response, **({"selected": pick.best} if n > 1 else {}),
                       scores=pick.scores, rewards=pick.components)
    elif job.selection.mode == "vote":
        for row, responses in zip(rows, grouped):
            answers = [job.extract(r) for r in responses]
            vote = majority_vote(answers)
            row.update(response=responses[vote.index], selected=vote.index, answers=answers,
                       answer=vote.answer, votes=vote.counts)
    if job.tools:  # the kept response's exchange with the tools; with n > 1 every sample's too
        for i, row in enumerate(rows):
            kept = i * n + row.get("selected", 0)
            row.update(messages=gens.transcripts[kept], tool_calls=gens.tool_calls[kept])
            if n > 1:
                row.update(transcripts=gens.transcripts[i * n : (i + 1) * n])
        return rows, sum(gens.generated_tokens)
    # Generated tokens, the stop token included; the padding after a sequence ended by a stop string is not.
    return rows, sum(len(ids) - _trailing(ids, pad) for ids in gens.response_ids)


def _reflect(policy: Policy, batch: list, columns: dict[str, list], rows: list[dict[str, Any]], job: Job,
             funcs: list, weights: list[float], processors, seed: int) -> int:
    """Judge each row's kept response; sample the rejected prompts again (their rows replaced in place), up to
    `job.reflection.rounds` times, the last draw judged too. Each row gets `reflection`: every response it kept, in
    order, with the judge's verdict (and score). Returns the tokens generated for the retries and verdicts."""
    pending, tokens = list(range(len(rows))), 0
    for retry in range(job.reflection.rounds + 1):
        verdicts, judged = _verdicts(policy, [batch[i] for i in pending], [rows[i] for i in pending], job)
        tokens += judged
        for i, verdict in zip(pending, verdicts):
            rows[i].setdefault("reflection", []).append({"response": rows[i]["response"], **verdict})
        pending = [i for i, verdict in zip(pending, verdicts) if verdict["verdict"] == "no"]
        if not pending or retry == job.reflection.rounds:
            return tokens
        again, drawn = _rows(policy, [batch[i] for i in pending], {k: [v[i] for i in pending] for k, v in
                                                                   columns.items()},
                             job, funcs, weights, processors, seed + (retry + 1) * RETRY_SEEDS)
        tokens += drawn
        for i, row in zip(pending, again):
            rows[i] = {**row, "reflection": rows[i]["reflection"]}
    return tokens


def _verdicts(policy: Policy, prompts: list, rows: list[dict[str, Any]], job: Job) -> tuple[list[dict], int]:
    """The judge's verdict on each row's kept response, {"verdict": "yes" | "no"} (with "score" when the reward
    score judges), and the tokens the model generated to say it."""
    if job.reflection.min_score is not None:
        kept = [row["scores"][row.get("selected", 0)] for row in rows]
        return [{"verdict": "yes" if score >= job.reflection.min_score else "no", "score": score}
                for score in kept], 0
    from rlhf_kit.inference.constraints import Constraint

    p = job.prompting
    conversations = []
    for prompt, row in zip(prompts, rows):
        asked = [*p.request(prompt), {"role": "assistant", "content": row["response"]},
                 {"role": "user", "content": REFLECT_QUESTION}]
        # The judge sees the passages the answer was written from.
        conversations.append(Conversation(asked, prompt.documents) if isinstance(prompt, Conversation) else asked)
    judge = Constraint.from_options(choices=["yes", "no"]).logits_processor(policy)
    gens = generate(policy, conversations, sampling=Sampling(max_new_tokens=8, temperature=0),
                    prompting=Prompting(system=p.system), logits_processor=judge, progress=False)
    # Greedy and held to the two words: a reply cut short (no stop token) counts as no.
    verdicts = [{"verdict": "yes" if text == "yes" and stopped else "no"}
                for text, stopped in zip(gens.responses, gens.stopped)]
    return verdicts, sum(map(len, gens.response_ids))


def _trailing(ids: list[int], value: int) -> int:
    count = 0
    while count < len(ids) and ids[len(ids) - 1 - count] == value:
        count += 1
    return count


def generate_responses(model: str | Policy, prompts, *, constraint=None, progress: bool = False,
                       **settings) -> list[dict[str, Any]]:
    """One row per prompt: `prompt`, `response` (the selected one), and with n > 1 `responses` (all n, in sampling
    order) and `selected` (its index); select reward adds `scores` (weighted, per response) and `rewards` (per
    source, per response); select vote adds `answers` (per response), `answer` and `votes` (per answer); retrieval
    adds `passages` (each passage's text, title, source and score, best first).

    `model`: any stage output, merged model or model directory (or a loaded Policy); `prompts`: a list of prompts
    (strings or chat messages) or a prompt dataset (`load_data(..., kind="prompt")`, whose extra columns reach the
    reward functions). `settings`: the keywords of `make_job` (n, select, max_new_tokens, temperature, top_p, seed,
    batch_size, stop, system, template, few_shot, raw, reward_model, reward_funcs, reward_weights, answer_pattern,
    reflect, reflect_min_score, retrieve, top_k, tools, max_tool_rounds, tool_timeout).
    With `tools` (tool modules: `rlhf_kit.tools.load_tools`), each sample may call them up to `max_tool_rounds`
    times (`inference.tools.generate_with_tools`); rows add `messages` (the kept response's exchange after the
    prompt: calls, results, final answer), `tool_calls` (its number of calls) and with n > 1 `transcripts` (all).
    `constraint`: a `constraints.Constraint`, applied as a logits processor to every sample.
    """
    run = make_job(constraint=constraint, **settings)
    prompts, columns = _columns(prompts)
    policy, funcs, weights = _load(model, run)
    rows = []
    with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress) as bar:
        for _, chunk_rows, _ in _chunks(policy, prompts, columns, run, funcs, weights):
            rows += chunk_rows
            bar.update(len(chunk_rows))
    return rows


def generate_file(model: str | Policy, prompts, output: str | Path, *, constraint=None, progress: bool = True,
                  **settings) -> dict[str, Any]:
    """`generate_responses`, appended to the JSONL file `output` one chunk at a time; a rerun resumes after the rows
    already there. `<output>.meta.json` records the model, settings and prompts; a rerun with other ones is refused
    before any model loads. Returns a summary: rows, new_rows, seconds, tokens (generated, all n samples), tokens_per_s.
    """
    run = make_job(constraint=constraint, **settings)
    prompts, columns = _columns(prompts)
    out = Path(output)
    meta = {"model": _model_name(model), "prompts": len(prompts), "prompts_sha256": _digest(prompts, columns),
            **run.settings()}
    meta = json.loads(json.dumps(meta))  # as it reads back from the file: tuples as lists
    done = _check_resume(out, meta)
    if done == len(prompts):  # nothing left to do: no model to load
        return {"output": str(out), "rows": done, "new_rows": 0, "seconds": 0.0, "tokens": 0, "tokens_per_s": 0.0}
    policy, funcs, weights = _load(model, run)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(f"{out}{META_SUFFIX}.tmp")  # written whole, then renamed: a kill never leaves half a record
    staged.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(staged, f"{out}{META_SUFFIX}")
    began, tokens, new = time.perf_counter(), 0, 0
    with tqdm(total=len(prompts), initial=done, desc="generate", unit="prompt", disable=not progress) as bar:
        # A rerun regenerates a partly written chunk exactly (same boundaries, same seed) and appends what is missing.
        for start, rows, chunk_tokens in _chunks(policy, prompts, columns, run, funcs, weights, first=done):
            fresh = rows[max(0, done - start):]
            with out.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in fresh))
            tokens, new = tokens + chunk_tokens, new + len(fresh)
            bar.update(len(fresh))
    seconds = time.perf_counter() - began
    return {"output": str(out), "rows": done + new, "new_rows": new, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}


def _model_name(model: str | Policy) -> str:
    if isinstance(model, Policy):
        return model.name
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def _digest(prompts: list, columns: dict[str, list]) -> str:
    return hashlib.sha256(json.dumps([prompts, columns], sort_keys=True, default=str).encode()).hexdigest()


def _check_resume(out: Path, meta: dict[str, Any]) -> int:
    """Rows of `out` already written from the same model, settings and prompts (0 for a new file); UserError when
    the file was written from others, naming what differs."""
    done = completed_rows(out)  # also drops a half-written last line
    if not done:
        return 0
    meta_path = Path(f"{out}{META_SUFFIX}")
    if not meta_path.is_file():
        raise UserError(f"{out} already has {done} rows but no {meta_path.name}: it was not written by rlhf-kit "
                        "generate, or its record was deleted; give another output file or delete this one")
    before = json.loads(meta_path.read_text())
    differ = _differences(before, meta)
    if differ:
        raise UserError(f"{out} was written with other settings or prompts ({'; '.join(differ[:4])}); to resume it, "
                        "rerun with the same ones, or give another output file")
    if done > meta["prompts"]:
        raise UserError(f"{out} has {done} rows but there are only {meta['prompts']} prompts")
    return done


def _differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} was {_short(a)}, now {_short(b)}")
    return found


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
