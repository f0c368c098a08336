"""Shared fixtures, built offline once per session by the real recipes and saved like Hub models: a tiny LLaMA
pretrained, fine-tuned and turned into a reward model, and the uninterrupted short SFT and PPO runs that the resume
tests compare against; the callbacks that interrupt a run and record its steps."""

import os
import tempfile

# Before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# Merged adapters are cached per session, not in the user's Hugging Face home.
os.environ.setdefault("RLHF_KIT_CACHE", tempfile.mkdtemp(prefix="rlhf-kit-test-cache-"))
# Under pytest-xdist each worker gets a core: one thread each, subprocesses included (before torch is imported), as
# two processes' OpenMP threads spinning on the same 2 cores make both many times slower (see one_thread).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

import contextlib
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import rlhf_kit  # noqa: F401  before transformers, as the recipes do: bitsandbytes then fetches no Hub kernel
from transformers import TrainerCallback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path, limit=None):
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


@contextlib.contextmanager
def one_thread():
    """The tiny model's ops are too small to split across threads, and when other processes share the cores,
    OpenMP's spinning threads make training 10-20x slower (observed with torch 2.x on 2 shared vCPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_thread():
    with one_thread():
        yield


@contextlib.contextmanager
def trained_quietly():
    """How the session's shared runs train: on one thread (see one_thread), their summaries kept off the output."""
    with one_thread(), contextlib.redirect_stdout(io.StringIO()):
        yield


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills, by the real recipes and quietly (see trained_quietly), once per test run.

    Under pytest-xdist every worker would otherwise build each session fixture again, on the same cores as the
    other's tests: the first worker to need it builds it under a file lock, and the others wait for it and read it.
    A build that fails leaves no `<name>.built` marker, so the next worker to need it builds it again (and fails
    alike).
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        path = tmp_path_factory.mktemp(name)
        with trained_quietly():
            build(path)
        return path
    from filelock import FileLock

    path = tmp_path_factory.getbasetemp().parent / "built-once" / name  # the run's folder, above every worker's
    path.parent.mkdir(exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.with_suffix(".built").is_file():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            with trained_quietly():
                build(path)
            path.with_suffix(".built").touch()
    return path


TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 256}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A tiny LLaMA pretrained for a few seconds by the real pretraining recipe; a base model (no chat template).

    Briefly pretrained rather than random: LoRA on a random network barely moves its near-uniform outputs, so no
    later stage would have a learning signal to test.
    """
    def build(path):
        load_recipe("pretrain")(["--config", "recipes/configs/pretrain/tiny.yaml"], overrides={
            **TINY_SHAPE, "output_dir": str(path), "max_steps": 60, "per_device_train_batch_size": 16,
            "learning_rate": 3e-3, "warmup_steps": 5, "logging_steps": 20, "eval_strategy": "no",
            "save_strategy": "no", "disable_tqdm": True, "report_to": "none",
        })

    return str(built_once(tmp_path_factory, "tiny-base", build))


@pytest.fixture(scope="session")
def tiny_sft(tiny_base, tmp_path_factory) -> str:
    """The tiny base fine-tuned (fully: fastest to learn) by the SFT recipe until it answers in the task's format.

    The starting policy of the RL-stage tests (DPO, GRPO, RLOO, best-of-N). About 7 s.
    """
    def build(out):
        load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml"], overrides={
            "model_name_or_path": tiny_base, "output_dir": str(out), "use_peft": False, "max_steps": 200,
            "per_device_train_batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 0,
            "lr_scheduler_type": "constant", "eval_strategy": "no", "save_strategy": "no", "logging_steps": 50,
            "max_length": 64, "disable_tqdm": True})

    return str(built_once(tmp_path_factory, "tiny-sft", build))


@pytest.fixture(scope="session")
def tiny_reward(tiny_sft, tmp_path_factory) -> str:
    """A LoRA reward model trained from `tiny_sft` by the reward recipe (held-out accuracy about 0.8, so it passes
    the gate). About 7 s.

    It trains on the generator's mixed pairs alone (the shipped training split without the wrong-item pairs added
    for issue 20): the RL-stage tests measure learning in 20-25 updates, and a reward model trained mostly on
    wrong-item pairs moves too little on sentiment for that.
    """
    def build(out):
        make_datasets = load_make_datasets()
        data = tmp_path_factory.mktemp("mixed-pairs")
        write_jsonl(data / "train.jsonl", make_datasets.preference_rows(
            make_datasets.file_rng("preference/train"), 3000, "train", wrong_item_pairs=0))
        (data / "test.jsonl").write_text((REPO / "data/preference/test.jsonl").read_text())
        load_recipe("reward")(["--config", "recipes/configs/reward/tiny.yaml"], overrides={
            "model_name_or_path": tiny_sft, "output_dir": str(out), "dataset_name": str(data), "use_peft": True,
            "max_steps": 150, "per_device_train_batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 0,
            "eval_strategy": "no", "save_strategy": "no", "logging_steps": 50, "disable_tqdm": True,
            "report_to": "none"})

    return str(built_once(tmp_path_factory, "tiny-reward", build))


# A short LoRA SFT run with a checkpoint every 2 steps: what the resume and cut-off-checkpoint tests run again.
SFT_SHORT = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "save_total_limit": None,
             "per_device_train_batch_size": 8, "max_length": 64, "learning_rate": 3e-3, "warmup_steps": 0,
             "lr_scheduler_type": "constant", "logging_steps": 1, "eval_strategy": "no", "disable_tqdm": True,
             "report_to": "none"}


@pytest.fixture(scope="session")
def sft_straight(tiny_base, tmp_path_factory) -> Path:
    """An uninterrupted SFT_SHORT run from `tiny_base`, with checkpoints at steps 2, 4 and 6: the run that an
    interrupted, cut-off or disk-full one must match once resumed."""
    def build(out):
        load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml"],
                           overrides={"model_name_or_path": tiny_base, "output_dir": str(out), **SFT_SHORT})

    return built_once(tmp_path_factory, "sft-straight", build)


# A short PPO run from `tiny_sft` against `tiny_reward` with a checkpoint every 2 updates (evaluated on the 20
# plain-text example prompts to keep it short).
PPO_SHORT = {"max_steps": 4, "save_steps": 2, "save_total_limit": None, "per_device_train_batch_size": 8,
             "response_length": 12, "eval_on_start": False, "eval_strategy": "no",
             "eval_dataset_name": "data/examples/prompts_standard.jsonl", "disable_tqdm": True, "report_to": "none"}


@pytest.fixture(scope="session")
def ppo_straight(tiny_sft, tiny_reward, tmp_path_factory) -> Path:
    """An uninterrupted PPO_SHORT run, with checkpoints at updates 2 and 4: the run that an interrupted or disk-full
    one must match once resumed."""
    def build(out):
        load_recipe("ppo")(["--config", "recipes/configs/ppo/tiny.yaml"], overrides={
            "model_name_or_path": tiny_sft, "reward_model_path": tiny_reward, "output_dir": str(out), **PPO_SHORT})

    return built_once(tmp_path_factory, "ppo-straight", build)


class Interrupt(TrainerCallback):
    """Stops a run at the end of step `at_step` as Ctrl-C would: the exception leaves the trainer mid-run, with
    only the checkpoints saved so far."""

    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("simulated interruption")


class StepRecorder(TrainerCallback):
    """The optimizer steps a run takes (a resumed run takes only those after its checkpoint)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture
def sft_rows():
    return read_jsonl(REPO / "data/sft/train.jsonl", limit=64)


def load_make_datasets():
    """data/make_datasets.py, the generator of the shipped files (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("make_datasets", REPO / "data/make_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str):
    """A recipe's `main`, loaded from its file exactly as `accelerate launch recipes/<name>.py` would run it."""
    import runpy

    return runpy.run_path(str(REPO / "recipes" / f"{name}.py"), run_name=f"recipe_{name}")["main"]


def losses(log_history):
    return [entry["loss"] for entry in log_history if "loss" in entry]


# ------------------------------------------------------------------------------------------------ data files


@pytest.fixture
def offline_private_cache(tmp_path, monkeypatch):
    """No network, and each test's Arrow cache in its own tmp dir (datasets reads its cache root at call time)."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
