"""One PPO update on a fixed global rollout, run by tests/test_distributed.py on 1 process (imported) and on 2
(through `accelerate launch`, DDP or FSDP2). Every process samples the same global rollout (same seed, same prompts,
same batch), then scores, whitens and updates on its own half, so the two runs end with the same weights only if
the advantages are whitened over both halves, the gradients averaged over both processes (DDP's all-reduce or
FSDP2's reduce-scatter), and the loss weighted by every process's tokens.

    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml tests/ppo_update_worker.py SFT_DIR OUT_FILE
    accelerate launch --config_file accelerate_configs/cpu_fsdp2.yaml tests/ppo_update_worker.py SFT_DIR OUT_FILE
"""

import sys

import torch
from safetensors.torch import save_file

from rlhf_kit.data.loading import load_data
from rlhf_kit.training.distributed import apply_global_batch_size, end_processes
from rlhf_kit.model import ModelArguments, load_model, load_tokenizer, lora_config
from rlhf_kit.rewards import Rewards
from rlhf_kit.training.ppo.trainer import PPOTrainer
from rlhf_kit.training.ppo.config import PPOConfig

GLOBAL_BATCH = 8


def length_reward(prompts, completions, **columns):
    """Longer is better."""
    return [float(len(c[-1]["content"])) / 10 for c in completions]


def update_once(sft: str, output_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The trainable weights before and after one PPO update (SGD, one mini-batch, one epoch) on GLOBAL_BATCH prompts."""
    torch.manual_seed(0)  # the adapters' and value head's initialization, equal on every process and in every run
    tokenizer = load_tokenizer(sft)
    model_args = ModelArguments(model_name_or_path=sft, use_peft=True, lora_r=8, lora_alpha=16,
                                train_chat_tokens=False)
    # SGD: the step is the gradient itself, so any error in how it is averaged shows in the weights.
    args = PPOConfig(output_dir=output_dir, per_device_train_batch_size=2, global_batch_size=GLOBAL_BATCH,
                     num_mini_batches=1, num_ppo_epochs=1, response_length=12, optim="sgd", learning_rate=0.5,
                     max_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                     log_completions=0)
    apply_global_batch_size(args, mini_batches=args.num_mini_batches)
    prompts = load_data("data/prompts", kind="prompt")
    trainer = PPOTrainer(model=load_model(model_args, tokenizer), args=args, processing_class=tokenizer,
                         train_dataset=prompts, rewards=Rewards(funcs=[length_reward]),
                         peft_config=lora_config(model_args, tokenizer))
    trainer._setup_training(None)
    start = trainer._trainable_state()  # gathered from the shards under FSDP2
    torch.manual_seed(0)
    rollout = trainer.sample(prompts[:GLOBAL_BATCH])  # the same global rollout on every process
    # Responses of 2, 3, ... 9 tokens: the processes' halves then hold different token counts (a briefly trained
    # policy rarely stops early by itself), which the loss's token weighting must see across processes.
    keep = torch.arange(rollout.response_mask.shape[1]) < 2 + torch.arange(GLOBAL_BATCH)[:, None]
    rollout.response_mask = rollout.response_mask * keep
    share = GLOBAL_BATCH // args.world_size
    mine = rollout.select(torch.arange(args.process_index * share, (args.process_index + 1) * share))
    trainer.train_on(mine)  # as train() does with each rollout
    return start, trainer._trainable_state()


if __name__ == "__main__":
    sft_dir, out_file = sys.argv[1], sys.argv[2]
    _, weights = update_once(sft_dir, out_file + ".run")
    if torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if torch.distributed.get_rank() == 0:
            save_file({**weights, "world_size": torch.tensor(world)}, out_file)
    else:
        save_file({**weights, "world_size": torch.tensor(1)}, out_file)
    end_processes()  # as every launched recipe ends: no gloo worker frees FSDP2's last all-gathers at exit
