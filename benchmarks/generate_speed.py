"""Generation speed of rlhf-kit's `generate` against a plain transformers loop: generated tokens per second, as a ratio.

    python benchmarks/generate_speed.py                      # tiny + 512x8 random models, n=1 and n=8, 1 thread
    python benchmarks/generate_speed.py --sft outputs/tiny/sft --shapes 512x8 --n 1,8 --prompts 16 --repeats 3
    python benchmarks/generate_speed.py --sft outputs/tiny/sft --shapes 512x8 --n 8 --few-shot 8 --prefill-once
    python benchmarks/generate_speed.py --shapes 512x8 --n 8 --vllm   # where vLLM is installed (.venv-vllm)

rlhf-kit's side is `rlhf_kit.inference.generation.generate` as every inference command calls it: prompts rendered
with the chat template, `batch_size` sequences per `model.generate` call (n samples per prompt through
`num_return_sequences`), left padding, KV cache. The baseline is what a user writes first: a loop with one
`model.generate` call per prompt (its n samples through `num_return_sequences`). Both load the same model directory
the ordinary way (`load_policy` / `AutoModelForCausalLM.from_pretrained`), render the same chat prompts and sample
with the same settings (temperature 1, no top-k / top-p cut, the same stop tokens), so the one difference is batching.

Throughput counts only real generated tokens: each response up to and including its stop token, never the padding
a batched call leaves after a sequence that stopped early. Prompt rendering counts in the time on both sides. Each
repeat runs both sides one after the other (the order alternates); the table gives the median of the repeats, and
the ratio is the median of the per-repeat ratios, so load from other processes on a shared machine mostly cancels.

Models: the trained tiny SFT model (`--sft`, default the pipeline's outputs/tiny/sft, when it exists), else a
random-init LLaMA of the embedded base model's shape (128 wide, 4 layers); and random-init LLaMAs of each `--shapes`
HIDDENxLAYERS. A random model needs a tokenizer: the SFT model's, or one trained here on the shipped corpus exactly
as the pretraining recipe trains the embedded model's (byte-level BPE, a tenth of a second). Nothing is downloaded.
A random model almost never samples its stop token, so its responses run to `--max-new-tokens`; the trained model
stops early, at lengths that differ within a batch, which is where batching wastes steps on finished sequences.

`--few-shot K` puts K examples (from data/sft) before each prompt as chat turns: long prompts, where computing each
prompt n times (num_return_sequences) costs most of the time. `--prefill-once` also times rlhf-kit with
`Sampling(prefill_once=True)`: each prompt computed once, its KV cache shared by its n samples.

`--vllm` also times `generate` on the same model loaded with `load_policy(..., backend="vllm")`: a vLLM engine
(continuous batching, paged KV cache, its own kernels) drawing the same number of samples with the same settings;
the last column adds its ratio to rlhf-kit's transformers path (`generation_backend: hf`).
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_SHAPE = "128x4"  # recipes/configs/pretrain/tiny.yaml: the shape of the embedded default base model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", default="outputs/tiny/sft", help="a trained model directory; skipped if absent")
    parser.add_argument("--shapes", default="512x8", help="comma-separated HIDDENxLAYERS of random-init models")
    parser.add_argument("--n", default="1,8", help="comma-separated samples per prompt")
    parser.add_argument("--prompts", type=int, default=16, help="prompts from data/prompts/test.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="rlhf-kit's sequences per generate() call")
    parser.add_argument("--few-shot", type=int, default=0, help="examples before each prompt (long prompts)")
    parser.add_argument("--prefill-once", action="store_true", help="also time Sampling(prefill_once=True)")
    parser.add_argument("--vllm", action="store_true", help="also time the vLLM backend (needs vLLM installed)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared box)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging

    torch.set_num_threads(args.threads)
    logging.disable_progress_bar()  # the loading and saving bars would break up the table
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="rlhf-kit-generate-bench-"))
    prompts = [row["prompt"] for row in read_jsonl(REPO / "data/prompts/test.jsonl")][: args.prompts]
    shots = [(row["messages"][0]["content"], row["messages"][1]["content"])
             for row in read_jsonl(REPO / "data/sft/train.jsonl")][: args.few_shot]
    models = model_dirs(args, work)
    results = []
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens at most, temperature 1, rlhf-kit batch "
          f"{args.batch_size}, {args.few_shot} few-shot examples, {args.threads} thread(s), median of {args.repeats}")
    print(f"  {'model':<10} {'params':>7} {'n':>2} {'side':<16} {'tokens':>6} {'tokens/s':>9} {'ratio':>6}  all runs")
    for label, path in models.items():
        sides = load_sides(path, args.vllm)
        for n in map(int, args.n.split(",")):
            results.append(measure(label, sides, prompts, shots, n, args))
            print_rows(results[-1])
    print("  ratio: tokens/s / plain loop tokens/s, median of the per-repeat ratios")
    for result in results:
        if "vllm / hf" in result:
            print(f"  {result['model']} n={result['n']}: vLLM / rlhf-kit (hf) tokens/s = {result['vllm / hf']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def model_dirs(args, work: Path) -> dict[str, str]:
    """label -> a model directory both sides load: the SFT model when present, then random-init LLaMAs."""
    from rlhf_kit.model import is_adapter_dir, load_tokenizer, merged_model_dir, prepare_tokenizer

    dirs, shapes = {}, [s for s in args.shapes.split(",") if s]
    if Path(args.sft).is_dir():
        dirs["tiny-sft"] = str(merged_model_dir(args.sft)) if is_adapter_dir(args.sft) else args.sft
        tokenizer = load_tokenizer(dirs["tiny-sft"])
    else:
        from rlhf_kit.training.pretraining import train_tokenizer

        shapes.insert(0, EMBEDDED_SHAPE)
        tokenizer = train_tokenizer([r["text"] for r in read_jsonl(REPO / "data/pretrain/train.jsonl")], 2048)
    prepare_tokenizer(tokenizer)
    for shape in shapes:
        dirs[f"rand-{shape}"] = random_model(shape, tokenizer, work / shape)
    return dirs


def random_model(shape: str, tokenizer, out: Path) -> str:
    """A random-init LLaMA of HIDDENxLAYERS (head size 64 from 512 up, MLP 3x wide, 2 query heads per KV head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = map(int, shape.split("x"))
    heads = max(2, hidden // 64) if hidden >= 512 else 4
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def load_sides(path: str, vllm: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_kit.inference.generation import load_policy
    from rlhf_kit.model import stop_token_ids

    policy = load_policy(path)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    params = sum(p.numel() for p in plain.parameters())
    return {"policy": policy, "plain": plain, "tokenizer": tokenizer, "params": params,
            "stops": stop_token_ids(policy.tokenizer, policy.model), "pad": policy.tokenizer.pad_token_id,
            "vllm": load_policy(path, backend="vllm") if vllm else None}


def measure(label: str, sides: dict, prompts: list, shots: list, n: int, args) -> dict:
    from rlhf_kit.inference.generation import Prompting, Sampling, generate

    prompting = Prompting(few_shot=shots)
    def rlhf_kit(prompts, policy=sides["policy"], **options):
        sampling = Sampling(n=n, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, **options)
        gens = generate(policy, prompts, sampling=sampling, prompting=prompting, progress=False)
        return sum(map(len, gens.response_ids))

    runs = {"plain loop": lambda p: plain_loop(sides, p, shots, n, args.max_new_tokens), "rlhf-kit": rlhf_kit}
    if args.prefill_once and n > 1:  # with one sample per prompt it is the default path
        runs["prefill once"] = lambda p: rlhf_kit(p, prefill_once=True)
    if sides["vllm"] is not None:
        runs["vllm"] = lambda p: rlhf_kit(p, policy=sides["vllm"])
    for run in runs.values():  # warm-up: the first generate() call of a process pays one-time set-up
        run(prompts[:2])
    timings = {kind: [] for kind in runs}
    for repeat in range(args.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for kind in order:
            start = time.perf_counter()
            tokens = runs[kind](prompts)
            timings[kind].append({"tokens": tokens, "seconds": time.perf_counter() - start})
    rates = {kind: [t["tokens"] / t["seconds"] for t in ts] for kind, ts in timings.items()}
    ratios = {kind: statistics.median(r / p for r, p in zip(rates[kind], rates["plain loop"])) for kind in rates}
    result = {"model": label, "params": sides["params"], "n": n, "timings": timings, "ratios": ratios,
              "tokens_per_second": {kind: statistics.median(r) for kind, r in rates.items()}}
    if "vllm" in rates:
        result["vllm / hf"] = statistics.median(v / h for v, h in zip(rates["vllm"], rates["rlhf-kit"]))
    return result


def plain_loop(sides: dict, prompts: list, shots: list, n: int, max_new_tokens: int) -> int:
    """The loop a user writes first: one generate() call per prompt. Returns the real tokens generated."""
    import torch

    model, tokenizer, stops = sides["plain"], sides["tokenizer"], sides["stops"]
    tokens = 0
    with torch.no_grad():
        for prompt in prompts:
            examples = [m for q, a in shots for m in ({"role": "user", "content": q},
                                                       {"role": "assistant", "content": a})]
            inputs = tokenizer.apply_chat_template(examples + list(prompt), add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, num_return_sequences=n, eos_token_id=stops,
                                 pad_token_id=sides["pad"])
            for row in out[:, inputs["input_ids"].shape[1]:].tolist():
                tokens += next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    return tokens


def print_rows(result: dict) -> None:
    for kind, rate in result["tokens_per_second"].items():
        every = ", ".join(f"{t['tokens'] / t['seconds']:.0f}" for t in result["timings"][kind])
        tokens = result["timings"][kind][0]["tokens"]
        print(f"  {result['model']:<10} {result['params'] / 1e6:>6.1f}M {result['n']:>2} {kind:<16} {tokens:>6} "
              f"{rate:>9.0f} {result['ratios'][kind]:>6.2f}  {every}")


if __name__ == "__main__":
    main()
