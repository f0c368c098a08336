"""Stage 3: a reward model from preference pairs (LoRA, QLoRA or full) with TRL's RewardTrainer.

    accelerate launch --config_file accelerate_config.yaml recipes/reward.py --config recipes/configs/reward/tiny.yaml

The model (the SFT output, or a base) gets a new one-output `score` head that is trained and saved with the adapter.
After training, the reward model is scored on a reference set to record the normalization (mean 0, std 1) and on the
held-out pairs for the report that PPO's gate reads: the data's test split, or, for a single file or data without one,
eval_holdout_fraction of the training pairs held out of training (data too small for that is scored in-sample, which
the report says and the gate refuses). The output directory holds the adapter (or full model), the
tokenizer with its chat template, rlhf_kit_reward.json (normalization, base model), reward_eval.json (the report),
the resolved config and the stage record. An interrupted run resumes from its last checkpoint when started again.
"""

import rlhf_kit  # noqa: F401  before transformers: bitsandbytes then never reaches the Hub (rlhf_kit/hub_kernels.py)
from transformers import set_seed
from trl import RewardTrainer

from rlhf_kit.config import parse_config, save_config, to_dict
from rlhf_kit.errors import run_main
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.data.loading import detect_dataset_format, load_data, row_char_limit
from rlhf_kit.training.distributed import apply_global_batch_size, end_processes
from rlhf_kit.model import load_model, load_model_tokenizer, prepare_tokenizer
from rlhf_kit.training.reward_model import (
    check_reward_setup,
    evaluate_reward_model,
    fit_normalization,
    ensemble_metadata,
    ensemble_report,
    format_report,
    hold_out,
    member_arguments,
    member_data,
    read_whole,
    reference_samples,
    reward_lora_config,
    reward_metadata,
)
from rlhf_kit.rewards import IN_SAMPLE, RewardModel, load_reward_model, write_reward_files
from rlhf_kit.publish.hub import publish_stage, take_over_push
from rlhf_kit.data.lengths import count_over_length, length_metrics
from rlhf_kit.runs import format_summary, resume_checkpoint, train_and_save, write_stage


def main(argv=None, overrides=None, callbacks=None):
    data_args, model_args, args = parse_config(*recipe_arguments("reward"), args=argv, overrides=overrides)
    apply_global_batch_size(args)  # gradient accumulation for this launch's process count
    push = take_over_push(args)  # fails now, not after training, without a repo id or token
    set_seed(args.seed)

    # Data first: a bad row or a contradictory setting must fail before minutes of model loading.
    train_data = load_data(data_args.dataset_name, kind="preference", split=data_args.dataset_train_split,
                           seed=args.seed, max_chars=row_char_limit(args.max_length))
    # The report and PPO's gate need pairs the model never trained on: the data's test split, else a seeded share of
    # the training pairs. A file or glob has no splits (it would be read whole again), so it never counts as one.
    own_split = data_args.eval_dataset_name is not None or not read_whole(data_args.dataset_name)
    eval_data = None
    if own_split:
        eval_data = load_data(data_args.eval_source, kind="preference", split=data_args.dataset_test_split,
                              seed=args.seed, max_chars=row_char_limit(args.max_length))
    train_data, eval_data, held_out = hold_out(train_data, eval_data, fraction=args.eval_holdout_fraction,
                                               seed=args.seed)
    # The normalization reference: reference_dataset, else the held-out pairs (the training pairs if in-sample).
    reference_source = args.reference_dataset or (data_args.eval_source if held_out is None
                                                  else f"{data_args.dataset_name} ({held_out})")
    reference_data = eval_data
    if args.reference_dataset is not None:
        reference_data = load_data(args.reference_dataset, kind="preference", split=data_args.dataset_test_split,
                                   seed=args.seed)
        if reference_data is None:
            raise ValueError(f"reference_dataset {args.reference_dataset} has no '{data_args.dataset_test_split}' "
                             "split; give a file (used whole) or a directory with that split.")
    conversational = detect_dataset_format(train_data, "preference").endswith("_conversational")
    check_reward_setup(model_args, args, has_eval_data=held_out != IN_SAMPLE)
    # One reward model, or an ensemble: K LoRA adapters trained one after another, each in its own directory.
    members = member_arguments(args)
    resumes = [resume_checkpoint(member.output_dir, args.resume_from_checkpoint) for member in members]

    tokenizer = load_model_tokenizer(model_args, trust_remote_code=args.trust_remote_code)
    added = prepare_tokenizer(tokenizer)
    # TRL's RewardTrainer drops training pairs longer than max_length; counted here, with the rendering it uses.
    dropped = length_metrics(count_over_length(data_args.dataset_name, "preference", data_args.dataset_train_split,
                                               tokenizer, args.max_length), args.max_length, action="dropped")
    # Normalization reference, the same for every member.
    batch_size = args.per_device_eval_batch_size
    reference = reference_samples(reference_data, args.reference_pairs, args.seed)
    losses, accuracies = [], []
    for member, resume in zip(members, resumes):
        if len(members) > 1:
            set_seed(member.seed)
        model = load_model(model_args, tokenizer, sequence_classification=True,
                           trust_remote_code=args.trust_remote_code)
        base_model = model.config.name_or_path  # the SFT adapter's merged directory, or the base itself
        trainer = RewardTrainer(
            model=model,
            args=member,
            train_dataset=member_data(train_data, args, member),
            eval_dataset=eval_data if args.eval_strategy != "no" and held_out != IN_SAMPLE else None,
            processing_class=tokenizer,
            peft_config=reward_lora_config(model_args, tokenizer, added),
            callbacks=callbacks,
        )
        # The whole run's loss, a resume's start included; each member resumes from its own checkpoints.
        losses.append(train_and_save(trainer, resume, member.output_dir))

        # Normalize and evaluate with the scoring code PPO uses. Every process scores (a sharded model needs all
        # of them in each forward); only the main one writes.
        reward_model = RewardModel(trainer.model, tokenizer, conversational=conversational)
        normalization = fit_normalization(reward_model.score(reference, batch_size=batch_size, normalize=False))
        reward_model.offset, reward_model.scale = normalization["offset"], normalization["scale"]
        report = evaluate_reward_model(reward_model, eval_data, buckets=args.calibration_buckets,
                                       batch_size=batch_size)
        metadata = reward_metadata(model_args, base_model, normalization=normalization, report=report,
                                   reference={"source": str(reference_source), "samples": len(reference)},
                                   conversational=conversational)
        accuracies.append(report["accuracy"])
        if len(members) > 1 and trainer.is_world_process_zero():
            write_reward_files(member.output_dir, metadata, report)
    if len(members) > 1:  # the ensemble's files, then its own report, scored as every stage after will score it
        metadata = ensemble_metadata(args, members, metadata)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(args.output_dir)  # the gate reads it
            write_reward_files(args.output_dir, metadata, None)
        trainer.accelerator.wait_for_everyone()
        report = ensemble_report(evaluate_reward_model(load_reward_model(args.output_dir), eval_data,
                                                       buckets=args.calibration_buckets, batch_size=batch_size),
                                 members, accuracies)
        normalization = {"offset": 0.0, "scale": 1.0}
        metadata["accuracy"] = report["accuracy"]
    metrics = {"train_loss": sum(losses) / len(losses), **normalization, **dropped, "eval_accuracy": report["accuracy"],
               "eval_mean_margin": report["mean_margin"], "eval_calibration_error": report["calibration_error"]}
    if held_out is not None:  # not the data's own test split: pairs held out here, or none (the gate reads this)
        report["held_out"] = metrics["eval_held_out"] = held_out
    if trainer.is_world_process_zero():
        write_reward_files(args.output_dir, metadata, report)
        save_config(args.output_dir, data_args, model_args, args)
        write_stage(args.output_dir, "reward", model=model_args.model_name_or_path, data=data_args.dataset_name,
                    config=to_dict(data_args, model_args, args), metrics=metrics)
        print(format_report(report))
        publish_stage(args.output_dir, push)
        print(format_summary("reward", args.output_dir, metrics))
    return trainer


if __name__ == "__main__":
    run_main(main)  # a user error: its message, no traceback
    end_processes()  # every process done before any leaves; a live gloo group can abort the exit
