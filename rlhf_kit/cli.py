"""The `rlhf-kit` command: init, pipeline, train, eval, generate, chat, export, push, plan."""

from __future__ import annotations

import argparse
import os
import sys

from rlhf_kit.errors import DEBUG_ENV, USER_ERROR_EXIT, debugging, is_user_error
from rlhf_kit.stages import TRAINING


def _init(ns: argparse.Namespace) -> int:
    from rlhf_kit.resources import ROOT, SHIPPED, copy_shipped

    try:
        copied = copy_shipped(ns.directory, overwrite=ns.force)
    except FileExistsError as e:
        print(f"rlhf-kit init: {e}", file=sys.stderr)
        return 2
    print(f"Copied {len(copied)} files ({', '.join(SHIPPED)}) from {ROOT} to {ns.directory}. From there, run for "
          "example:\n  rlhf-kit pipeline recipes/configs/pipeline/tiny.yaml")
    return 0


def _pipeline(ns: argparse.Namespace) -> int:
    from rlhf_kit.config import ConfigError
    from rlhf_kit.pipeline import PipelineConfig, StageFailed, StageStopped, run_pipeline
    from rlhf_kit.resources import missing_shipped_file

    try:
        config = PipelineConfig.from_yaml(ns.config)
        if ns.output_dir:
            config.output_dir = ns.output_dir
        run_pipeline(config, force=ns.force, log=lambda line: print(line, flush=True))
    except ConfigError as e:  # checked before anything trains; main() prints it, with how to get a shipped file
        raise ConfigError(f"{e}{missing_shipped_file(ns.config)}") from e
    except StageStopped as stop:
        print(f"rlhf-kit pipeline: {stop}", file=sys.stderr)
        return 128 + stop.signum  # the shell's convention for "ended by this signal"
    except StageFailed as failed:  # the stage's own output, just above, says why
        print(f"rlhf-kit pipeline: {failed}", file=sys.stderr)
        return 1
    if config.evaluation and not ns.no_eval:
        from rlhf_kit.pipeline import report

        report(config, log=print)
    return 0


def _train(ns: argparse.Namespace) -> int:
    """`accelerate launch recipes/<stage>.py --config CONFIG ...`, through the project's accelerate profile (or the
    one `--accelerate_config` names), stopped with this command as the pipeline's stages are."""
    import os

    from rlhf_kit.config import ConfigError, load_yaml
    from rlhf_kit.pipeline import StageStopped, launch_command, printable, run_stage
    from rlhf_kit.resources import DEFAULT_ACCELERATE_CONFIG, missing_shipped_file

    try:  # a missing or unreadable config: said now, not by the recipe after accelerate takes seconds to start it
        load_yaml(ns.config)
    except ConfigError as e:
        raise ConfigError(f"{e}{missing_shipped_file(ns.config)}") from e
    args, profile = list(ns.args), str(DEFAULT_ACCELERATE_CONFIG)
    if "--accelerate_config" in args:
        at = args.index("--accelerate_config")
        if at + 1 >= len(args):
            raise ConfigError("--accelerate_config needs a path to an accelerate profile")
        profile = args.pop(at + 1)
        args.pop(at)
    try:
        cmd = launch_command(ns.stage, profile) + ["--config", ns.config, *args]
        print(f"[train] {printable(cmd[2:])}", flush=True)  # which recipe and profile: a checkout's or a wheel's
        return run_stage(cmd, dict(os.environ))
    except StageStopped as stop:
        print(f"rlhf-kit train: {stop}", file=sys.stderr)
        return 128 + stop.signum


def _eval(ns: argparse.Namespace) -> int:
    import json

    from rlhf_kit.config import check_model_source
    from rlhf_kit.inference.task_loading import load_task

    task = load_task(ns.task)  # a typo fails in a second, before torch and the models load
    for key in ("model", "against", "reference"):
        if getattr(ns, key):
            check_model_source(getattr(ns, key), key)

    from rlhf_kit.data.loading import load_data
    from rlhf_kit.inference.evaluation import SE, evaluate_policy, format_table, win_rate
    from rlhf_kit.inference.generation import load_policy, merged_copy_note

    constraint = _constraint(ns)
    if ns.generation_backend == "vllm":
        from rlhf_kit.errors import UserError
        from rlhf_kit.vllm_engine import require_vllm

        if constraint is not None:
            raise UserError("constrained output runs on the transformers backend only; drop --generation_backend vllm "
                            "or the constraint")
        require_vllm()
    judges = {}
    if task is not None:
        judges["gold_win_rate"] = task.gold_score
    if ns.judge:
        from rlhf_kit.rewards import import_reward_func

        judge_func = import_reward_func(ns.judge)
        judges["judge_win_rate"] = lambda p, r: float(judge_func(prompts=[p], completions=[r])[0])
    prompts = load_data(ns.prompts, kind="prompt", split=ns.split)["prompt"][: ns.num_prompts]
    reward_model = None
    if ns.reward_model:
        from rlhf_kit.rewards import load_reward_model

        reward_model = load_reward_model(ns.reward_model)  # a single reward model or an ensemble
        judges["rm_win_rate"] = lambda p, r: reward_model.score_texts_for([p], [r]).item()
    reference = load_policy(ns.reference, "reference") if ns.reference else None  # scored, never sampled from
    results = []
    for path in [ns.model] + ([ns.against] if ns.against else []):  # one policy in memory at a time
        policy = load_policy(path, backend=ns.generation_backend)
        for note in filter(None, map(merged_copy_note, [policy] + ([reference] if path == ns.model and reference
                                                                    else []))):
            print(note, file=sys.stderr)
        results.append(evaluate_policy(policy, prompts, reward_model=reward_model, reference=reference, task=task,
                                       max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, seed=ns.seed,
                                       constraint=constraint))
        cut = round((1 - results[-1].metrics.get("constraint_complete_rate", 1)) * len(prompts))
        if cut:
            print(f"{policy.name}: {cut} of {len(prompts)} responses reached --max_new_tokens {ns.max_new_tokens} "
                  f"before their {constraint.kind} match was complete and do not match (constraint_complete_rate)",
                  file=sys.stderr)
        policy.close()
        del policy
    if ns.against:
        ours, theirs = results
        for column, judge in judges.items():
            ours.metrics[column] = win_rate(prompts, ours.responses, theirs.responses, judge)
    columns = sorted({k for r in results for k in r.metrics if not k.endswith(SE)})  # the SEs print beside
    print(format_table(results, columns))
    if ns.output:
        with open(ns.output, "w") as f:
            json.dump({r.name: r.metrics for r in results}, f, indent=2)
    return 0


def _chat(ns: argparse.Namespace) -> int:
    from rlhf_kit.config import check_model_source

    check_model_source(ns.model, "model")  # before torch loads, which takes seconds
    from rlhf_kit.inference.chat import chat

    constraint = _constraint(ns)  # a bad regex or schema file fails before the model loads
    retriever = _retriever(ns)

    def lines():
        while True:
            try:
                yield input("\nyou> ")
            except EOFError:
                return

    chat(ns.model, lines=lines(), write=lambda s: print(s, end="", flush=True),
         max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, system=ns.system, constraint=constraint,
         retriever=retriever, top_k=ns.top_k or 3, **_tool_settings(ns))
    return 0


def _add_tool_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tools", action="append", metavar="MODULE",
                   help="tools the model may call: a .py file or module of typed, documented functions "
                        "(repeatable); the shipped calculator: rlhf_kit.inference.calculator")
    p.add_argument("--max_tool_rounds", type=int, default=3, metavar="K",
                   help="with --tools: most rounds of tool calls per response (default: 3)")
    p.add_argument("--tool_timeout", type=float, default=5.0, metavar="S",
                   help="with --tools: seconds a tool call may run before it is stopped (default: 5)")


def _tool_settings(ns: argparse.Namespace) -> dict:
    return dict(tools=ns.tools or (), max_tool_rounds=ns.max_tool_rounds, tool_timeout=ns.tool_timeout)


def _add_constraint_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--regex", help="every response matches this regex (Rust syntax: no look-around)")
    group.add_argument("--json_schema", metavar="FILE", help="every response is JSON valid under this schema file")
    group.add_argument("--choices", help="every response is one of these comma-separated choices: yes,no,maybe")


def _add_retrieval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retrieve", metavar="PATH", help="put passages from this corpus into each prompt: a directory "
                   "of .txt/.md files or a JSONL file with a 'text' column (BM25; the index is cached beside it)")
    p.add_argument("--top_k", type=int, metavar="K", help="with --retrieve: passages per prompt (default: 3)")
    p.add_argument("--embedding_model", metavar="PATH",
                   help="with --retrieve: dense retrieval with this local encoder instead of BM25")


def _retriever(ns: argparse.Namespace):
    """The corpus of --retrieve, read and indexed (or its cached index loaded) before any model loads."""
    from rlhf_kit.errors import UserError
    from rlhf_kit.inference.retrieval import Retriever

    if ns.retrieve is None:
        if ns.top_k is not None or ns.embedding_model is not None:
            raise UserError("--top_k and --embedding_model are settings of retrieval: give a corpus with --retrieve")
        return None
    if ns.top_k is not None and ns.top_k < 1:
        raise UserError(f"--top_k (passages per prompt) must be >= 1, got {ns.top_k}")
    method = "bm25" if ns.embedding_model is None else "dense"
    return Retriever.from_corpus(ns.retrieve, method=method, embedding_model=ns.embedding_model)


def _constraint(ns: argparse.Namespace):
    from rlhf_kit.inference.constraints import Constraint

    return Constraint.from_options(regex=ns.regex, json_schema=ns.json_schema, choices=ns.choices)


def _run_recipe(recipe: str, argv: list[str], first_key: str, prog: str) -> int:
    """Run `recipes/<recipe>.py` itself, so the subcommand and `python recipes/<recipe>.py` cannot drift apart.

    A leading positional argument is the value of `first_key`; -h/--help lists the keys of the recipe's config
    dataclasses (imported only then: they pull in torch).
    """
    import runpy

    from rlhf_kit.config import check_model_source
    from rlhf_kit.resources import recipe_path

    if argv[:1] in (["-h"], ["--help"]):
        from transformers import HfArgumentParser

        from rlhf_kit.stages import recipe_arguments

        print(HfArgumentParser(recipe_arguments(recipe), prog=prog).format_help())
        return 0
    if argv and not argv[0].startswith("-"):
        check_model_source(argv[0], first_key.lstrip("-"))  # before the recipe imports torch, which takes seconds
        argv = [first_key, *argv]
    runpy.run_path(str(recipe_path(recipe)), run_name=f"recipe_{recipe}")["main"](argv)
    return 0


def _export(ns: argparse.Namespace) -> int:
    return _run_recipe("export", list(ns.args), "--model_path", "rlhf-kit export [MODEL_PATH] [--config YAML]")


def _best_of_n(ns: argparse.Namespace) -> int:
    return _run_recipe("best_of_n", list(ns.args), "--model_name_or_path",
                       "rlhf-kit best-of-n [MODEL] [--config YAML] [--key value ...]")


def _generate(ns: argparse.Namespace) -> int:
    """`rlhf_kit.inference.batch.generate_file` on a prompt dataset: everything is checked before a model loads."""
    from rlhf_kit.config import check_model_source

    check_model_source(ns.model, "model")  # before torch loads, which takes seconds
    from rlhf_kit.data.loading import load_data
    from rlhf_kit.errors import UserError
    from rlhf_kit.inference.batch import generate_file, make_job, read_template

    settings = dict(n=ns.n, select=ns.select, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                    top_p=ns.top_p, seed=ns.seed, batch_size=ns.batch_size, stop=ns.stop or (), system=ns.system,
                    template=read_template(ns.prompt_template) if ns.prompt_template else None,
                    few_shot=ns.few_shot or (), raw=ns.raw, reward_model=ns.reward_model,
                    reward_funcs=ns.reward_funcs or (), reward_weights=ns.reward_weights,
                    answer_pattern=ns.answer_pattern, constraint=_constraint(ns), reflect=ns.reflect,
                    reflect_min_score=ns.reflect_min_score, retrieve=_retriever(ns), top_k=ns.top_k,
                    generation_backend=ns.generation_backend, **_tool_settings(ns))
    make_job(**settings)  # flags first: a mistake there should not wait for the data to load
    prompts = load_data(ns.prompts, kind="prompt", split=ns.split)
    if prompts is None:
        raise UserError(f"--prompts {ns.prompts} has no '{ns.split}' split; give --split")
    if ns.num_prompts is not None:
        prompts = prompts.select(range(min(ns.num_prompts, len(prompts))))
    summary = generate_file(ns.model, prompts, ns.output, **settings)
    if not summary["new_rows"]:
        print(f"rlhf-kit generate: {summary['output']} already holds all {summary['rows']} rows; nothing to do")
        return 0
    print(f"rlhf-kit generate: {summary['rows']} rows in {summary['output']} ({summary['new_rows']} new) in "
          f"{summary['seconds']:.1f} s, {summary['tokens']} tokens generated, {summary['tokens_per_s']:.0f} tokens/s")
    return 0


def _plan(ns: argparse.Namespace) -> int:
    # No model, tokenizer or data is loaded: the estimate is arithmetic on the config and the model's shape.
    from rlhf_kit.config import load_yaml
    from rlhf_kit.plan import Sharding, estimate, format_plan, stage_of, visible_gpus

    config = load_yaml(ns.config)  # a ConfigError is a user error: main() prints its message alone
    if ns.model:
        config["model_name_or_path"] = ns.model
    gpus = visible_gpus()
    sharding = Sharding.from_profile(ns.profile, ns.num_gpus or max(len(gpus), 1))
    result = estimate(config, ns.stage or stage_of(ns.config), sharding)
    print(format_plan(result, gpus, sharding))
    return 0 if not gpus or all(result.needed_on(total) <= total for _, total in gpus[: sharding.gpus]) else 1


def _push(ns: argparse.Namespace) -> int:
    from rlhf_kit.runs import StageOutput

    output = StageOutput.read(ns.path)  # a wrong path fails in a second, before export's torch loads

    from rlhf_kit.publish.hub import push_output

    result = push_output(output, ns.repo_id, formats=ns.formats, gguf_types=ns.gguf_types,
                         base_model_id=ns.base_model_id, private=not ns.public, revision=ns.revision,
                         commit_message=ns.commit_message, dry_run=ns.dry_run)
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-kit", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a user error (a bad config, data file or path) too, here and in "
                             f"the recipes this command launches; so does the environment variable {DEBUG_ENV}=1")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="copy the shipped recipes, configs, accelerate profiles and data into a directory, "
                                    "to run the README's commands there with an installed rlhf-kit")
    p.add_argument("directory", nargs="?", default=".", help="where to copy them (default: the working directory)")
    p.add_argument("--force", action="store_true", help="overwrite files that are already there")
    p.set_defaults(func=_init)

    p = sub.add_parser("pipeline", help="pretrain -> SFT -> reward model -> PPO -> evaluation, resuming finished stages")
    p.add_argument("config", help="pipeline YAML, e.g. recipes/configs/pipeline/tiny.yaml")
    p.add_argument("--output_dir", help="override the pipeline's output_dir")
    p.add_argument("--force", action="store_true",
                   help="start over: remove every stage's previous output (weights, checkpoints, record) and train "
                        "each stage from scratch, instead of skipping finished stages and resuming unfinished ones")
    p.add_argument("--no_eval", action="store_true", help="skip the final evaluation report")
    p.set_defaults(func=_pipeline)

    # Everything after the config goes through to the recipe's strict config parser (REMAINDER), not to argparse.
    p = sub.add_parser("train",
                       help="run one stage's recipe through accelerate: rlhf-kit train sft CONFIG [--key value ...]",
                       description="Runs `accelerate launch --config_file accelerate_config.yaml recipes/<stage>.py "
                                   "--config CONFIG --key value ...`; `--accelerate_config PROFILE` picks another "
                                   "profile (accelerate_configs/).")
    p.add_argument("stage", choices=TRAINING)
    p.add_argument("config", help="the stage's YAML, e.g. recipes/configs/sft/tiny.yaml")
    p.add_argument("args", nargs=argparse.REMAINDER, help="--key value overrides of any config key")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="reward-model score, KL, length, stop rate, win rates and a task's metrics of a "
                                    "model on any prompts")
    p.add_argument("model", help="a stage output directory (full model or LoRA adapter)")
    p.add_argument("--reward_model", help="reward stage output to score with")
    p.add_argument("--reference", help="model to measure KL against (usually the SFT output)")
    p.add_argument("--against", help="a second model: report the first one's win rate against it, judged by the "
                                     "reward model, the task's gold annotator and --judge, whichever are given")
    p.add_argument("--task", help="a task module with a gold annotator, e.g. rlhf_kit.tasks.review: adds its metrics")
    p.add_argument("--judge", help="'module:function' reward function (prompts=..., completions=...) -> scores that "
                                   "judges the win rate")
    p.add_argument("--prompts", default="data/prompts", help="prompt-only data (default: data/prompts)")
    p.add_argument("--split", default="test")
    p.add_argument("--num_prompts", type=int, default=100)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the metrics as JSON here")
    p.add_argument("--generation_backend", choices=["hf", "vllm"], default="hf",
                   help="what samples: transformers' generate (hf) or a vLLM engine (vllm, needs the [vllm] extra; "
                        "not with constrained output)")
    _add_constraint_flags(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("chat", help="chat in the terminal with any stage's output")
    p.add_argument("model")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--system", help="a system message")
    _add_constraint_flags(p)
    _add_retrieval_flags(p)
    _add_tool_flags(p)
    p.set_defaults(func=_chat)

    # prefix_chars="+": every --key goes through to the recipe's strict config parser, not to argparse.
    p = sub.add_parser("export", prefix_chars="+", add_help=False,
                       help="adapter / merged / GGUF export of a stage output, with its model card (recipes/export.py)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_export)

    # prefix_chars="+": every --key goes through to the recipe's strict config parser, not to argparse.
    p = sub.add_parser("best-of-n", prefix_chars="+", add_help=False,
                       help="sample N answers per prompt, keep the reward model's favourite: an SFT dataset for "
                            "rejection-sampling fine-tuning (recipes/best_of_n.py)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_best_of_n)

    p = sub.add_parser(
        "generate", help="responses to every prompt of a dataset, K samples each and one selected, to a JSONL file",
        description="Batched generation over a prompt dataset (TRL prompt format, plain or conversational) from any "
                    "stage output, merged model or local model directory, with the model's chat template and stop "
                    "tokens. Each output line holds the prompt, the selected response, and with --n > 1 all "
                    "responses and every score used. A rerun resumes an interrupted file; one written with other "
                    "settings is refused.",
        epilog="select: first = the first sample; reward = best-of-N, the highest weighted score of --reward_model "
               "and --reward_funcs; vote = self-consistency, the majority answer (--answer_pattern), ties going to "
               "the answer sampled first (needs --n >= 2). Python: rlhf_kit.inference.batch.generate_responses.")
    p.add_argument("model", help="a stage output directory (full model or LoRA adapter) or a model directory")
    p.add_argument("--prompts", required=True, metavar="DATA",
                   help="prompt data (a `prompt` column): a file, a directory with <split>.jsonl, or a Hub dataset")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="the JSONL file to write, appended to when resuming (settings in FILE.meta.json)")
    p.add_argument("--split", default="train", help="the split of a directory or Hub dataset (default: train)")
    p.add_argument("--num_prompts", type=int, metavar="N", help="only the first N prompts")
    p.add_argument("--n", type=int, default=1, metavar="K",
                   help="samples per prompt, drawn in one batched call (default: 1)")
    p.add_argument("--select", choices=["first", "reward", "vote"], default="first",
                   help="how the response of a prompt is chosen among its --n samples (default: first)")
    p.add_argument("--reward_model", help="select reward: a reward stage output to score with")
    p.add_argument("--reward_funcs", nargs="+", metavar="MODULE:FUNCTION",
                   help="select reward: reward functions (prompts=..., completions=...) -> scores")
    p.add_argument("--reward_weights", nargs="+", type=float, metavar="W",
                   help="select reward: one weight per source, the reward model first (default: 1 each)")
    p.add_argument("--answer_pattern", metavar="PATTERN",
                   help="select vote: a regex whose first group (or match) is the answer, or MODULE:FUNCTION; "
                        "default: the whole response")
    p.add_argument("--max_new_tokens", type=int, default=64, help="most new tokens per response (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy, then --n must be 1 (default: 1)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (default: 1, off)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed; each chunk of prompts adds the index of its first prompt (default: 0)")
    p.add_argument("--batch_size", type=int, default=32,
                   help="sequences per generate call: batch_size // n prompts at a time (default: 32)")
    p.add_argument("--system", metavar="TEXT", help="a system message (with --raw: a first line)")
    p.add_argument("--prompt_template", metavar="FILE",
                   help='a text file holding a template with one {prompt} field: "You are an expert reviewer. '
                        '{prompt}"')
    p.add_argument("--few_shot", metavar="FILE", help="a JSONL file of prompt/completion examples, put before each "
                                                       "prompt as chat turns (with --raw: as text)")
    p.add_argument("--raw", action="store_true", help="no chat template (base models): the prompt is a document to "
                                                      "continue; without --stop, a response ends at a newline")
    p.add_argument("--stop", action="append", metavar="STR",
                   help="a string that ends a response, cut off it (repeatable); the model's stop tokens always do")
    p.add_argument("--reflect", type=int, default=0, metavar="K",
                   help="after a response is kept, ask the model whether it meets the request (yes/no); on no, sample "
                        "the prompt again, up to K times; the transcript is kept in the row's 'reflection'")
    p.add_argument("--reflect_min_score", type=float, metavar="X",
                   help="with --select reward and --reflect: the judge is the kept response's reward score (>= X)")
    p.add_argument("--generation_backend", choices=["hf", "vllm"], default="hf",
                   help="what samples: transformers' generate (hf) or a vLLM engine (vllm, needs the [vllm] extra; "
                        "not with constrained output)")
    _add_constraint_flags(p)
    _add_retrieval_flags(p)
    _add_tool_flags(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("plan", help="estimate a recipe config's peak GPU memory per process, before loading anything")
    p.add_argument("config", help="a recipe YAML, e.g. recipes/configs/sft/llama-8b-qlora.yaml")
    p.add_argument("--stage", help="the stage, when the YAML is not under recipes/configs/<stage>/")
    p.add_argument("--model", help="plan for this model instead of the config's model_name_or_path")
    p.add_argument("--num_gpus", type=int, help="processes to plan for (default: the visible GPUs, or 1)")
    p.add_argument("--profile", help="accelerate profile whose ZeRO / FSDP sharding to apply, e.g. "
                                     "accelerate_configs/zero3.yaml")
    p.set_defaults(func=_plan)

    p = sub.add_parser("push", help="upload an export, or a stage output (exported first), to the Hugging Face Hub")
    p.add_argument("path", help="an export directory (rlhf-kit export) or a stage output directory")
    p.add_argument("--repo_id", required=True, help="<namespace>/<name>")
    p.add_argument("--formats", nargs="+", help="for a stage output: adapter, merged, gguf (default: its model)")
    p.add_argument("--gguf_types", nargs="+", help="for a stage output with gguf: f16, q8_0, ...")
    p.add_argument("--base_model_id", help="for a stage output: the Hub id of the adapter's base")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--revision", help="branch to push to, created if missing (default: main)")
    p.add_argument("--commit_message")
    p.add_argument("--dry_run", action="store_true", help="list the files that would be uploaded; needs no token")
    p.set_defaults(func=_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.debug:
        os.environ[DEBUG_ENV] = "1"  # for the recipes that `train` and `pipeline` launch, which inherit it
    try:
        return ns.func(ns)
    except Exception as error:
        # A user error is its message alone; a bug keeps its traceback.
        if debugging() or not is_user_error(error):
            raise
        print(f"rlhf-kit {ns.command}: {error}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
