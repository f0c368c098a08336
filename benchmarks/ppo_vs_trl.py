"""rlhf-kit's PPOTrainer against TRL 1.12.0's `trl.experimental.ppo.PPOTrainer`: episodes per second and peak memory.

    python benchmarks/ppo_vs_trl.py                  # the tiny default: outputs/tiny-sft and outputs/tiny-reward
    python benchmarks/ppo_vs_trl.py --updates 12 --threads 1 --repeats 2
    python benchmarks/ppo_vs_trl.py --shape 1024x8   # random-init policy and reward model, 1024 wide, 8 layers

TRL removed PPO in 2026 (1.12.0 was the last release with `trl.experimental.ppo`), so the baseline goes into its own
virtual environment (`$TMPDIR/rlhf-kit-trl-1.12`, made on the first run with `pip install --no-deps trl==1.12.0`). That
environment borrows torch, transformers, peft, accelerate and datasets from this one through a .pth file, so the
trainers are the only difference. Each trainer runs in a fresh process, so the peak memory is its own: peak RSS on
CPU, `torch.cuda.max_memory_allocated` on a GPU.

Same policy (the SFT model, LoRA r16 on all linear layers), same reward model (merged), same prompts and settings:
32 prompts per update, micro-batches of 16, 2 mini-batches, 2 PPO epochs, 16 new tokens at temperature 0.7. The one
difference is what each trainer offers for the critic: TRL trains a full copy of the reward model as value model,
rlhf-kit a LoRA adapter plus value head on the policy's base. Throughput counts the updates after the first (warm-up).

The tiny model's weights are a few MB, so its peak memory is mostly the runtime's; `--shape HIDDENxLAYERS` builds
random-init policy and reward models of that shape (same tokenizer, nothing downloaded) where the weights, the value
model and its optimizer states count.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS_PER_UPDATE = 32
SHARED = dict(num_ppo_epochs=2, response_length=16, temperature=0.7, kl_coef=0.05, missing_eos_penalty=1.0,
              learning_rate=1e-3, lr_scheduler_type="constant", report_to="none", save_strategy="no",
              logging_steps=1, disable_tqdm=True, seed=0, per_device_train_batch_size=16, bf16=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", default="outputs/tiny-sft")
    parser.add_argument("--reward", default="outputs/tiny-reward")
    parser.add_argument("--shape", help="HIDDENxLAYERS: random-init models of this shape instead of --sft/--reward")
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per trainer (1 is steadiest on a shared box)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per trainer; the fastest counts")
    parser.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "rlhf-kit-trl-1.12"))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=["rlhf_kit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return print("RESULT " + json.dumps(run_worker(args.worker, json.loads(args.spec))))

    models = random_models(args.sft, args.shape) if args.shape else prepare_models(args.sft, args.reward)
    spec = {"updates": args.updates, "threads": args.threads, "shape": args.shape, **models}
    trl_python = ensure_trl_venv(Path(args.venv))
    results = {}
    for kind, python in (("trl", trl_python), ("rlhf_kit", sys.executable)):
        runs = [run_subprocess(python, kind, spec) for _ in range(args.repeats)]
        results[kind] = max(runs, key=lambda r: r["episodes_per_second"])
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "results": results}, indent=2))


def prepare_models(sft: str, reward: str) -> dict:
    """Full model directories both trainers can load: the SFT adapter merged, the reward model merged."""
    from rlhf_kit.model import is_adapter_dir, merged_model_dir
    from rlhf_kit.rewards import RewardModel

    policy = str(merged_model_dir(sft)) if is_adapter_dir(sft) else sft
    key = hashlib.sha1(os.path.abspath(reward).encode()).hexdigest()[:12]  # str hash() changes between processes
    merged_reward = Path(tempfile.gettempdir()) / f"ppo-bench-reward-{key}"
    if not (merged_reward / "config.json").is_file():
        RewardModel.from_pretrained(reward, device="cpu").save_pretrained(merged_reward)
    return {"policy": os.path.abspath(policy), "reward": str(merged_reward),
            "prompts": str(REPO / "data/prompts/train.jsonl")}


def random_models(sft: str, shape: str) -> dict:
    """A policy and a reward model of `shape` ("1024x8": hidden size x layers), randomly initialised from a fixed
    seed, with the SFT model's tokenizer and chat template: real sizes for memory, nothing downloaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_kit.model import is_adapter_dir, merged_model_dir

    source = str(merged_model_dir(sft)) if is_adapter_dir(sft) else sft
    hidden, layers = (int(x) for x in shape.lower().split("x"))
    heads = max(hidden // 64, 1)
    config = AutoConfig.from_pretrained(source)
    config.update(dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 8 // 3,
                       num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads))
    tokenizer = AutoTokenizer.from_pretrained(source)
    root = Path(tempfile.gettempdir()) / f"ppo-bench-random-{shape}"
    for name, auto in (("policy", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        if not (root / name / "config.json").is_file():
            torch.manual_seed(0)
            config.num_labels = 1  # the reward model's single score; ignored by the causal LM
            model = auto.from_config(config)
            model.config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(root / name)
            tokenizer.save_pretrained(root / name)
    return {"policy": str(root / "policy"), "reward": str(root / "reward"),
            "prompts": str(REPO / "data/prompts/train.jsonl")}


def ensure_trl_venv(venv: Path) -> str:
    python = venv / "bin/python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # The new environment sees this one's packages after its own, so its trl 1.12.0 shadows our trl.
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "zz_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "trl==1.12.0"], check=True)
    return str(python)


def run_subprocess(python: str, kind: str, spec: dict) -> dict:
    cmd = [python, __file__, "--worker", kind, "--spec", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_worker(kind: str, spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(spec["threads"])

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    clock = Clock()
    trainer = (build_trl if kind == "trl" else build_rlhf_kit)(spec, clock, tempfile.mkdtemp())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count (VmHWM) here
    trainer.train()
    steady = (len(clock.times) - 1) * PROMPTS_PER_UPDATE / (clock.times[-1] - clock.times[0])
    if torch.cuda.is_available():
        peak, unit = torch.cuda.max_memory_allocated(), "peak CUDA memory allocated"
    else:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        peak, unit = int(status["VmHWM"].split()[0]) * 1024, "peak process RSS during train()"
    import trl

    return {"episodes_per_second": steady, "peak_memory_mb": peak / 2**20, "updates": len(clock.times),
            "memory": unit, "trl": trl.__version__}


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def build_rlhf_kit(spec, clock, output_dir):
    from rlhf_kit.data.loading import load_data
    from rlhf_kit.model import ModelArguments, load_model, load_tokenizer
    from rlhf_kit.rewards import RewardModel, Rewards
    from rlhf_kit.training.ppo.trainer import PPOTrainer
    from rlhf_kit.training.ppo.config import PPOConfig

    tokenizer = load_tokenizer(spec["policy"])
    model = load_model(ModelArguments(model_name_or_path=spec["policy"]), tokenizer)
    # 32 prompts per update = 16 per micro-batch x 2 accumulated x 1 mini-batch.
    # The missing-stop penalty is a reward setting in rlhf-kit (RewardSources, then Rewards), a PPOConfig one in TRL.
    shared = {k: v for k, v in SHARED.items() if k != "missing_eos_penalty"}
    args = PPOConfig(output_dir=output_dir, gradient_accumulation_steps=2, num_mini_batches=1,
                     max_steps=spec["updates"], rollout_forward_batch_size=32, log_completions=0, **shared)
    reward_model = RewardModel.from_pretrained(spec["reward"], device="cpu" if not _cuda() else None)
    return PPOTrainer(model=model, args=args, processing_class=tokenizer,
                      train_dataset=load_data(spec["prompts"], kind="prompt"),
                      rewards=Rewards(reward_model, missing_eos_penalty=SHARED["missing_eos_penalty"]),
                      peft_config=lora(), callbacks=[clock])


def build_trl(spec, clock, output_dir):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    prompts = load_dataset("json", data_files=spec["prompts"], split="train")
    prompts = prompts.map(lambda row: {"input_ids": tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]}, remove_columns=prompts.column_names)
    # TRL 1.12 counts differently: rollout = per_device x accumulation = 32, one mini-batch of 2 micro-batches of 16.
    args = PPOConfig(output_dir=output_dir, gradient_accumulation_steps=2, num_mini_batches=1, stop_token="eos",
                     total_episodes=spec["updates"] * PROMPTS_PER_UPDATE, num_sample_generations=0,
                     local_rollout_forward_batch_size=32, **SHARED)
    device = "cuda" if _cuda() else "cpu"
    return PPOTrainer(
        args=args, processing_class=tokenizer, peft_config=lora(), ref_model=None, train_dataset=prompts,
        model=AutoModelForCausalLM.from_pretrained(spec["policy"]).to(device),
        reward_model=AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1).to(device),
        value_model=AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1).to(device),
        callbacks=[clock])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def print_table(results: dict) -> None:
    ours, theirs = results["rlhf_kit"], results["trl"]
    print(f"{'trainer':<22}{'episodes/s':>12}{'peak MB':>10}")
    for name, r in (("TRL 1.12.0 PPOTrainer", theirs), ("rlhf-kit PPOTrainer", ours)):
        print(f"{name:<22}{r['episodes_per_second']:>12.2f}{r['peak_memory_mb']:>10.0f}")
    print(f"speed-up {ours['episodes_per_second'] / theirs['episodes_per_second']:.2f}x, "
          f"memory ratio {ours['peak_memory_mb'] / theirs['peak_memory_mb']:.2f} ({ours['memory']})")


if __name__ == "__main__":
    main()
