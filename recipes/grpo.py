"""Stage 4, GRPO: the SFT policy against the reward model (and/or Python reward functions) with TRL's GRPOTrainer.

    accelerate launch --config_file accelerate_config.yaml recipes/grpo.py --config recipes/configs/grpo/tiny.yaml

No critic: each prompt gets num_generations completions, and each completion's advantage is its reward minus the
group's mean (divided by the group's std). The policy starts from the SFT output (an adapter is merged into its base
first) and trains a LoRA adapter; the reference of the KL term (beta > 0) is that model with the adapter disabled.
Rewards, weighted as reward_weights says: the reward model (normalized; it scores prompt + completion rendered with
its own tokenizer and chat template, end-of-turn token included, exactly as it was trained), reward_funcs, a
missing-stop penalty (missing_eos_penalty) and, measured but never optimized, eval_reward_funcs. The output directory
holds the policy adapter, the tokenizer, trainer_state.json (the log), the resolved config, a model card and the
stage record. An interrupted run resumes from its last checkpoint when started again. With `tools` (tool modules, as
`rlhf-kit generate --tools` takes them) the policy may call tools while it samples: TRL runs the calls and appends
their results, which are not trained on, up to max_tool_calling_iterations rounds.
"""

import rlhf_kit  # noqa: F401  before transformers: bitsandbytes then never reaches the Hub (rlhf_kit/hub_kernels.py)
from transformers import set_seed
from trl import GRPOTrainer

from rlhf_kit.config import parse_config, save_config, to_dict
from rlhf_kit.errors import run_main
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.data.loading import load_data
from rlhf_kit.training.distributed import end_processes, parallelism, shard_on_cpu
from rlhf_kit.training.grpo import apply_sampling_global_batch, check_sampling_setup, reward_metrics
from rlhf_kit.publish.hub import publish_stage, take_over_push
from rlhf_kit.model import load_model, load_model_tokenizer, lora_config, prepare_tokenizer, stop_token_ids
from rlhf_kit.model import require_response_template  # for tools, which only GRPOTrainer takes (not RLOO's)
from rlhf_kit.rewards import load_reward_functions
from rlhf_kit.tools import ToolRunner, guarded, load_tools
from rlhf_kit.runs import format_summary, resume_checkpoint, train_and_save, write_stage


def main(argv=None, overrides=None, callbacks=None):
    data_args, model_args, args, sources = parse_config(*recipe_arguments("grpo"), args=argv, overrides=overrides)
    push = take_over_push(args)  # fails now, not after training, without a repo id or token
    apply_sampling_global_batch(args)  # gradient accumulation for this launch's process count
    set_seed(args.seed)

    # Data first: a bad row or a contradictory setting must fail before minutes of model loading.
    train_data = load_data(data_args.dataset_name, kind="prompt", split=data_args.dataset_train_split, seed=args.seed)
    eval_data = load_data(data_args.eval_source, kind="prompt", split=data_args.dataset_test_split, seed=args.seed)
    check_sampling_setup(model_args, args, has_eval_data=eval_data is not None)
    # The tools load now (a bad module fails in a second); their calls run in a worker, stopped at tool_timeout.
    tools = guarded(ToolRunner(load_tools(args.tools), args.tool_timeout)) if args.tools else None
    resume = resume_checkpoint(args.output_dir, args.resume_from_checkpoint)

    tokenizer = load_model_tokenizer(model_args, trust_remote_code=args.trust_remote_code)
    prepare_tokenizer(tokenizer)  # the SFT tokenizer already has its template and pad token: this changes nothing
    if tools:
        require_response_template(tokenizer)  # how TRL parses tool calls (it knows only its own templates)
    # Reward functions before the policy: imports, weights and the reward model's gate fail in a second. The
    # missing-stop penalty looks for the policy's stop tokens (its own EOS included), read from its saved config.
    stops = stop_token_ids(tokenizer, model_args.model_name_or_path, revision=model_args.model_revision)
    reward_funcs, weights, reward_report = load_reward_functions(
        sources, tokenizer, stop_ids=stops, weights=args.reward_weights, device=args.device,
        trust_remote_code=args.trust_remote_code)
    model = load_model(model_args, tokenizer, trust_remote_code=args.trust_remote_code)
    peft_config = lora_config(model_args, tokenizer)

    configured = args.reward_weights
    args.reward_weights = weights  # one per function, as TRL reads them; restored so the saved config runs again
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        tools=tools,
    )
    args.reward_weights = configured
    shard_on_cpu(trainer)  # an FSDP launch on CPUs shards as it would on GPUs
    train_loss = train_and_save(trainer, resume, args.output_dir)  # the whole run's loss, a resume's start included

    # Mean reward of the first and last updates; held-out prompts at the start (eval_on_start) and at the end.
    metrics = {"train_loss": train_loss, "parallelism": parallelism(trainer),
               **reward_metrics(trainer)}
    trainer.save_state()  # trainer_state.json: the log history, periodic evaluations included
    if "accuracy" in reward_report:
        metrics["reward_model_accuracy"] = reward_report["accuracy"]

    if trainer.is_world_process_zero():
        save_config(args.output_dir, data_args, model_args, args, sources)
        write_stage(args.output_dir, "grpo", model=model_args.model_name_or_path, data=data_args.dataset_name,
                    config=to_dict(data_args, model_args, args, sources), metrics=metrics)
        publish_stage(args.output_dir, push)
        print(format_summary("grpo", args.output_dir, metrics))
    return trainer


if __name__ == "__main__":
    run_main(main)  # a user error: its message, no traceback
    end_processes()  # every process done before any leaves; a live gloo group can abort the exit
