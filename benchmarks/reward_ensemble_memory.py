"""Memory of a reward ensemble on one base against one reward model, at a real shape (issue 20).

    python benchmarks/reward_ensemble_memory.py --sft outputs/tiny/sft --shape 512x8 --members 4

Builds a random-init sequence-classification base of `--shape` (hidden size x layers, the SFT model's tokenizer and
chat template), K LoRA reward adapters on it (rank 16 on every linear layer, each with its own score head: what
`recipes/reward.py` trains with ensemble_size K) saved as a reward-stage ensemble, then measures in fresh processes
the peak resident memory that loading and scoring `--samples` held-out pairs' responses adds to the process
(Linux: the peak is reset after the imports, so their transient does not hide the model) with
- one reward model: `RewardModel.from_pretrained(member-0)` (the adapter merged into its base, as a single reward
  model is used),
- the ensemble: `RewardEnsemble.from_pretrained(...)`, every member scored.
Prints both and their ratio.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", required=True, help="an SFT output: its tokenizer and chat template are used")
    parser.add_argument("--shape", default="512x8")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--worker", choices=("single", "ensemble"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    root = build(args)
    peaks = {kind: run_worker(kind, root, args) for kind in ("single", "ensemble")}
    print(json.dumps({"shape": args.shape, "members": args.members, "samples": args.samples,
                      "peak_mb_over_start": peaks}, indent=2))
    print(f"memory added by loading and scoring: one reward model {peaks['single']:.0f} MB, ensemble of "
          f"{args.members} {peaks['ensemble']:.0f} MB -> {peaks['ensemble'] / peaks['single']:.2f}x")


def build(args) -> Path:
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlhf_kit.model import ModelArguments, is_adapter_dir, load_tokenizer, merged_model_dir
    from rlhf_kit.rewards import ENSEMBLE_KEY, write_reward_files
    from rlhf_kit.training.reward_model import reward_lora_config

    source = str(merged_model_dir(args.sft)) if is_adapter_dir(args.sft) else args.sft
    root = Path(tempfile.gettempdir()) / f"reward-ensemble-memory-{args.shape}-{args.members}"
    if (root / "rlhf_kit_reward.json").is_file():
        return root
    hidden, layers = (int(x) for x in args.shape.lower().split("x"))
    heads = max(hidden // 64, 1)
    config = AutoConfig.from_pretrained(source)
    config.update(dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 8 // 3,
                       num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads, num_labels=1))
    tokenizer = load_tokenizer(source)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lora = reward_lora_config(ModelArguments(model_name_or_path=str(root / "base"), use_peft=True, lora_r=16,
                                             lora_alpha=32, lora_dropout=0.0), tokenizer, [])
    lora.init_lora_weights = False  # random B too: members that score differently, as trained ones do
    names = []
    for k in range(args.members):
        torch.manual_seed(k + 1)
        model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(root / "base"), lora)
        names.append(f"member-{k}")
        model.save_pretrained(root / names[-1])
        tokenizer.save_pretrained(root / names[-1])
        write_reward_files(root / names[-1], {"offset": 0.0, "scale": 1.0, "adapter": True, "conversational": True,
                                              "base_model": str(root / "base"), "dtype": "float32",
                                              "quantization": {}}, None)
    tokenizer.save_pretrained(root)
    write_reward_files(root, {ENSEMBLE_KEY: {"members": names, "aggregate": "mean", "coef": 1.0},
                              "conversational": True, "adapter": True, "base_model": str(root / "base"),
                              "dtype": "float32"}, None)
    return root


def run_worker(kind: str, root: Path, args) -> float:
    cmd = [sys.executable, __file__, "--sft", args.sft, "--worker", kind, "--dir", str(root),
           "--samples", str(args.samples)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    return float(lines[-1].split()[1])


def worker(args) -> None:
    import torch

    from rlhf_kit.rewards import RewardEnsemble, RewardModel
    from rlhf_kit.training.reward_model import pair_samples

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in (REPO / "data/preference/test.jsonl").read_text().splitlines()]
    texts = [s for row in rows for s in pair_samples(row)][: args.samples]
    root = Path(args.dir)
    # The peak so far is the imports' transient, not the model's: reset it (Linux) and measure from here.
    Path("/proc/self/clear_refs").write_text("5")
    before = status_mb("VmRSS")
    if args.worker == "single":
        RewardModel.from_pretrained(str(root / "member-0")).score(texts, batch_size=32)
    elif args.worker == "ensemble":
        RewardEnsemble.from_pretrained(str(root)).score_members(texts, batch_size=32)
    print(f"PEAK {status_mb('VmHWM') - before:.1f}")


def status_mb(key: str) -> float:
    """A /proc/self/status memory line (VmRSS: now, VmHWM: peak since the last reset) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


if __name__ == "__main__":
    main()
