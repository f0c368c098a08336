"""Stage 4: PPO against the reward model (and/or Python reward functions), with a LoRA policy and critic.

    accelerate launch --config_file accelerate_config.yaml recipes/ppo.py --config recipes/configs/ppo/tiny.yaml

The policy starts from the SFT output (an adapter is merged into its base first); the reference is that model with the
adapter disabled and the critic a second adapter on it, so one copy of the weights serves all three. Any key can be
overridden on the command line (`--kl_coef 0.1`). The output directory holds the policy adapter (standard PEFT layout,
what the export stage loads), the critic in critic/, the tokenizer, completions.jsonl, the resolved config, a model
card and the stage record. An interrupted run resumes from its last checkpoint when started again.
"""

import rlhf_kit  # noqa: F401  before transformers: bitsandbytes then never reaches the Hub (rlhf_kit/hub_kernels.py)
from transformers import set_seed

from rlhf_kit.config import parse_config, save_config, to_dict
from rlhf_kit.errors import run_main
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.data.loading import load_data, row_char_limit
from rlhf_kit.training.distributed import apply_global_batch_size, end_processes, parallelism
from rlhf_kit.model import load_model, load_model_tokenizer, lora_config, prepare_tokenizer
from rlhf_kit.rewards import RewardModel, load_rewards, tokenizer_compatibility
from rlhf_kit.publish.hub import publish_stage, take_over_push
from rlhf_kit.data.lengths import count_over_length, length_metrics
from rlhf_kit.runs import format_summary, resume_checkpoint, start_and_final_evaluation, write_stage
from rlhf_kit.training.ppo.trainer import PPOTrainer
from rlhf_kit.training.settings import check_eval_data


def main(argv=None, overrides=None, callbacks=None):
    data_args, model_args, args, sources = parse_config(*recipe_arguments("ppo"), args=argv, overrides=overrides)
    apply_global_batch_size(args, mini_batches=args.num_mini_batches)  # global batch = prompts per update
    push = take_over_push(args)  # fails now, not after training, without a repo id or token
    set_seed(args.seed)

    # Data, settings, reward functions and the reward-model gate first: each fails in a second, before a model loads.
    limit = row_char_limit(args.max_prompt_length)  # longer prompts are dropped (with a warning) by the trainer
    train_data = load_data(data_args.dataset_name, kind="prompt", split=data_args.dataset_train_split, seed=args.seed,
                           max_chars=limit)
    eval_data = load_data(data_args.eval_source, kind="prompt", split=data_args.dataset_test_split, seed=args.seed,
                          max_chars=limit)
    check_eval_data(args, has_eval_data=eval_data is not None)
    if not model_args.use_peft:
        raise ValueError("PPO trains the policy as a LoRA adapter (the reference is the same weights with it "
                         "disabled): set use_peft: true (add load_in_4bit: true for QLoRA)")
    if args.critic == "full" and not (args.critic_model_path or sources.reward_model_path):
        raise ValueError("critic: full starts the critic from critic_model_path or reward_model_path; set one")
    resume = resume_checkpoint(args.output_dir, args.resume_from_checkpoint)

    tokenizer = load_model_tokenizer(model_args, trust_remote_code=args.trust_remote_code)
    prepare_tokenizer(tokenizer)  # the SFT tokenizer already has its template and pad token: this changes nothing
    dropped = length_metrics(count_over_length(data_args.dataset_name, "prompt", data_args.dataset_train_split,
                                               tokenizer, args.max_prompt_length), args.max_prompt_length,
                             action="dropped")
    # The reward model, Python functions, evaluation-only functions and the missing-stop penalty, as every RL stage
    # loads them; PPO applies the penalty itself, to the rollout's stop flags.
    rewards = load_rewards(sources, tokenizer, weights=args.reward_weights, trust_remote_code=args.trust_remote_code)
    model = load_model(model_args, tokenizer, trust_remote_code=args.trust_remote_code)
    critic_model = None
    if args.critic == "full":
        critic_model = load_full_critic(args.critic_model_path or sources.reward_model_path, tokenizer,
                                        args.trust_remote_code)
    # The SFT tokenizer already has its chat template, so lora_config adds no trainable token rows: plain LoRA.
    peft_config = lora_config(model_args, tokenizer)

    trainer = PPOTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=train_data,
        eval_dataset=eval_data,
        rewards=rewards,
        peft_config=peft_config,
        critic_model=critic_model,
        callbacks=callbacks,
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)

    # Held-out prompts: the SFT policy's scores (the step-0 evaluation, with eval_on_start) against the final ones.
    metrics = {"train_loss": train_result.training_loss, "parallelism": parallelism(trainer), **dropped}
    if eval_data is not None:
        start, final = start_and_final_evaluation(trainer, "eval_reward")
        metrics.update({f"{k}_at_start": v for k, v in start.items() if k.startswith("eval_")})
        metrics.update({k: v for k, v in final.items() if k.startswith("eval_")})
    trainer.save_state()  # trainer_state.json: the log history, periodic evaluations included
    trainer.close()  # the vLLM engine, with generation_backend: vllm
    if "accuracy" in rewards.report:
        metrics["reward_model_accuracy"] = rewards.report["accuracy"]

    if trainer.is_world_process_zero():
        save_config(args.output_dir, data_args, model_args, args, sources)
        write_stage(args.output_dir, "ppo", model=model_args.model_name_or_path, data=data_args.dataset_name,
                    config=to_dict(data_args, model_args, args, sources), metrics=metrics)
        publish_stage(args.output_dir, push)
        print(format_summary("ppo", args.output_dir, metrics))
    return trainer


def load_full_critic(path, tokenizer, trust_remote_code):
    """critic: full — a trainable copy of the reward model (or critic_model_path), which must share the tokenizer."""
    critic = RewardModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    mode, problem = tokenizer_compatibility(critic.tokenizer, tokenizer)
    if mode != "shared" or problem:
        raise ValueError("critic: full scores the policy's own tokens, so its model must share the policy's "
                         "tokenizer; use critic: lora (the default) with this reward model")
    return critic.model


if __name__ == "__main__":
    run_main(main)  # a user error: its message, no traceback
    end_processes()  # every process done before any leaves; a live gloo group can abort the exit
