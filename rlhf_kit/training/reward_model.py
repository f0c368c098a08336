"""Stage 3 settings and measurements: RewardConfig plus rlhf-kit's fields, the held-out report, normalization.

The report is computed from rewards scored by `rlhf_kit.rewards.RewardModel`, the code PPO scores with, so the
accuracy the gate reads is the accuracy of the scores PPO will see.
"""

from __future__ import annotations

import copy
import glob
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType
from transformers import PreTrainedTokenizerBase
from trl import RewardConfig

from rlhf_kit.model import ModelArguments, lora_config
from rlhf_kit.data.loading import parse_sources
from rlhf_kit.rewards import (
    AGGREGATES,
    DEFAULT_MIN_ACCURACY,
    ENSEMBLE_KEY,
    IN_SAMPLE,
    QUANTIZATION_KEYS,
    RewardModel,
    Sample,
    check_aggregate,
)
from rlhf_kit.training.settings import StageSettings, check_eval_data


# Fewer held-out pairs make the gate's accuracy noise: its standard error at 16 pairs is already about 0.12.
MIN_HELD_OUT_PAIRS = 16


@dataclass
class RewardArguments(StageSettings, RewardConfig):
    """TRL's `RewardConfig` with rlhf-kit's stage settings, plus the normalization reference set and the calibration
    view of the report."""

    reference_dataset: str | None = field(
        default=None,
        metadata={"help": "Preference data whose chosen and rejected responses set the normalization (scores on "
                  "them get mean 0, std 1): a file (used whole) or a directory / Hub dataset (its dataset_test_split). "
                  "Default: the held-out evaluation split, else the training data."},
    )
    reference_pairs: int = field(
        default=512, metadata={"help": "At most this many pairs (2x samples) of the reference data, drawn by seed."}
    )
    calibration_buckets: int = field(
        default=5, metadata={"help": "Equal-count buckets of |reward margin| in the report's calibration table."}
    )
    eval_holdout_fraction: float = field(
        default=0.1,
        metadata={"help": "When the preference data has no test split of its own (a single file or glob, which is "
                  "read whole for every split, or a directory / Hub dataset without dataset_test_split) and no "
                  "eval_dataset_name is set, this fraction of the training pairs (at least "
                  f"{MIN_HELD_OUT_PAIRS}), drawn with seed, is held out of training for the report and PPO's gate. "
                  "Data too small to spare them is scored in-sample, which the gate refuses. 0: never hold out."},
    )

    ensemble_size: int = field(
        default=1,
        metadata={"help": "Train this many reward models as LoRA adapters (each with its own score head) on one base, "
                  "with seeds seed, seed+1, ... (different head and adapter initialization and data order), saved "
                  "in output_dir/member-<k> and scored together as an ensemble (rlhf_kit.rewards.RewardEnsemble). "
                  "1: one reward model, as usual."},
    )
    ensemble_bootstrap: bool = field(
        default=False,
        metadata={"help": "Each ensemble member trains on its own bootstrap resample of the training pairs (drawn "
                  "with replacement, with the member's seed) instead of all of them in its own order."},
    )
    ensemble_aggregate: str = field(
        default="mean",
        metadata={"help": f"How the ensemble's scores combine by default: one of {list(AGGREGATES)} (a stage that "
                  "uses the ensemble can override it with reward_aggregate)."},
    )
    ensemble_coef: float = field(
        default=1.0, metadata={"help": "lambda of the mean_minus_std aggregate: mean - lambda * std of the members."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")
        check_aggregate(self.ensemble_aggregate)
        if self.reference_pairs < 1:
            raise ValueError(f"reference_pairs must be >= 1, got {self.reference_pairs}")
        if self.calibration_buckets < 1:
            raise ValueError(f"calibration_buckets must be >= 1, got {self.calibration_buckets}")
        if not 0 <= self.eval_holdout_fraction < 1:
            raise ValueError(f"eval_holdout_fraction must be in [0, 1), got {self.eval_holdout_fraction}")


def check_reward_setup(model_args: ModelArguments, args: RewardArguments, has_eval_data: bool) -> None:
    """Cross-config checks that otherwise surface only after the model is loaded (or never)."""
    check_eval_data(args, has_eval_data)
    if args.chat_template_path is not None:
        # TRL would clone the template and force lm_head into modules_to_save, which a seq-cls model lacks.
        raise ValueError("chat_template_path is not supported for reward models: start from a model whose tokenizer "
                         "has the chat template (the SFT output), or from a base, which gets ChatML.")
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if args.ensemble_size > 1 and (not model_args.use_peft or quantized):
        # K full models would cost K times the memory; sharing one base is the point of the ensemble.
        raise ValueError(f"ensemble_size {args.ensemble_size} trains LoRA adapters on one shared base: set use_peft: "
                         "true (and no 4/8-bit quantization), or ensemble_size: 1 for one fully fine-tuned model")
    if quantized and model_args.dtype != "bfloat16" and not (args.bf16 or args.fp16):
        # TRL 1.16 casts every trainable parameter of a quantized model to bfloat16, the new score head included;
        # float32 activations then cannot enter the head ("expected m1 and m2 to have the same dtype").
        raise ValueError("QLoRA keeps the LoRA and score-head weights in bfloat16 (TRL, after the QLoRA paper), "
                         "which float32 activations cannot enter: set bf16: true (and use_cpu: true on a machine "
                         "without a GPU), or dtype: bfloat16.")


def read_whole(sources) -> bool:
    """Whether a source of `sources` is a local file or glob: load_data reads those whole for every split, so the
    data's "test split" would be its training pairs."""
    return any(glob.has_magic(source.path) or os.path.isfile(os.path.expanduser(source.path))
               for source in parse_sources(sources))


def hold_out(train_data, eval_data, *, fraction: float, seed: int):
    """(train, eval, held_out): the pairs to train on, the pairs the report and PPO's gate score, and how those were
    held out: None for the data's own held-out split `eval_data`, else what reward_eval.json records.

    When `eval_data` is None (the data has no split of its own), `fraction` of the training pairs (at least
    MIN_HELD_OUT_PAIRS), drawn with `seed`, are held out of training; when the data cannot spare them (over half of
    it) or `fraction` is 0, the report is scored on the training pairs and says IN_SAMPLE.
    """
    if eval_data is not None:
        return train_data, eval_data, None
    pairs = len(train_data)
    held = max(math.ceil(fraction * pairs), MIN_HELD_OUT_PAIRS)
    if fraction == 0 or held > pairs // 2:
        return train_data, train_data, IN_SAMPLE
    split = train_data.train_test_split(test_size=held, seed=seed)
    return split["train"], split["test"], f"auto {fraction:.0%} of train ({held} of {pairs} pairs, seed {seed})"


def reward_lora_config(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase,
                       added_tokens: list[str]) -> LoraConfig | None:
    """LoRA for a one-output seq-cls model: the score head is trained and saved whole (modules_to_save).

    Tokens that `prepare_tokenizer` just added (a base without reserved chat tokens) got random embedding rows, and
    the reward is read right after one of them (<|im_end|>). They are made trainable, which also stores their rows in
    the adapter (`trainable_tokens_delta`). Without that, a reload would draw new random rows unless PEFT 0.21's
    "auto" embedding save found the base's config.json to notice the resize, which it cannot for a Hub base offline.
    """
    config = lora_config(model_args, tokenizer, task_type=TaskType.SEQ_CLS)
    if config is not None and added_tokens:
        config.trainable_token_indices = {"embed_tokens": tokenizer.convert_tokens_to_ids(added_tokens)}
    return config


def pair_samples(row: dict[str, Any]) -> tuple[Sample, Sample]:
    """(chosen, rejected) of one preference row as full samples: the prompt, if explicit, joined to each response
    the way TRL does (message lists concatenated, strings appended as is)."""
    prompt = row.get("prompt")
    if prompt is None:
        return row["chosen"], row["rejected"]
    return prompt + row["chosen"], prompt + row["rejected"]


def reference_samples(dataset, max_pairs: int, seed: int) -> list[Sample]:
    """Chosen and rejected responses of up to `max_pairs` pairs drawn with `seed`."""
    indices = list(range(len(dataset)))
    random.Random(seed).shuffle(indices)
    return [sample for i in sorted(indices[:max_pairs]) for sample in pair_samples(dataset[i])]


def fit_normalization(raw: torch.Tensor) -> dict[str, float]:
    """Offset and scale that map `raw (M,)` to mean 0 and std 1 (torch.std, i.e. with Bessel's correction)."""
    if raw.numel() < 2:
        raise ValueError("normalization needs at least two reference scores")
    raw = raw.double()
    offset, scale = raw.mean().item(), raw.std().item()
    if not scale > 1e-6 * max(1.0, abs(offset)):
        raise ValueError(f"the reward model gives all {raw.numel()} reference samples the same score ({offset:.4g}): "
                         "it learned nothing. Check the learning rate and that the score head is trainable.")
    return {"offset": offset, "scale": scale}


def pairwise_report(chosen: torch.Tensor, rejected: torch.Tensor, buckets: int = 5) -> dict[str, Any]:
    """Held-out metrics of rewards `chosen (N,)` and `rejected (N,)` of N pairs.

    accuracy counts strict wins (a tie is a miss, as in TRL). The calibration table sorts pairs by |margin| into
    equal-count buckets and compares each bucket's accuracy with what the Bradley-Terry model the reward model was
    trained under predicts, mean(sigmoid(|margin|)); `calibration_error` is their count-weighted mean gap.
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1 or chosen.numel() == 0:
        raise ValueError(f"expected two non-empty (N,) tensors, got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    chosen, rejected = chosen.double(), rejected.double()
    margin = chosen - rejected  # (N,)
    correct = (margin > 0).double()
    table, gap = [], 0.0
    for part in torch.argsort(margin.abs()).tensor_split(min(buckets, margin.numel())):  # ascending |margin|
        accuracy, expected = correct[part].mean().item(), torch.sigmoid(margin[part].abs()).mean().item()
        table.append({"margin_min": margin[part].abs().min().item(), "margin_max": margin[part].abs().max().item(),
                      "pairs": part.numel(), "accuracy": accuracy, "expected_accuracy": expected})
        gap += part.numel() * abs(accuracy - expected)
    return {
        "pairs": margin.numel(),
        "accuracy": correct.mean().item(),
        "ties": int((margin == 0).sum().item()),
        "mean_margin": margin.mean().item(),
        "chosen": {"mean": chosen.mean().item(), "std": _std(chosen)},
        "rejected": {"mean": rejected.mean().item(), "std": _std(rejected)},
        "calibration": table,
        "calibration_error": gap / margin.numel(),
    }


def _std(x: torch.Tensor) -> float:
    return x.std().item() if x.numel() > 1 else 0.0


def evaluate_reward_model(reward_model: RewardModel, dataset, *, buckets: int, batch_size: int) -> dict[str, Any]:
    """`pairwise_report` of the raw rewards on every pair of `dataset`, plus the margin in normalized units."""
    chosen, rejected = zip(*(pair_samples(row) for row in dataset))
    raw_chosen = reward_model.score(list(chosen), batch_size=batch_size, normalize=False)
    raw_rejected = reward_model.score(list(rejected), batch_size=batch_size, normalize=False)
    report = pairwise_report(raw_chosen, raw_rejected, buckets)
    report.update(offset=reward_model.offset, scale=reward_model.scale,
                  normalized_mean_margin=report["mean_margin"] / reward_model.scale)
    return report


def reward_metadata(model_args: ModelArguments, base_model: str, *, normalization: dict[str, float],
                    reference: dict[str, Any], report: dict[str, Any] | None, conversational: bool) -> dict[str, Any]:
    """What `RewardModel.from_pretrained` needs beside the weights: normalization, base and quantization."""
    return {
        **normalization,
        "reference": reference,
        "accuracy": None if report is None else report["accuracy"],
        "conversational": conversational,
        "adapter": model_args.use_peft,
        # Absolute, so the reward model loads from any working directory (adapter_config.json keeps the path as given).
        "base_model": str(Path(base_model).resolve()) if Path(base_model).is_dir() else base_model,
        "dtype": model_args.dtype,
        "quantization": {key: getattr(model_args, key) for key in QUANTIZATION_KEYS},
    }


def format_report(report: dict[str, Any], min_accuracy: float = DEFAULT_MIN_ACCURACY) -> str:
    """The held-out report as a table for the end of the stage."""
    held_out = report.get("held_out")
    if held_out == IN_SAMPLE:
        verdict, title = ": PPO will refuse this reward model", f"== reward model on its {report['pairs']} " \
            "training pairs (in-sample: the data has no test split and is too small to hold pairs out)"
    else:
        verdict = "" if report["accuracy"] >= min_accuracy else ": PPO will refuse this reward model"
        auto = f" ({held_out}, held out of training)" if held_out else ""
        title = f"== reward model on {report['pairs']} held-out pairs{auto}"
    lines = [
        title,
        f"  accuracy {report['accuracy']:.3f} (chance 0.5; PPO's gate needs {min_accuracy} by default{verdict})",
        f"  mean margin {report['mean_margin']:.3f} raw, {report['normalized_mean_margin']:.3f} normalized",
        f"  chosen   reward {report['chosen']['mean']:+.3f} +- {report['chosen']['std']:.3f}",
        f"  rejected reward {report['rejected']['mean']:+.3f} +- {report['rejected']['std']:.3f}",
        f"  normalization   (raw - {report['offset']:.4g}) / {report['scale']:.4g}",
        "  |margin| bucket     pairs  accuracy  expected (sigmoid)",
    ]
    for row in report["calibration"]:
        lines.append(f"  {row['margin_min']:6.3f} - {row['margin_max']:6.3f}  {row['pairs']:6d}  {row['accuracy']:8.3f}"
                     f"  {row['expected_accuracy']:8.3f}")
    lines.append(f"  calibration error {report['calibration_error']:.3f}")
    return "\n".join(lines)


def member_arguments(args: RewardArguments) -> list[RewardArguments]:
    """The training arguments of each model the stage trains: the stage's own for one reward model; for an ensemble
    of K, K copies with seeds seed+k and output directories output_dir/member-k (each resumes on its own)."""
    if args.ensemble_size == 1:
        return [args]
    members = []
    for k in range(args.ensemble_size):
        # A copy, not dataclasses.replace: that would run TrainingArguments' __post_init__ again on resolved values.
        member = copy.copy(args)
        member.seed, member.output_dir = args.seed + k, str(Path(args.output_dir) / f"member-{k}")
        members.append(member)
    return members


def member_data(train_data, args: RewardArguments, member: RewardArguments):
    """A member's training pairs: all of them (the trainer shuffles with the member's seed), or with
    ensemble_bootstrap a resample of the same size drawn with replacement with the member's seed."""
    if args.ensemble_size == 1 or not args.ensemble_bootstrap:
        return train_data
    rng = random.Random(member.seed)
    return train_data.select([rng.randrange(len(train_data)) for _ in range(len(train_data))])


def ensemble_metadata(args: RewardArguments, members: list[RewardArguments], member_metadata: dict[str, Any]
                      ) -> dict[str, Any]:
    """The ensemble's rlhf_kit_reward.json: its members, default aggregate and the base they share (from a member's
    own `reward_metadata`); `RewardEnsemble.from_pretrained` loads it. The stage also saves the tokenizer there,
    which the gate reads."""
    spec = {"members": [Path(m.output_dir).name for m in members], "aggregate": args.ensemble_aggregate,
            "coef": args.ensemble_coef, "bootstrap": args.ensemble_bootstrap}
    return {ENSEMBLE_KEY: spec, "conversational": member_metadata["conversational"], "adapter": True,
            "base_model": member_metadata["base_model"], "dtype": member_metadata["dtype"]}


def ensemble_report(report: dict[str, Any], members: list[RewardArguments], accuracies: list[float]
                    ) -> dict[str, Any]:
    """The ensemble's held-out report with each member's accuracy beside it."""
    return {**report, "members": [{"member": Path(m.output_dir).name, "accuracy": a}
                                  for m, a in zip(members, accuracies)]}
