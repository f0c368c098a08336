"""`rlhf-kit plan`'s memory estimate against the measured peak, on a GPU: one training step of SFT or reward.

    python benchmarks/plan_accuracy.py --shape 1b --stage sft --batch 4 --seq 1024               # LoRA, bf16
    python benchmarks/plan_accuracy.py --shape 1b --stage sft --batch 4 --seq 1024 --load_in_4bit
    python benchmarks/plan_accuracy.py --shape 1b --stage reward --batch 4 --seq 512 --checkpointing

A randomly initialized LLaMA of a named shape (no download) is built on the GPU, wrapped in LoRA r16 on all linear
layers (or trained whole with --full), and run for two AdamW steps (the second has the optimizer state allocated) on
random tokens. The peak of `torch.cuda.max_memory_allocated` is compared with `rlhf_kit.plan.estimate` for the same
settings; the issue's target is |estimate / measured - 1| <= 25%. Each case runs in its own process (`--case` runs
one), so one case's allocations never inflate another's peak. Without a GPU it says so and exits 2.
"""

import argparse
import json
import subprocess
import sys

CASES = [  # (stage, batch, seq, extra flags): what the README's table reports
    ("sft", 4, 1024, []), ("sft", 4, 1024, ["--checkpointing"]), ("sft", 4, 1024, ["--load_in_4bit"]),
    ("reward", 4, 512, []), ("sft", 1, 1024, ["--full"]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1b", help="a named LLaMA size of rlhf_kit.plan.SHAPES")
    parser.add_argument("--stage", choices=["sft", "reward"])
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--load_in_4bit", action="store_true")
    parser.add_argument("--full", action="store_true", help="train every parameter instead of LoRA")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("plan_accuracy: no GPU visible; nothing to measure")
        sys.exit(2)
    if args.stage:  # one case, in this process
        return print("RESULT " + json.dumps(measure(args)))
    results = []
    for stage, batch, seq, flags in CASES:
        cmd = [sys.executable, __file__, "--shape", args.shape, "--stage", stage, "--batch", str(batch),
               "--seq", str(seq), *flags]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            results.append({"case": " ".join(cmd[2:]), "error": out.stderr[-500:]})
            continue
        results.append(json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:]))
    print(f"{'case':<60} {'estimate':>9} {'measured':>9} {'error':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<60} failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
        else:
            print(f"{r['case']:<60} {r['estimate_gib']:>8.2f}G {r['measured_gib']:>8.2f}G {r['error']:>+7.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def measure(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig, LlamaConfig

    from rlhf_kit.plan import GIB, SHAPES, estimate

    shape = SHAPES[args.shape]
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab, tie_word_embeddings=shape.tied,
                         max_position_embeddings=max(args.seq, 2048), num_labels=1, pad_token_id=0)
    auto = AutoModelForSequenceClassification if args.stage == "reward" else AutoModelForCausalLM
    torch.manual_seed(0)
    if args.load_in_4bit:
        # Quantizing needs weights to load: save the random model once to a temporary directory, reload in 4 bits.
        import tempfile

        path = tempfile.mkdtemp()
        auto.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = auto.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0})
    else:
        with torch.device("cuda"):
            model = auto.from_config(config, dtype=torch.bfloat16)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.full:
        task = "SEQ_CLS" if args.stage == "reward" else "CAUSAL_LM"
        model = get_peft_model(model, LoraConfig(task_type=task, r=16, lora_alpha=32, target_modules="all-linear"))
    model.config.use_cache = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = args.batch * (2 if args.stage == "reward" else 1)  # chosen and rejected in one forward
    ids = torch.randint(1, shape.vocab, (rows, args.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if args.stage == "reward":
                scores = model(input_ids=ids).logits.float().squeeze(-1)
                loss = -torch.nn.functional.logsigmoid(scores[: args.batch] - scores[args.batch:]).mean()
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated()
    plan_config = {"dtype": "bfloat16", "use_peft": not args.full, "lora_r": 16, "load_in_4bit": args.load_in_4bit,
                   "per_device_train_batch_size": args.batch, "max_length": args.seq,
                   "gradient_checkpointing": args.checkpointing}
    predicted = estimate(plan_config, args.stage, shape=shape).total
    case = f"{args.shape} {args.stage} b{args.batch} s{args.seq}" + "".join(
        f" {flag}" for flag, on in (("ckpt", args.checkpointing), ("4bit", args.load_in_4bit), ("full", args.full)) if on)
    return {"case": case, "estimate_gib": predicted / GIB, "measured_gib": measured / GIB,
            "error": predicted / measured - 1}


if __name__ == "__main__":
    main()
