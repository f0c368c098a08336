"""Stage 4, DPO: the SFT policy trained directly on preference pairs with TRL's DPOTrainer, no reward model.

    accelerate launch --config_file accelerate_config.yaml recipes/dpo.py --config recipes/configs/dpo/tiny.yaml

The policy starts from the SFT output (an adapter is merged into its base first) and trains a LoRA adapter (QLoRA
with load_in_4bit: true); the reference is that same model with the adapter disabled, so no second copy of the
weights is loaded. With use_peft: false, TRL loads a frozen copy of the starting model as the reference. The
held-out split is evaluated at the end: eval_rewards/accuracies is the share of held-out pairs whose chosen response
gets the higher implicit reward beta * log(pi / pi_ref) (ties, as at the start where pi == pi_ref, count as wrong).
The output directory holds the adapter (or full model), the tokenizer, the resolved config, a model card and the
stage record. An interrupted run resumes from its last checkpoint when started again with the same output_dir.
"""

import rlhf_kit  # noqa: F401  before transformers: bitsandbytes then never reaches the Hub (rlhf_kit/hub_kernels.py)
from transformers import set_seed
from trl import DPOTrainer

from rlhf_kit.config import parse_config, save_config, to_dict
from rlhf_kit.errors import run_main
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.data.loading import load_data, row_char_limit
from rlhf_kit.training.distributed import apply_global_batch_size, end_processes, parallelism, shard_on_cpu
from rlhf_kit.training.dpo import check_dpo_setup
from rlhf_kit.publish.hub import publish_stage, take_over_push
from rlhf_kit.model import load_model, load_model_tokenizer, lora_config, prepare_tokenizer
from rlhf_kit.data.lengths import count_over_length, length_metrics
from rlhf_kit.runs import (
    format_summary,
    resume_checkpoint,
    start_and_final_evaluation,
    train_and_save,
    write_stage,
)


def main(argv=None, overrides=None, callbacks=None):
    data_args, model_args, args = parse_config(*recipe_arguments("dpo"), args=argv, overrides=overrides)
    push = take_over_push(args)  # fails now, not after training, without a repo id or token
    apply_global_batch_size(args)  # gradient accumulation for this launch's process count
    set_seed(args.seed)

    # Data first: a bad row or a contradictory setting must fail before minutes of model loading.
    train_data = load_data(data_args.dataset_name, kind="preference", split=data_args.dataset_train_split,
                           seed=args.seed, max_chars=row_char_limit(args.max_length))
    eval_data = load_data(data_args.eval_source, kind="preference", split=data_args.dataset_test_split, seed=args.seed,
                          max_chars=row_char_limit(args.max_length))
    check_dpo_setup(model_args, args, has_eval_data=eval_data is not None)
    resume = resume_checkpoint(args.output_dir, args.resume_from_checkpoint)

    tokenizer = load_model_tokenizer(model_args, trust_remote_code=args.trust_remote_code)
    new_chat_template = tokenizer.chat_template is None  # DPO straight from a base model: it gets ChatML here
    prepare_tokenizer(tokenizer)
    truncated = length_metrics(count_over_length(data_args.dataset_name, "preference", data_args.dataset_train_split,
                                                 tokenizer, args.max_length), args.max_length, action="truncated")
    model = load_model(model_args, tokenizer, trust_remote_code=args.trust_remote_code)
    peft_config = lora_config(model_args, tokenizer, tied_embeddings=model.config.tie_word_embeddings,
                              new_chat_template=new_chat_template)

    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    shard_on_cpu(trainer)  # an FSDP launch on CPUs shards as it would on GPUs
    train_loss = train_and_save(trainer, resume, args.output_dir)  # the whole run's loss, a resume's start included
    # Held-out pairs at the start (with eval_on_start: loss log 2, no pair ranked yet) and at the end.
    metrics = {"train_loss": train_loss, "parallelism": parallelism(trainer), **truncated}
    if eval_data is not None:
        start, final = start_and_final_evaluation(trainer, "eval_loss")
        kept = ("eval_loss", "eval_rewards/")
        metrics.update({f"{k}_at_start": v for k, v in start.items() if k.startswith(kept)})
        metrics.update({k: v for k, v in final.items() if k.startswith(kept)})
    trainer.save_state()  # trainer_state.json: the log history, periodic evaluations included

    if trainer.is_world_process_zero():
        save_config(args.output_dir, data_args, model_args, args)
        write_stage(args.output_dir, "dpo", model=model_args.model_name_or_path, data=data_args.dataset_name,
                    config=to_dict(data_args, model_args, args), metrics=metrics)
        publish_stage(args.output_dir, push)
        print(format_summary("dpo", args.output_dir, metrics))
    return trainer


if __name__ == "__main__":
    run_main(main)  # a user error: its message, no traceback
    end_processes()  # every process done before any leaves; a live gloo group can abort the exit
