"""A stage's output directory: the files rlhf-kit keeps in it, automatic resume, the stage record (lineage), the
end-of-stage summary, and `StageOutput`, the directory read once for export, model card and push."""

from __future__ import annotations

import json
import os
import platform
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.utils import filter_repo_objects

from rlhf_kit.checkpoints import TRAINER_STATE, checkpoint_problem, disk_full_explained, last_valid_checkpoint

# The files rlhf-kit writes into a stage's output directory and into an export of it, named here and nowhere else
# but config.CONFIG_FILE, the resolved config, which config.py writes.
STAGE_FILE = "rlhf_kit_stage.json"  # the stage record: what ran on what, its config and metrics, its parent's record
EXPORT_FILE = "rlhf_kit_export.yaml"  # an export's settings; it also marks a directory as an export
REWARD_FILE = "rlhf_kit_reward.json"  # a reward model's normalization and how to rebuild it
EVAL_FILE = "reward_eval.json"  # a reward model's held-out report, which the reward gate reads
CARD_FILE = "README.md"  # the model card, under the name the Hub shows
# Training state and caches a stage directory may hold, never published: names of files or folders, at any depth.
NOT_PUBLISHED = ("checkpoint-*", "runs", ".*", "__pycache__", "*.partial", "training_args.bin", "optimizer.pt",
                 "scheduler.pt", "rng_state*", "*.lock")
# Set by `rlhf-kit pipeline` for the stages it runs: it runs the next one itself, so their summaries do not suggest it.
IN_PIPELINE = "RLHF_KIT_PIPELINE"
# What a user runs after each stage, printed under its summary ({out}: the stage's output directory).
NEXT_STEPS = {
    "pretrain": ["rlhf-kit train sft recipes/configs/sft/tiny.yaml --model_name_or_path {out}"],
    "sft": ["rlhf-kit train reward recipes/configs/reward/tiny.yaml --model_name_or_path {out}",
            "rlhf-kit chat {out}"],
    "reward": ["rlhf-kit train ppo recipes/configs/ppo/tiny.yaml --model_name_or_path <the SFT output> "
               "--reward_model_path {out}"],
    **dict.fromkeys(("ppo", "dpo", "grpo", "rloo"), [
        "rlhf-kit eval {out} --reference <the SFT output> --against <the SFT output>", "rlhf-kit chat {out}",
        "rlhf-kit export {out}"]),
}
_LIBRARIES = ("rlhf-kit", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


def resume_checkpoint(output_dir: str, resume_from_checkpoint: str | bool | None) -> str | None:
    """The checkpoint to resume from: the one asked for, else the newest complete one in `output_dir` (an
    interrupted run); a newer checkpoint cut off while being written is skipped with a warning.

    `resume_from_checkpoint` may be a path, "true"/True for "the last one, which must exist", or "false" to start over.
    """
    flag = str(resume_from_checkpoint).lower() if resume_from_checkpoint is not None else None
    if flag in ("false", "no", "0"):
        return None
    last = last_valid_checkpoint(output_dir)
    if flag in ("true", "yes", "1"):
        if last is None:
            raise FileNotFoundError(f"resume_from_checkpoint=true but {output_dir} holds no complete checkpoint-* "
                                    "directory.")
        return last
    if resume_from_checkpoint is not None:
        if not Path(resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a directory.")
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem:
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} is incomplete: {problem}. Give an "
                             "earlier checkpoint, or leave resume_from_checkpoint unset to take the newest complete "
                             "one.")
        return str(resume_from_checkpoint)
    return last


def whole_run_train_loss(state, training_loss: float, resumed_from: str | None) -> float:
    """The mean training loss over every step of the run, the part before a resume included.

    A Trainer's `training_loss` covers only the steps trained since it started, so after a resume it describes part
    of the run. The part before comes from the checkpoint's log history in `state` (each "loss" entry is the mean
    over the steps since the previous one). Exact when the checkpoint's step was a logging step; otherwise the steps
    between the last log and the checkpoint are left out of the mean, as no file holds their loss.
    """
    if resumed_from is None:
        return training_loss
    resumed_at = json.loads((Path(resumed_from) / TRAINER_STATE).read_text())["global_step"]
    total, steps, previous = 0.0, 0, 0
    for entry in state.log_history:
        if "loss" in entry and entry["step"] <= resumed_at:
            total += entry["loss"] * (entry["step"] - previous)
            steps, previous = steps + entry["step"] - previous, entry["step"]
    resumed_steps = state.global_step - resumed_at
    if steps + resumed_steps <= 0:
        return training_loss
    return (total + training_loss * resumed_steps) / (steps + resumed_steps)


def train_and_save(trainer, resume: str | None, output_dir: str) -> float:
    """Train a transformers/TRL Trainer (from the checkpoint `resume`, or from the start), save the final model to
    `output_dir`, and return the mean training loss of the whole run (`whole_run_train_loss`). A full disk during
    training or the save is reported with the directory being written and the space it needs."""
    with disk_full_explained(trainer):
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(output_dir)
    return whole_run_train_loss(trainer.state, result.training_loss, resume)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def read_stage(path: str | Path) -> dict[str, Any] | None:
    """The stage record in `path`, or None when there is none or it is unreadable (a write cut off): the stage
    counts as unfinished, so the pipeline reruns it (resuming from its checkpoints)."""
    file = Path(path) / STAGE_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.warn(f"The stage record {file} is truncated or corrupt ({e}); treating the stage as unfinished. "
                      "Rerunning the stage (or the pipeline) rewrites it.", stacklevel=2)
        return None


def write_stage(
    output_dir: str | Path,
    stage: str,
    *,
    model: str,
    data: str | list | None,
    config: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Record what this stage did, with the stage record of the model it started from: the lineage chain.

    Model cards are rendered from this chain, so a PPO policy's card can name its SFT model, its reward model and
    the base model beneath them without anyone re-typing it.
    """
    record = {
        "stage": stage,
        "model": model,
        "data": data,
        "config": config,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "versions": library_versions(),
        "parent": read_stage(model) if model and Path(model).is_dir() else None,
        "complete": True,
    }
    path = Path(output_dir) / STAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    # The final directory is safe to load: Trainer's pickled training_args.bin goes (the config YAML replaces it).
    (Path(output_dir) / "training_args.bin").unlink(missing_ok=True)
    return record


def start_and_final_evaluation(trainer, marker: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The held-out evaluation logged at step 0 (with eval_on_start; {} without) and the one at the end of training.

    `marker` is a key every evaluation log entry of this trainer has. The end is the last periodic evaluation if it
    ran at the final step (evaluation is seeded, so another would repeat it exactly), else a new one.
    """
    evals = [e for e in trainer.state.log_history if marker in e]
    start = next((e for e in evals if e["step"] == 0), {})
    final = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step > 0 else trainer.evaluate()
    return start, final


def format_summary(stage: str, output_dir: str, metrics: dict[str, Any]) -> str:
    """A short table for the end of a stage: what was produced, how it scored, and what to run next (outside a
    pipeline, which runs it itself)."""
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in sorted(metrics.items())]
    width = max([len(k) for k, _ in rows] + [10])
    lines = [f"== {stage} finished: {output_dir}", *(f"  {k:<{width}}  {v}" for k, v in rows)]
    if stage in NEXT_STEPS and not os.environ.get(IN_PIPELINE):
        lines += ["next:", *(f"  {step.format(out=output_dir)}" for step in NEXT_STEPS[stage])]
    return "\n".join(lines)


def unpublished_patterns() -> list[str]:
    """NOT_PUBLISHED as huggingface_hub's path patterns (`upload_folder(ignore_patterns=...)`, `filter_repo_objects`).

    Those match a file's whole path relative to the folder, with `*` crossing "/", so each name becomes four
    patterns: the name at the top, the name deeper down, and everything under a folder of that name at either place.
    """
    return [pattern for name in NOT_PUBLISHED for pattern in (name, f"{name}/*", f"*/{name}", f"*/{name}/*")]


@dataclass(frozen=True)
class StageOutput:
    """A stage's output directory, or an export of one, read once: what rlhf-kit recorded in it and which of its
    files may be published. Export, the model card and the push are handed this instead of opening the files again.

        output = StageOutput.read("outputs/tiny-sft")
        output.stage, output.adapter_dir, sorted(output.files)   # "sft", ".", ["adapter_config.json", ...]
    """

    path: Path
    record: dict[str, Any] | None  # the stage record (STAGE_FILE); None when there is none or it is unreadable
    export_settings: dict[str, Any]  # EXPORT_FILE; {} unless this is an export
    reward_meta: dict[str, Any]  # REWARD_FILE; {} unless it holds a reward model
    reward_report: dict[str, Any] | None  # EVAL_FILE
    adapter_config: dict[str, Any] | None  # the LoRA adapter's PEFT config, at adapter_dir
    files: dict[str, int]  # every file but NOT_PUBLISHED (repository paths, "/"-separated) -> its size in bytes

    @classmethod
    def read(cls, path: str | Path) -> StageOutput:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist: pass the output_dir of a finished stage "
                                    "(e.g. outputs/tiny-sft), or an export of one.")
        found = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}
        files = {name: found[name].stat().st_size
                 for name in filter_repo_objects(found, ignore_patterns=unpublished_patterns())}
        adapter_dir = _adapter_dir(files)
        return cls(path=path, record=read_stage(path), export_settings=_read(path / EXPORT_FILE) or {},
                   reward_meta=_read(path / REWARD_FILE) or {}, reward_report=_read(path / EVAL_FILE),
                   adapter_config=_read(path / adapter_dir / "adapter_config.json") if adapter_dir else None,
                   files=files)

    @property
    def stage(self) -> str | None:
        return (self.record or {}).get("stage")

    @property
    def is_export(self) -> bool:
        return EXPORT_FILE in self.files

    @property
    def adapter_dir(self) -> str | None:
        """Where the LoRA adapter is: "." (a stage output; an export without a merged model), "adapter" (an export
        beside a merged model), or None."""
        return _adapter_dir(self.files)

    @property
    def has_model(self) -> bool:
        """A full (or merged) transformers model at the top."""
        return "config.json" in self.files

    @property
    def reward(self) -> bool:
        """A one-output sequence-classification reward model."""
        return self.stage == "reward" or REWARD_FILE in self.files

    @property
    def gguf_files(self) -> list[str]:
        return sorted(f for f in self.files if "/" not in f and f.endswith(".gguf"))


def _adapter_dir(files: dict[str, int]) -> str | None:
    return next((d for d in (".", "adapter") if (Path(d) / "adapter_config.json").as_posix() in files), None)


def _read(file: Path) -> dict[str, Any] | None:
    """A JSON or YAML file of a stage directory, None when absent; a broken one is an error naming it."""
    if not file.is_file():
        return None
    try:
        return (json.loads if file.suffix == ".json" else yaml.safe_load)(file.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not readable {file.suffix.lstrip('.').upper()} ({e}); restore it, or run the "
                         "stage (or the export) again to rewrite it.") from None
