"""SFT throughput of rlhf-kit's recipe against a plain TRL SFTTrainer script: training tokens per second, as a ratio.

    python benchmarks/sft_vs_trl.py                       # the tiny base (outputs/tiny-base), CPU, 1 thread
    python benchmarks/sft_vs_trl.py --model outputs/tiny-base --steps 30 --threads 1 --repeats 3

Both start from the same chat-ready copy of the model (rlhf-kit's chat template and pad token added once, up front,
so neither side trains new token rows), train LoRA r16 / alpha 32 on all linear layers with assistant-only loss on
the shipped conversations (data/sft), at the same batch size, sequence length, learning rate and seed. Each run is a
fresh process (`--worker`), the two alternate, and the fastest of `--repeats` counts. Throughput is the training
tokens the trainer counted (`num_tokens`) between the end of the first step (warm-up) and the end of the last,
divided by the wall time in between. The target: rlhf-kit / TRL >= 1 within the noise of repeats.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = dict(per_device_train_batch_size=16, max_length=128, learning_rate=2e-3, lr_scheduler_type="constant",
              warmup_steps=0, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
              disable_tqdm=True, seed=0, bf16=False)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="outputs/tiny-base", help="a base model directory (the pretrain output)")
    parser.add_argument("--data", default="data/sft")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (1 is steadiest on a shared box)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; the fastest counts")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=["rlhf_kit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return print("RESULT " + json.dumps(run_worker(args.worker, json.loads(args.spec))))

    work = Path(tempfile.mkdtemp(prefix="rlhf-kit-sft-bench-"))
    spec = {"model": str(chat_ready_copy(args.model, work / "start")), "data": args.data, "steps": args.steps,
            "threads": args.threads, "work": str(work)}
    runs = {"trl": [], "rlhf_kit": []}
    for _ in range(args.repeats):
        for kind in ("trl", "rlhf_kit"):
            runs[kind].append(run_subprocess(kind, spec))
    best = {kind: max(r, key=lambda x: x["tokens_per_second"]) for kind, r in runs.items()}
    ratio = best["rlhf_kit"]["tokens_per_second"] / best["trl"]["tokens_per_second"]
    print(f"SFT, {args.steps} steps of {SHARED['per_device_train_batch_size']} sequences <= {SHARED['max_length']} "
          f"tokens, {args.threads} thread(s), best of {args.repeats}")
    print(f"  {'':<10} {'tokens/s':>10} {'all runs':>30}")
    for kind, result in best.items():
        every = ", ".join(f"{r['tokens_per_second']:.0f}" for r in runs[kind])
        print(f"  {kind:<10} {result['tokens_per_second']:>10.0f} {every:>30}")
    print(f"  rlhf-kit / TRL: {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "runs": runs, "ratio": ratio}, indent=2))


def chat_ready_copy(model: str, out: Path) -> Path:
    """The base with rlhf-kit's chat template and pad token, saved once so that both sides start from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_kit.model import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prepare_tokenizer(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(model)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    base.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_subprocess(kind: str, spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{result.stderr[-3000:]}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_worker(kind: str, spec: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(spec["threads"])
    marks = []  # (wall time, tokens counted so far) at each logged step

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                marks.append((time.perf_counter(), float(logs["num_tokens"])))

    out = str(Path(spec["work"]) / f"{kind}-{os.getpid()}")
    if kind == "rlhf_kit":
        import runpy

        recipe = runpy.run_path(str(REPO / "recipes/sft.py"), run_name="recipe_sft")["main"]
        recipe(["--config", "recipes/configs/sft/tiny.yaml"], callbacks=[Clock()], overrides={
            **SHARED, "model_name_or_path": spec["model"], "dataset_name": spec["data"], "output_dir": out,
            "max_steps": spec["steps"], "use_peft": True, "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"],
            "lora_dropout": LORA["lora_dropout"], "dtype": "float32"})
    else:
        trl_script(spec, out, Clock())
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return {"tokens_per_second": (n1 - n0) / (t1 - t0), "tokens": n1 - n0, "seconds": t1 - t0}


def trl_script(spec: dict, out: str, clock) -> None:
    """What a TRL user writes: load, LoraConfig, SFTConfig, SFTTrainer, train."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    data = load_dataset("json", data_files=str(REPO / spec["data"] / "train.jsonl"), split="train")
    config = SFTConfig(output_dir=out, max_steps=spec["steps"], assistant_only_loss=True, **SHARED)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data.shuffle(seed=0), processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[clock])
    trainer.train()


if __name__ == "__main__":
    main()
