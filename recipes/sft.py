"""Stage 2: supervised fine-tuning (LoRA, QLoRA or full) with TRL's SFTTrainer.

    accelerate launch --config_file accelerate_config.yaml recipes/sft.py --config recipes/configs/sft/tiny.yaml

Any key can be overridden on the command line (`--learning_rate 1e-4`). The output directory holds the adapter (or
full model), the tokenizer with its chat template, the resolved config and the stage record. An interrupted run
resumes from its last checkpoint when started again with the same output_dir.
"""

import rlhf_kit  # noqa: F401  before transformers: bitsandbytes then never reaches the Hub (rlhf_kit/hub_kernels.py)
from transformers import set_seed
from trl import SFTTrainer

from rlhf_kit.data.chat_template import (RENDERED, assistant_mask_source, check_tool_support,
                                         tokenize_for_assistant_loss)
from rlhf_kit.config import parse_config, save_config, to_dict
from rlhf_kit.errors import run_main
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.data.loading import detect_dataset_format, load_data, row_char_limit
from rlhf_kit.training.distributed import apply_global_batch_size, end_processes
from rlhf_kit.model import load_model, load_model_tokenizer, lora_config, prepare_tokenizer
from rlhf_kit.publish.hub import publish_stage, take_over_push
from rlhf_kit.data.lengths import count_over_length, length_metrics
from rlhf_kit.runs import format_summary, resume_checkpoint, train_and_save, write_stage
from rlhf_kit.training.settings import check_eval_data
from rlhf_kit.training.sft import resolve_loss_masking


def main(argv=None, overrides=None, callbacks=None):
    data_args, model_args, args = parse_config(*recipe_arguments("sft"), args=argv, overrides=overrides)
    apply_global_batch_size(args)  # gradient accumulation for this launch's process count
    push = take_over_push(args)  # fails now, not after training, without a repo id or token
    set_seed(args.seed)

    # Data first: a bad row or a contradictory setting must fail before minutes of model loading.
    max_length = None if args.packing else args.max_length  # packing cuts nothing: it fills blocks
    train_data = load_data(data_args.dataset_name, kind="sft", split=data_args.dataset_train_split, seed=args.seed,
                           max_chars=row_char_limit(max_length))
    eval_data = None
    if args.eval_strategy != "no":
        eval_data = load_data(data_args.eval_source, kind="sft", split=data_args.dataset_test_split, seed=args.seed,
                              max_chars=row_char_limit(max_length))
    resolve_loss_masking(args, detect_dataset_format(train_data, "sft"), data_args.dataset_name)
    check_eval_data(args, has_eval_data=eval_data is not None)
    resume = resume_checkpoint(args.output_dir, args.resume_from_checkpoint)

    tokenizer = load_model_tokenizer(model_args, trust_remote_code=args.trust_remote_code)
    new_chat_template = tokenizer.chat_template is None
    prepare_tokenizer(tokenizer)
    if args.chat_template_path is None:  # TRL swaps that template in later; the tokenizer's own is checked here
        check_tool_support(tokenizer, train_data, data_args.dataset_name)  # tool rows need a template with tools
    truncated = length_metrics(count_over_length(data_args.dataset_name, "sft", data_args.dataset_train_split,
                                                 tokenizer, max_length), max_length, action="truncated")
    # Assistant-only loss with a template TRL cannot mask (Llama 3.1, Mistral, a plain ChatML): the kit tokenizes
    # the conversations and hands TRL each row's assistant mask. Checked before the model loads.
    own_masks = bool(args.assistant_only_loss) and assistant_mask_source(tokenizer) == RENDERED
    if own_masks:
        train_data = tokenize_for_assistant_loss(train_data, tokenizer, data_args.dataset_name)
        if eval_data is not None:
            eval_data = tokenize_for_assistant_loss(eval_data, tokenizer, data_args.eval_source)
    model = load_model(model_args, tokenizer, trust_remote_code=args.trust_remote_code)
    peft_config = lora_config(model_args, tokenizer, tied_embeddings=model.config.tie_word_embeddings,
                              new_chat_template=new_chat_template)

    args.assistant_only_loss = args.assistant_only_loss and not own_masks  # pre-masked rows need no template
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    args.assistant_only_loss = args.assistant_only_loss or own_masks  # the saved config says what was trained
    train_loss = train_and_save(trainer, resume, args.output_dir)  # the whole run's loss, a resume's start included
    metrics = {"train_loss": train_loss, **truncated}
    if eval_data is not None:
        metrics.update(trainer.evaluate())

    if trainer.is_world_process_zero():
        save_config(args.output_dir, data_args, model_args, args)
        write_stage(args.output_dir, "sft", model=model_args.model_name_or_path, data=data_args.dataset_name,
                    config=to_dict(data_args, model_args, args), metrics=metrics)
        publish_stage(args.output_dir, push)
        print(format_summary("sft", args.output_dir, metrics))
    return trainer


if __name__ == "__main__":
    run_main(main)  # a user error: its message, no traceback
    end_processes()  # every process done before any leaves; a live gloo group can abort the exit
