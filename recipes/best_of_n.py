"""Best-of-N (rejection sampling): N completions per prompt from a policy, scored by the reward model and/or reward
functions; the best of each prompt is written as an SFT dataset.

    python recipes/best_of_n.py --config recipes/configs/best_of_n/tiny.yaml
    rlhf-kit best-of-n outputs/tiny-sft --config recipes/configs/best_of_n/tiny.yaml --n 8   # the same recipe

The output directory is a dataset directory: train.jsonl holds one row per prompt (`messages` for conversational
prompts, prompt/completion for plain ones), so `recipes/sft.py --dataset_name <output_dir>` trains on it
(rejection-sampling fine-tuning; repeat from the new SFT output for more iterations). Rows are written in prompt
order as they are done; a rerun with the same settings resumes after the last complete row.
"""

import rlhf_kit  # noqa: F401  before transformers: bitsandbytes then never reaches the Hub (rlhf_kit/hub_kernels.py)
import torch
from transformers import set_seed

from rlhf_kit.inference.best_of_n import write_best_of_n
from rlhf_kit.config import parse_config, save_config, to_dict
from rlhf_kit.errors import run_main
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.data.loading import load_data
from rlhf_kit.training.distributed import end_processes
from rlhf_kit.inference.generation import Policy, with_engine
from rlhf_kit.model import load_model, load_model_tokenizer, prepare_tokenizer, stop_token_ids
from rlhf_kit.rewards import load_reward_functions
from rlhf_kit.runs import format_summary, write_stage


def main(argv=None, overrides=None, callbacks=None):
    data_args, model_args, args, sources = parse_config(*recipe_arguments("best_of_n"), args=argv, overrides=overrides)
    set_seed(args.seed)

    # Data first: a bad row must fail before any model loads.
    prompts = load_data(data_args.dataset_name, kind="prompt", split=data_args.dataset_train_split, seed=args.seed)
    if args.num_prompts is not None:
        prompts = prompts.select(range(min(args.num_prompts, len(prompts))))

    tokenizer = load_model_tokenizer(model_args, trust_remote_code=args.trust_remote_code)
    prepare_tokenizer(tokenizer)  # a base model gets the chat template SFT would give it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The missing-stop penalty looks for the policy's stop tokens (its own EOS included), read from its saved config.
    stops = stop_token_ids(tokenizer, model_args.model_name_or_path, revision=model_args.model_revision)
    reward_funcs, weights, reward_report = load_reward_functions(
        sources, tokenizer, stop_ids=stops, weights=args.reward_weights, device=device,
        trust_remote_code=args.trust_remote_code)
    model = load_model(model_args, tokenizer, trust_remote_code=args.trust_remote_code)
    vllm = args.generation_backend == "vllm"  # then a vLLM engine samples and the model stays on the CPU
    if not (model_args.load_in_4bit or model_args.load_in_8bit or vllm):  # bitsandbytes placed a quantized model
        model = model.to(device)
    policy = Policy(model_args.model_name_or_path, model.eval(), tokenizer)
    if vllm:
        with_engine(policy, model_args.model_name_or_path)

    metrics = write_best_of_n(policy, prompts, args.output_dir, n=args.n, reward_funcs=reward_funcs, weights=weights,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              batch_size=args.batch_size, seed=args.seed)
    policy.close()
    if "accuracy" in reward_report:
        metrics["reward_model_accuracy"] = reward_report["accuracy"]

    save_config(args.output_dir, data_args, model_args, args, sources)
    write_stage(args.output_dir, "best_of_n", model=model_args.model_name_or_path, data=data_args.dataset_name,
                config=to_dict(data_args, model_args, args, sources), metrics=metrics)
    print(format_summary("best_of_n", args.output_dir, metrics))
    return metrics


if __name__ == "__main__":
    run_main(main)  # a user error: its message, no traceback
    end_processes()  # every process done before any leaves; a live gloo group can abort the exit
