"""Stage 1: pretraining. Builds the embedded tiny base model, or continues pretraining a real one on raw text.

    accelerate launch --config_file accelerate_config.yaml recipes/pretrain.py --config recipes/configs/pretrain/tiny.yaml

From scratch it trains a byte-level BPE tokenizer and a small LLaMA on `dataset_name` (a `text` column), packs the
corpus into `block_size` blocks and saves an ordinary Hugging Face model directory. With `base_model` set it
continues pretraining that model instead (same packing, its own tokenizer).
"""


import rlhf_kit  # noqa: F401  before transformers: bitsandbytes then never reaches the Hub (rlhf_kit/hub_kernels.py)
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, set_seed
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from rlhf_kit.config import parse_config, save_config, to_dict
from rlhf_kit.errors import run_main
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.data.loading import load_data
from rlhf_kit.training.distributed import apply_global_batch_size, end_processes
from rlhf_kit.model import load_tokenizer
from rlhf_kit.training.pretraining import pack_blocks, tiny_llama_config, train_tokenizer
from rlhf_kit.publish.hub import publish_stage, take_over_push
from rlhf_kit.runs import format_summary, resume_checkpoint, train_and_save, write_stage


def main(argv=None, overrides=None):
    args, training_args = parse_config(*recipe_arguments("pretrain"), args=argv, overrides=overrides)
    apply_global_batch_size(training_args)  # gradient accumulation for this launch's process count
    push = take_over_push(training_args)  # fails now, not after training, without a repo id or token
    set_seed(training_args.seed)
    out = training_args.output_dir
    train_data = load_data(args.dataset_name, kind="text", split="train", seed=training_args.seed)
    eval_data = load_data(args.dataset_name, kind="text", split="test", seed=training_args.seed)

    # Tokenizer: the base model's, or a new one. A resumed run reuses the one it saved, so ids cannot shift.
    resume = resume_checkpoint(out, training_args.resume_from_checkpoint)
    if args.base_model:
        tokenizer = load_tokenizer(args.base_model)
        model = AutoModelForCausalLM.from_pretrained(args.base_model, use_safetensors=True)
    else:
        tokenizer = load_tokenizer(resume) if resume else train_tokenizer(train_data["text"], args.vocab_size)
        model = LlamaForCausalLM(tiny_llama_config(args, tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pads short blocks: the last one, and most with bfd_split packing

    trainer = Trainer(
        model=model,
        args=training_args,
        # TRL's collator ignores only the padding in the loss; transformers' ignores every token equal to the pad token,
        # which for a base whose pad is its EOS would be every document's end.
        data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
        train_dataset=pack_blocks(train_data, tokenizer, args.block_size, args.packing),
        eval_dataset=None if eval_data is None else pack_blocks(eval_data, tokenizer, args.block_size, args.packing),
        processing_class=tokenizer,
    )
    train_loss = train_and_save(trainer, resume, out)  # the whole run's loss, a resume's start included
    metrics = {"train_loss": train_loss, "parameters": model.num_parameters()}
    if eval_data is not None:
        metrics.update(trainer.evaluate())

    if trainer.is_world_process_zero():
        save_config(out, args, training_args)
        write_stage(out, "pretrain", model=args.base_model or "from scratch", data=args.dataset_name,
                    config=to_dict(args, training_args), metrics=metrics)
        publish_stage(out, push)
        print(format_summary("pretrain", out, metrics))
    return trainer


if __name__ == "__main__":
    run_main(main)  # a user error: its message, no traceback
    end_processes()  # every process done before any leaves; a live gloo group can abort the exit
