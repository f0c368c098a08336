"""The one-command pipeline: pretrain -> SFT -> reward model -> PPO -> evaluation, each stage by its own recipe.

The RL stage is any of ppo, grpo, rloo and dpo, or several side by side (each starts from the SFT output, so the
report compares them); best_of_n writes a rejection-sampling dataset from the SFT policy and rft fine-tunes the
SFT model on it (the SFT recipe), and the report adds a best-of-N row: the SFT policy picking the best of n at
inference.

Each stage runs as `accelerate launch recipes/<stage>.py --config <its yaml>` in a child process, exactly as a user
would run it by hand, with the previous stage's output handed over on the command line. The recipe is rlhf-kit's own
(the checkout's, or an installed wheel's copy: rlhf_kit/resources.py), and the log shows its path. A stage whose output
directory already holds a finished stage record is skipped, so an interrupted pipeline resumes at the stage it was
in (and that stage resumes from its own last checkpoint).

`force` starts over: every configured stage's output directory (weights, checkpoints, stage record) is removed
before the first stage runs, and each stage trains from scratch. Removing them all first keeps a stage record from
ever describing other weights than those next to it: a forced rerun interrupted part-way leaves no record behind
(that stage resumes from the new run's checkpoints on the next plain run), and no later stage keeps a record
built on the earlier stage's previous output.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhf_kit.config import SECRET_ENV, ConfigError, check_keys, hub_shaped, is_secret, load_yaml, parse_config
from rlhf_kit.data.loading import check_sources, load_data, row_char_limit
from rlhf_kit.inference.selection import answer_extractor
from rlhf_kit.resources import missing_shipped_file, recipe_path
from rlhf_kit.runs import IN_PIPELINE, read_stage
from rlhf_kit.stages import DATA_KIND, PIPELINE, recipe_arguments

STAGE_ORDER = PIPELINE
RECIPE_OF = {"rft": "sft"}  # rejection-sampling fine-tuning is SFT on the best-of-N dataset

# Which earlier stage's output feeds which key of a later stage's config.
WIRING: dict[str, dict[str, str]] = {
    "pretrain": {},
    "sft": {"model_name_or_path": "pretrain"},
    "reward": {"model_name_or_path": "sft"},
    "ppo": {"model_name_or_path": "sft", "reward_model_path": "reward"},
    "grpo": {"model_name_or_path": "sft", "reward_model_path": "reward"},
    "rloo": {"model_name_or_path": "sft", "reward_model_path": "reward"},
    "dpo": {"model_name_or_path": "sft"},
    "best_of_n": {"model_name_or_path": "sft", "reward_model_path": "reward"},
    "rft": {"model_name_or_path": "sft", "dataset_name": "best_of_n"},
}


# The report's evaluation: held-out prompts, sampled with a fixed seed. Set `temperature` to the one PPO samples at
# to score each policy on the distribution PPO optimized.
# `task` names a task module with a gold annotator (rlhf_kit.tasks.review for the shipped data): its metrics become
# columns and its annotator judges the win rates; without one the report has the columns that apply to any prompts.
EVALUATION_DEFAULTS = {"prompts": "data/prompts", "split": "test", "num_prompts": 100, "max_new_tokens": 32,
                       "temperature": 1.0, "seed": 0, "task": None,
                       # Inference-time rows (rlhf_kit.inference): best-of-n of the SFT policy by the reward model,
                       # and the base model prompted as a document (raw), without and with few-shot examples.
                       # `constrained`: every model again with decoding constrained to the task's ANSWER_REGEX.
                       "best_of_n": None, "few_shot": None, "constrained": False,
                       # `vote_n`, for a task with a checkable answer (exact_match): a self-consistency section, one
                       # sampled answer against the majority vote of vote_n, answers read by `answer_pattern`
                       # (a regex or module:function, rlhf_kit.inference.selection.answer_extractor).
                       "vote_n": None, "answer_pattern": None,
                       # Retrieval and tools (rlhf_kit.inference.retrieval, rlhf_kit.tools): every trained policy
                       # again with the top_k passages of the `retrieve` corpus in its prompt (<model>_retrieval),
                       # and with those and the `tools` modules it may call (<model>_retrieval_tools); the
                       # self-consistency section then samples with both. Retrieval recall@k is reported when the
                       # task says which passages a prompt needs (`needed_passages(prompt)`).
                       "retrieve": None, "top_k": 3, "tools": None, "max_tool_rounds": 3}


@dataclass
class PipelineConfig:
    """`stages` maps a stage name to its recipe YAML; `overrides` maps a stage name to extra `--key value` pairs."""

    output_dir: str = "outputs/pipeline"
    accelerate_config: str = "accelerate_config.yaml"
    stages: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self._check_shapes()
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        if unknown:
            raise ConfigError(f"Unknown pipeline stage(s) {unknown}; stages are {list(STAGE_ORDER)}.")
        for stage, cfg in self.stages.items():
            if not Path(cfg).is_file():
                raise ConfigError(f"Pipeline stage '{stage}': config file {cfg} does not exist."
                                  + missing_shipped_file(cfg))
        unknown = sorted(set(self.evaluation) - set(EVALUATION_DEFAULTS))
        if unknown:
            raise ConfigError(f"Unknown evaluation setting(s) {unknown}; settings are {sorted(EVALUATION_DEFAULTS)}.")
        for stage in self.overrides:
            if stage not in self.stages:
                raise ConfigError(f"overrides for stage '{stage}', which the pipeline does not run.")

    def _check_shapes(self) -> None:
        # YAML gives a list for `stages: [sft, ppo]`, which would fail later with an AttributeError.
        if not isinstance(self.stages, dict) or not all(isinstance(v, str) for v in self.stages.values()):
            raise ConfigError(f"stages must be a mapping of stage name to its recipe config file, got "
                              f"{self.stages!r}; for example:\n  stages:\n    sft: recipes/configs/sft/tiny.yaml\n"
                              "    ppo: recipes/configs/ppo/tiny.yaml")
        if not isinstance(self.overrides, dict) or not all(isinstance(v, dict) for v in self.overrides.values()):
            raise ConfigError(f"overrides must be a mapping of stage name to a mapping of keys to values, got "
                              f"{self.overrides!r}; for example:\n  overrides:\n    ppo:\n      learning_rate: 1.0e-4")
        if not isinstance(self.evaluation, dict):
            raise ConfigError(f"evaluation must be a mapping of setting to value, got {self.evaluation!r}; for "
                              "example:\n  evaluation:\n    num_prompts: 100")

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        values = load_yaml(path)
        check_keys(list(values), [cls], f"pipeline config {path}")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"pipeline config {path}: {e}") from None

    def ordered_stages(self) -> list[str]:
        return [s for s in STAGE_ORDER if s in self.stages]

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) / stage


def stage_command(config: PipelineConfig, stage: str) -> list[str]:
    """The `accelerate launch` command line that runs one stage with its inputs wired to earlier outputs.

    Secret overrides (a hub_token) are not on it: `stage_secrets` hands them over in the environment."""
    return launch_command(stage, config.accelerate_config) + stage_arguments(config, stage)


def stage_arguments(config: PipelineConfig, stage: str) -> list[str]:
    """The recipe's own arguments for one stage: its YAML, output_dir, wired inputs and overrides (secrets aside)."""
    args: dict[str, Any] = {"output_dir": str(config.stage_dir(stage))}
    for key, source in WIRING[stage].items():
        if source in config.stages:
            args[key] = str(config.stage_dir(source))
    args.update({k: v for k, v in config.overrides.get(stage, {}).items() if k not in SECRET_ENV})
    argv = ["--config", config.stages[stage]]
    for key, value in args.items():
        argv += [f"--{key}", *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
    return argv


# Keys that name a model a stage loads; each must exist, be a Hub id, or be an earlier stage's output.
MODEL_KEYS = ("model_name_or_path", "tokenizer_name_or_path", "reward_model_path", "critic_model_path", "base_model")


def check_pipeline(config: PipelineConfig) -> None:
    """Check every stage before the first one runs, so a typo in the last stage's config cannot wait for hours of
    training to surface: its config with the pipeline's overrides, parsed exactly as its recipe parses it (unknown
    keys, numeric bounds, the dataclasses' own checks); the first rows of each local data file; and that each model
    path exists or is the output of an earlier stage. Loads no model and touches no network."""
    if not Path(config.accelerate_config).is_file():
        raise ConfigError(f"accelerate_config {config.accelerate_config} does not exist; give an accelerate config "
                          "file (accelerate_config.yaml at the repository root is the CPU default)."
                          + missing_shipped_file(config.accelerate_config))
    produced: set[Path] = set()
    for stage in config.ordered_stages():
        recipe = RECIPE_OF.get(stage, stage)
        try:
            instances = parse_config(*recipe_arguments(recipe), args=stage_arguments(config, stage))
            values = {key: value for instance in instances for key, value in vars(instance).items()}
            _check_models(values, produced)
            _check_data(values, DATA_KIND[recipe], produced)
        except (ValueError, OSError) as error:  # ConfigError, DataError, the dataclasses' checks, missing files
            raise ConfigError(f"Pipeline stage '{stage}' ({config.stages[stage]}): {error}") from None
        produced.add(config.stage_dir(stage).resolve())
    if config.evaluation:
        settings = {**EVALUATION_DEFAULTS, **config.evaluation}
        try:
            check_sources(settings["prompts"], "prompt", settings["split"])
        except ValueError as error:
            raise ConfigError(f"evaluation prompts: {error}") from None
        vote_n = settings["vote_n"]
        if vote_n is not None and (type(vote_n) is not int or vote_n < 2 or not settings["task"]):
            raise ConfigError(f"evaluation vote_n must be a whole number >= 2, with a task whose metrics include "
                              f"exact_match; got vote_n={vote_n!r}, task={settings['task']!r}")
        try:
            answer_extractor(settings["answer_pattern"])
        except ValueError as error:
            raise ConfigError(f"evaluation answer_pattern: {error}") from None
        _check_assistance(settings)


def _check_assistance(settings: dict[str, Any]) -> None:
    """The retrieval corpus exists and the tool modules load, before any stage runs."""
    corpus = settings["retrieve"]
    if corpus is not None and not Path(corpus).exists():
        raise ConfigError(f"evaluation retrieve: the corpus {corpus} does not exist (a directory of .txt/.md files "
                          "or a JSONL file with a text column)" + missing_shipped_file(corpus))
    top_k, rounds = settings["top_k"], settings["max_tool_rounds"]
    if type(top_k) is not int or top_k < 1 or type(rounds) is not int or rounds < 0:
        raise ConfigError(f"evaluation top_k must be a whole number >= 1 and max_tool_rounds one >= 0, got top_k="
                          f"{top_k!r}, max_tool_rounds={rounds!r}")
    if settings["tools"]:
        from rlhf_kit.errors import UserError
        from rlhf_kit.tools import load_tools

        try:
            load_tools(settings["tools"])
        except UserError as error:
            raise ConfigError(f"evaluation tools: {error}") from None


def _is_produced(value: str, produced: set[Path]) -> bool:
    return Path(value).expanduser().resolve() in produced


def _check_models(values: dict[str, Any], produced: set[Path]) -> None:
    for key in MODEL_KEYS:
        value = values.get(key)
        if isinstance(value, str) and not _is_produced(value, produced):
            # Only a value that can only be a path: whether `outputs/x` is one (`outputs/` exists) is for the stage
            # to decide when it loads the model, after the stages before it have run.
            if not hub_shaped(value) and not Path(value).expanduser().exists():
                raise FileNotFoundError(f"{key}: {value} does not exist (working directory {Path.cwd()}), and no "
                                        "earlier stage of the pipeline writes it.")


def _check_data(values: dict[str, Any], kind: str, produced: set[Path]) -> None:
    test_split = values.get("dataset_test_split", "test")
    # The length the stage cuts rows at, as its recipe reads it: max_length, or for PPO max_prompt_length.
    max_length = None if values.get("packing") else values.get("max_length", values.get("max_prompt_length"))
    max_chars = row_char_limit(max_length)
    for key, split in (("dataset_name", "train"), ("dataset_name", test_split), ("eval_dataset_name", test_split),
                       ("reference_dataset", test_split)):
        value = values.get(key)
        if value is not None and not (isinstance(value, str) and _is_produced(value, produced)):
            check_sources(value, kind, split, max_chars=max_chars)


def launch_command(stage: str, accelerate_config: str) -> list[str]:
    """`accelerate launch --config_file <profile> recipes/<recipe>.py`, the way every stage runs (the pipeline's and
    `rlhf-kit train`'s); the recipe's own arguments (`--config`, `--key value`) go after it. `--quiet`: a failed
    recipe has said why (a user error in one line, a bug with its traceback), and without it accelerate adds a
    traceback of its own launcher (CalledProcessError) or torchrun's ChildFailedError one."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", accelerate_config,
            str(recipe_path(RECIPE_OF.get(stage, stage)))]


def stage_secrets(config: PipelineConfig, stage: str) -> dict[str, str]:
    """The environment variables that carry a stage's secret overrides (hub_token as HF_TOKEN): a command line is
    readable by every user in `ps` and is printed in the pipeline's log."""
    return {SECRET_ENV[k]: str(v) for k, v in config.overrides.get(stage, {}).items() if k in SECRET_ENV}


def printable(cmd: list[str]) -> str:
    """A command line for the log, with the value of any secret-looking key masked."""
    shown = [cmd[0]]
    for previous, arg in zip(cmd, cmd[1:]):
        shown.append("***" if previous.startswith("--") and is_secret(previous[2:]) else arg)
    return " ".join(shown)


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; the stage printed why (the pipeline's own traceback would add nothing)."""


class StageStopped(RuntimeError):
    """The pipeline was told to stop by a signal; the stage it was running has exited."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; the running stage has exited. Run the same "
                         "command again to resume where it stopped.")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_stage(cmd: list[str], env: dict[str, str]) -> int:
    """Run a stage's command in its own process group and return its exit code.

    A stop signal sent to the pipeline (Ctrl-C, `kill`, a closed terminal) is passed on to the whole group, accelerate's
    launcher and its training processes, and the pipeline waits for them: otherwise the stage would go on training in
    the background with nobody to see it. A second signal kills the group outright. Raises StageStopped once stopped.
    """
    child: subprocess.Popen | None = None
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        if child is not None:
            _signal_group(child.pid, signum if len(received) == 1 else signal.SIGKILL)

    # Handlers first, so that no signal falls between starting the stage and watching for it. Python lets only the
    # main thread set handlers; elsewhere (a caller's worker thread) signals stay the caller's.
    handlers = ({s: signal.signal(s, forward) for s in STOP_SIGNALS}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        child = subprocess.Popen(cmd, env=env, start_new_session=True)
        if received:  # arrived while it was starting
            _signal_group(child.pid, received[0])
        code = child.wait()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if received:
        # The launcher can exit before its workers: no part of the stage may outlive the pipeline.
        _signal_group(child.pid, signal.SIGKILL)
        raise StageStopped(received[0])
    return code


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # the group has already exited
        pass


def is_finished(config: PipelineConfig, stage: str) -> bool:
    record = read_stage(config.stage_dir(stage))
    return bool(record and record.get("complete"))


def run_pipeline(
    config: PipelineConfig,
    *,
    force: bool = False,
    log: Callable[[str], None] = lambda _: None,
    run: Callable[[list[str], dict[str, str]], int] = run_stage,
) -> dict[str, str]:
    """Run every configured stage in order, once `check_pipeline` passed; returns {stage: "ran" | "skipped"}. With
    `force`, every stage's previous output is removed first (after the check) and every stage trains from scratch.

    `run(cmd, env)` runs one stage's command with the given environment and returns its exit code."""
    check_pipeline(config)
    if force:
        _clear_outputs(config, log)
    status: dict[str, str] = {}
    for stage in config.ordered_stages():
        if is_finished(config, stage) and not force:
            log(f"[pipeline] {stage}: finished output in {config.stage_dir(stage)}, skipping")
            status[stage] = "skipped"
            continue
        cmd = stage_command(config, stage)
        log(f"[pipeline] {stage}: {printable(cmd[2:])}")
        code = run(cmd, {**os.environ, **stage_secrets(config, stage), IN_PIPELINE: "1"})
        if code != 0:
            raise StageFailed(f"Pipeline stage '{stage}' failed with exit code {code}; rerun to resume from it.")
        status[stage] = "ran"
    return status


def _clear_outputs(config: PipelineConfig, log: Callable[[str], None]) -> None:
    for stage in config.ordered_stages():
        folder = config.stage_dir(stage)
        if folder.exists():
            log(f"[pipeline] {stage}: --force: removing the previous output {folder}; the stage trains from scratch")
            shutil.rmtree(folder)


# The report's row for each stage whose output is a policy: row name -> stage.
POLICY_ROWS = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "grpo": "grpo", "rloo": "rloo", "dpo": "dpo",
               "rft": "rft"}
REPORT_COLUMNS = ["shape_rate", "format_rate", "gold_score", "reward_model_score", "kl_to_reference", "response_tokens",
                  "stop_rate", "gold_win_rate_vs_sft", "rm_win_rate_vs_sft"]
# Shown for a task with checkable answers and for tool use.
OPTIONAL_COLUMNS = ["exact_match", "tool_calls"]


def report_columns(results: list) -> list[str]:
    """The report's columns that some row has: a task without the review task's columns leaves those out."""
    return [c for c in REPORT_COLUMNS + OPTIONAL_COLUMNS if any(c in r.metrics for r in results)]


def report(config: PipelineConfig, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Evaluate base, SFT and every RL stage on held-out prompts (with best-of-N of the SFT policy when the best_of_n
    stage ran, at its n); write report.json, report.md and the PPO training plot."""
    import json

    from rlhf_kit.inference.evaluation import evaluate_policy, format_table, win_rate
    from rlhf_kit.inference.task_loading import load_task
    from rlhf_kit.inference.generation import load_policy

    settings = {**EVALUATION_DEFAULTS, **config.evaluation}
    task = load_task(settings["task"])
    prompts_data = load_data(settings["prompts"], kind="prompt", split=settings["split"])
    prompts = prompts_data["prompt"][: settings["num_prompts"]]
    reward_model = None
    if "reward" in config.stages:
        from rlhf_kit.rewards import load_reward_model

        reward_model = load_reward_model(str(config.stage_dir("reward")))  # a single reward model or an ensemble
    policies = {name: load_policy(str(config.stage_dir(stage)), name) for name, stage in POLICY_ROWS.items()
                if stage in config.stages}
    reference = policies.get("sft")
    results = [evaluate_policy(policy, prompts, reward_model=reward_model, reference=reference, task=task,
                               max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                               seed=settings["seed"])
               for policy in policies.values()]
    if "best_of_n" in config.stages and reference is not None and reward_model is not None:
        from rlhf_kit.inference.best_of_n import evaluate_best_of_n

        stage = (read_stage(config.stage_dir("best_of_n")) or {}).get("config", {})
        results.append(evaluate_best_of_n(reference, prompts, n=stage.get("n", 4), reward_model=reward_model,
                                          missing_eos_penalty=stage.get("missing_eos_penalty"), task=task,
                                          max_new_tokens=settings["max_new_tokens"],
                                          temperature=settings["temperature"], seed=settings["seed"]))
    assisted = _assistances(settings)  # the retriever and the tools, loaded once for every row that uses them
    results += _inference_rows(settings, policies, prompts, reward_model, task, assisted)
    sft = next((r for r in results if r.name == "sft"), None)
    for r in results:
        if sft is not None:
            if task is not None:
                r.metrics["gold_win_rate_vs_sft"] = win_rate(prompts, r.responses, sft.responses, task.gold_score)
            if reward_model is not None:
                def rm_judge(prompt, response):
                    return reward_model.score_texts_for([prompt], [response]).item()

                r.metrics["rm_win_rate_vs_sft"] = win_rate(prompts, r.responses, sft.responses, rm_judge)
    out = Path(config.output_dir)
    table = format_table(results, report_columns(results))
    rm_eval = _reward_eval(config)
    gains = _gains(results)
    data = {"prompts": len(prompts), "settings": settings, "rows": {r.name: r.metrics for r in results},
            "gains": gains,
            "reward_model_heldout": rm_eval, "retrieval": _retrieval_recall(settings, assisted, prompts, task),
            "samples": {r.name: list(zip(map(str, prompts[:5]), r.responses[:5])) for r in results}}
    consistency_md = (_self_consistency_rows(policies, prompts, task, settings, data, assisted) if settings["vote_n"]
                      else [])
    (out / "report.json").write_text(json.dumps(data, indent=2))
    md = [f"# rlhf-kit pipeline report ({len(prompts)} held-out prompts)", "", table, ""]
    if gains:
        md += ["Gains on the same prompts (mean difference ± paired standard error):", ""]
        md += [f"- {g['row']} vs {g['baseline']}: {g['column']} {g['difference']:+.3f} ± {g['se']:.3f}" for g in gains]
        md.append("")
    if rm_eval:
        # How the reward stage held its pairs out: no key for the data's own test split, a description for an
        # automatic share of the training file, IN_SAMPLE when it could not (the accuracy is then the training pairs').
        from rlhf_kit.rewards import IN_SAMPLE  # torch-heavy: loaded when a report is written, not at start-up

        how = rm_eval.get("held_out")
        kind = "training (in-sample, not held-out)" if how == IN_SAMPLE else "held-out"
        source = f", {how}" if how and how != IN_SAMPLE else ""
        md.append(f"Reward model on {rm_eval.get('pairs', '?')} {kind} preference pairs{source} (labelled by the gold "
                  f"annotator): accuracy {rm_eval.get('accuracy', float('nan')):.3f}.")
    if data["retrieval"]:
        r = data["retrieval"]
        md.append(f"Retrieval from {r['corpus']}: recall@{r['top_k']} {r['recall_at_k']:.3f} (the share of the "
                  "passages each prompt needs that are among its top k).")
    plot = plot_ppo_training(config.stage_dir("ppo"), out / "ppo_training.png") if "ppo" in config.stages else None
    if plot:
        md.append(f"\n![gold and reward-model score against KL during PPO]({plot.name})")
    md += consistency_md
    (out / "report.md").write_text("\n".join(md) + "\n")
    log("\n".join(md))
    return data


def _inference_rows(settings: dict[str, Any], policies: dict, prompts: list, reward_model, task,
                    assisted: dict) -> list:
    """The report rows that use a model better without training it (see EVALUATION_DEFAULTS)."""
    from rlhf_kit.inference.evaluation import evaluate_policy
    from rlhf_kit.inference.generation import Prompting, load_few_shot

    rows = []
    sampled = {k: settings[k] for k in ("max_new_tokens", "temperature", "seed")}
    if settings["best_of_n"] and "sft" in policies and reward_model is not None:
        from rlhf_kit.inference.best_of_n import evaluate_best_of_n

        n = int(settings["best_of_n"])
        rows.append(evaluate_best_of_n(policies["sft"], prompts, n=n, reward_model=reward_model, task=task,
                                       name=f"sft_best_of_{n}", **sampled))
    if settings["few_shot"] and "base" in policies:
        # A base model is not an assistant: given a document of examples it continues the pattern. One line each.
        examples = load_few_shot(settings["few_shot"])
        for name, shots in (("base_raw", ()), (f"base_raw_{len(examples)}_shot", examples)):
            rows.append(evaluate_policy(policies["base"], prompts, task=task, reward_model=reward_model, name=name,
                                        prompting=Prompting(raw=True, few_shot=shots), stop=["\n"], **sampled))
    if assisted:
        for name, policy in policies.items():
            if name == "base":  # not an assistant: it has not learned to read passages or call tools
                continue
            for label, assistance in assisted.items():
                rows.append(evaluate_policy(policy, prompts, task=task, reward_model=reward_model,
                                            assistance=assistance, name=f"{name}_{label}", **sampled))
    if settings["constrained"] and getattr(task, "ANSWER_REGEX", None):
        from rlhf_kit.inference.constraints import Constraint

        # The answer's shape by construction, for any model (the base included); the gold score says what it costs.
        constraint = Constraint.from_options(regex=task.ANSWER_REGEX)
        for name, policy in policies.items():
            rows.append(evaluate_policy(policy, prompts, task=task, reward_model=reward_model, constraint=constraint,
                                        name=f"{name}_constrained", **sampled))
    return rows


def _assistances(settings: dict[str, Any]) -> dict:
    """The report's assisted settings by row label: retrieval alone, then retrieval with tools (or tools alone);
    none when neither `retrieve` nor `tools` is set."""
    if not (settings["retrieve"] or settings["tools"]):
        return {}
    from rlhf_kit.inference.evaluation import Assistance
    from rlhf_kit.inference.retrieval import Retriever
    from rlhf_kit.tools import load_tools

    retriever = Retriever.from_corpus(settings["retrieve"]) if settings["retrieve"] else None
    tools = load_tools(settings["tools"]) if settings["tools"] else []
    base = Assistance(retriever=retriever, top_k=settings["top_k"], max_tool_rounds=settings["max_tool_rounds"])
    assisted = {"retrieval": base} if retriever is not None else {}
    if tools:
        assisted["retrieval_tools" if retriever is not None else "tools"] = replace(base, tools=tools)
    return assisted


def _retrieval_recall(settings: dict[str, Any], assisted: dict, prompts: list, task) -> dict[str, Any] | None:
    """Recall@k of the report's retriever on the prompts, where the task says which passages each one needs."""
    needed = getattr(task, "needed_passages", None)
    retriever = next((a.retriever for a in assisted.values() if a.retriever is not None), None)
    if retriever is None or needed is None:
        return None
    from rlhf_kit.inference.generation import user_text
    from rlhf_kit.inference.retrieval import recall_at_k

    k = settings["top_k"]
    found = retriever.search([user_text(p) for p in prompts], k)
    return {"corpus": settings["retrieve"], "top_k": k, "recall_at_k": recall_at_k(found, [needed(p) for p in prompts])}


# (row, the row it improves on, the column compared): inference-time methods against the policy they start from.
_GAINS = [("sft_best_of_", "sft", "gold_score"), ("base_raw_", "base_raw", "format_rate"),
          ("base_raw_", "base_raw", "gold_score")]
_GAINS += [(f"{name}_constrained", name, column) for name in POLICY_ROWS for column in ("shape_rate", "gold_score")]
_GAINS += [(f"{name}_{label}", name, "exact_match") for name in POLICY_ROWS
           for label in ("retrieval", "retrieval_tools", "tools")]
_GAINS += [(f"{name}_retrieval_tools", f"{name}_retrieval", "exact_match") for name in POLICY_ROWS]


def _gains(results: list) -> list[dict[str, Any]]:
    from rlhf_kit.inference.evaluation import paired_difference

    by_name = {r.name: r for r in results}
    gains = []
    for prefix, baseline, column in _GAINS:
        for r in results:
            base = by_name.get(baseline)
            # A row name ending in "_" is a family (best-of-n at any n); others name one row.
            matches = r.name.startswith(prefix) if prefix.endswith("_") else r.name == prefix
            if (matches and r.name != baseline and base is not None
                    and column in r.per_prompt and column in base.per_prompt):
                difference, se = paired_difference(r, base, column)
                gains.append({"row": r.name, "baseline": baseline, "column": column, "difference": difference,
                              "se": se})
    return gains


CONSISTENCY_COLUMNS = ["exact_match", "gain_vs_one_sample", "gain_vs_first_answer", "pass_at_n", "answer_rate"]


def _self_consistency_rows(policies: dict, prompts: list, task, settings: dict[str, Any], data: dict,
                           assisted: dict) -> list[str]:
    """Self-consistency for every trained policy (the base model is not asked): exact match of one sampled answer, of
    the first readable one and of the majority vote of `vote_n`, from the same samples (`evaluate_self_consistency`).
    Adds the rows to the report's data under "self_consistency" and returns its Markdown section."""
    from rlhf_kit.inference.evaluation import evaluate_self_consistency, format_table

    # With retrieval or tools configured, each sample is the fullest assisted exchange (`_assistances`' last).
    label, assistance = list(assisted.items())[-1] if assisted else (None, None)
    results = [row for name, policy in policies.items() if name != "base"
               for row in evaluate_self_consistency(policy, prompts, task=task, n=settings["vote_n"],
                                                    answer_pattern=settings["answer_pattern"],
                                                    max_new_tokens=settings["max_new_tokens"],
                                                    temperature=settings["temperature"], seed=settings["seed"],
                                                    assistance=assistance,
                                                    name=f"{name}_{label}" if label else name)]
    data["self_consistency"] = {r.name: r.metrics for r in results}
    data["samples"].update({r.name: list(zip(map(str, prompts[:5]), r.responses[:5])) for r in results})
    return ["", f"## Self-consistency: one sampled answer vs the majority vote of {settings['vote_n']}", "",
            f"Exact match on the same {len(prompts)} prompts and samples at temperature {settings['temperature']} "
            "(± standard error; a gain's is paired by prompt). first_answer: each prompt's first sample with an "
            "answer, since the vote skips samples without one too; pass_at_n: any of the samples is right.", "",
            format_table(results, CONSISTENCY_COLUMNS)]


def _reward_eval(config: PipelineConfig) -> dict[str, Any] | None:
    if "reward" not in config.stages:
        return None
    from rlhf_kit.rewards import read_eval_report

    return read_eval_report(config.stage_dir("reward"))


def plot_ppo_training(ppo_dir: Path, png: Path) -> Path | None:
    """Gold and reward-model score against KL across PPO's periodic evaluations: over-optimization shows as the
    reward-model curve still rising while the gold curve flattens or falls (and, with a reward ensemble, as its
    members' disagreement rising)."""
    import json

    state = ppo_dir / "trainer_state.json"
    if not state.is_file():
        return None
    history = [e for e in json.loads(state.read_text())["log_history"] if "eval_kl" in e]
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = [e["eval_kl"] for e in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("eval_reward/gold", "gold score"), ("eval_reward/rm", "reward model (normalized)"),
                       ("eval_reward/rm_std", "reward ensemble's disagreement (std)")):
        if any(key in e for e in history):
            ax.plot(kl, [e.get(key, float("nan")) for e in history], marker="o", label=label)
    ax.set_xlabel("KL(policy || SFT), nats per response")
    ax.set_ylabel("mean score on held-out prompts")
    ax.set_title("PPO: gold vs reward-model score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
