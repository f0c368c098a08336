"""Bad inputs and interruptions, one case each, with what the user must see: a clear early error naming the file,
row, field or key and saying what to do, or (for what is handled rather than refused) the warning and the record
entry that report it. None of them may be silent. The cases are those of issue 15's adversarial review.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_SHAPE


# ---- Early, whole-run validation: numeric settings, oversized rows, pipeline configs, unclear messages ----------
# (items 2, 3, 8, 10)


# ---- Half-written outputs and interrupted runs: --force, resumed records, partial checkpoints, stage records -----
# (items 1, 4, 5, 6)

# Imports of this section live here, not at the top of the file, so each section merges on its own.
import errno  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import torch  # noqa: E402
from conftest import REPO, load_recipe, losses  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from rlhf_kit.checkpoints import checkpoint_problem  # noqa: E402
from rlhf_kit.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from rlhf_kit.runs import STAGE_FILE, resume_checkpoint  # noqa: E402

SFT_TINY = str(REPO / "recipes/configs/sft/tiny.yaml")
SFT_SHORT = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "save_total_limit": None,
             "per_device_train_batch_size": 8, "max_length": 64, "learning_rate": 3e-3, "warmup_steps": 0,
             "lr_scheduler_type": "constant", "logging_steps": 1, "eval_strategy": "no", "disable_tqdm": True,
             "report_to": "none"}


def _sft(tiny_base, out, callbacks=None, **overrides):
    return load_recipe("sft")(["--config", SFT_TINY], callbacks=callbacks, overrides={
        "model_name_or_path": tiny_base, "output_dir": str(out), **SFT_SHORT, **overrides})


def _record(out):
    return json.loads((out / STAGE_FILE).read_text())


class _Steps(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)


@pytest.fixture(scope="module")
def sft_straight(tiny_base, tmp_path_factory):
    """An uninterrupted 6-step SFT run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("sft-straight")
    _sft(tiny_base, out)
    return out


def _cut(ckpt, how):
    """Leave `ckpt` as a save cut off part-way (a kill, a full disk) would."""
    if how == "no trainer state":  # killed before the last file
        (ckpt / "trainer_state.json").unlink()
    elif how == "truncated trainer state":
        state = ckpt / "trainer_state.json"
        state.write_text(state.read_text()[:40])
    else:  # a weights, optimizer or RNG file cut short, trainer_state.json written
        file = ckpt / how
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


CUTS = ["no trainer state", "truncated trainer state", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth"]


@pytest.mark.parametrize("how", CUTS)
def test_a_cut_off_checkpoint_is_named_incomplete_and_skipped(sft_straight, tmp_path, how):
    for step in (2, 4):
        shutil.copytree(sft_straight / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    assert checkpoint_problem(tmp_path / "checkpoint-4") is None
    _cut(tmp_path / "checkpoint-4", how)
    assert checkpoint_problem(tmp_path / "checkpoint-4")  # a reason, not None
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*checkpoint-4: .*newest complete checkpoint"):
        assert resume_checkpoint(str(tmp_path), None) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match=r"checkpoint-4 is incomplete: .*earlier checkpoint"):
        resume_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path / "checkpoint-4"))


def test_sft_resumes_past_a_cut_off_checkpoint_and_matches_the_uninterrupted_run(tiny_base, sft_straight, tmp_path):
    out = tmp_path / "resumed"
    for step in (2, 4):
        shutil.copytree(sft_straight / f"checkpoint-{step}", out / f"checkpoint-{step}")
    _cut(out / "checkpoint-4", "adapter_model.safetensors")
    steps = _Steps()
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*checkpoint-4"):
        resumed = _sft(tiny_base, out, callbacks=[steps])
    assert steps.seen == [3, 4, 5, 6]  # from checkpoint-2
    assert losses(resumed.state.log_history) == pytest.approx(losses(_history(sft_straight)), rel=1e-4)
    torch.testing.assert_close(load_file(out / "adapter_model.safetensors"),
                               load_file(sft_straight / "adapter_model.safetensors"))
    # Item 4: the record's train_loss is the whole run's, as in the uninterrupted run.
    assert _record(out)["metrics"]["train_loss"] == pytest.approx(_record(sft_straight)["metrics"]["train_loss"],
                                                                  rel=1e-4)


def test_sft_full_disk_names_the_checkpoint_and_the_rerun_resumes_past_it(tiny_base, sft_straight, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "sft"
    monkeypatch.setattr(torch, "save", _disk_full_at("checkpoint-4/optimizer.pt"))
    with pytest.raises(OSError, match=r"No space left .*checkpoint-4: it needs about [\d.,]+ MiB and .* free"):
        _sft(tiny_base, out)
    monkeypatch.undo()
    assert checkpoint_problem(out / "checkpoint-4")  # the weights were written, the optimizer and the state not
    steps = _Steps()
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*checkpoint-4: no trainer_state.json"):
        _sft(tiny_base, out, callbacks=[steps])  # the same command again, with space
    assert steps.seen == [3, 4, 5, 6] and checkpoint_problem(out / "checkpoint-4") is None
    torch.testing.assert_close(load_file(out / "adapter_model.safetensors"),
                               load_file(sft_straight / "adapter_model.safetensors"))


def _disk_full_at(suffix):
    """torch.save that fails as a full disk does when it writes a file ending in `suffix`."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    return save


def _history(out):
    return json.loads((out / "checkpoint-6/trainer_state.json").read_text())["log_history"]


def test_ppo_full_disk_names_the_checkpoint_and_the_rerun_resumes_and_matches(tiny_sft, tiny_reward, tmp_path,
                                                                              monkeypatch):
    settings = {"model_name_or_path": tiny_sft, "reward_model_path": tiny_reward, "max_steps": 4,
                "save_steps": 2, "save_total_limit": None, "per_device_train_batch_size": 8, "eval_on_start": False,
                "eval_strategy": "no", "response_length": 12, "disable_tqdm": True, "report_to": "none"}
    ppo = load_recipe("ppo")

    def run(out):
        return ppo(["--config", str(REPO / "recipes/configs/ppo/tiny.yaml")],
                   overrides={**settings, "output_dir": str(out)})

    run(tmp_path / "straight")
    out = tmp_path / "resumed"
    monkeypatch.setattr(torch, "save", _disk_full_at("checkpoint-4/optimizer.pt"))
    with pytest.raises(OSError, match=r"No space left .*checkpoint-4: it needs about [\d.,]+ MiB and .* free"):
        run(out)
    monkeypatch.undo()
    # The half-written checkpoint never took the name a resume looks for.
    assert checkpoint_problem(out / "checkpoint-2") is None and not (out / "checkpoint-4").exists()
    assert (out / "tmp-checkpoint-4").is_dir()

    run(out)  # the same command again, with space: from checkpoint-2
    assert not (out / "tmp-checkpoint-4").exists() and checkpoint_problem(out / "checkpoint-4") is None
    torch.testing.assert_close(load_file(out / "adapter_model.safetensors"),
                               load_file(tmp_path / "straight/adapter_model.safetensors"))
    assert _record(out)["metrics"]["train_loss"] == pytest.approx(
        _record(tmp_path / "straight")["metrics"]["train_loss"], rel=1e-4)


def test_a_truncated_stage_record_is_named_and_the_stage_reruns(tmp_path):
    config = PipelineConfig(output_dir=str(tmp_path), stages={"sft": SFT_TINY})
    config.stage_dir("sft").mkdir()
    (config.stage_dir("sft") / STAGE_FILE).write_text('{"stage": "sft", "compl')  # a write cut off
    ran = []
    with pytest.warns(UserWarning, match=rf"{STAGE_FILE} is truncated or corrupt .*treating the stage as unfinished"):
        status = run_pipeline(config, run=lambda cmd, env: ran.append(cmd) or 0)
    assert status == {"sft": "ran"} and len(ran) == 1


def test_pipeline_force_trains_the_stage_from_scratch_and_the_record_matches(tiny_base, tmp_path):
    def config(learning_rate):
        return PipelineConfig(output_dir=str(tmp_path), accelerate_config=str(REPO / "accelerate_config.yaml"),
                              stages={"sft": SFT_TINY}, overrides={"sft": {
                                  **SFT_SHORT, "save_total_limit": 2, "model_name_or_path": tiny_base, "max_steps": 4,
                                  "learning_rate": learning_rate}})

    sft = tmp_path / "sft"
    run_pipeline(config(1e-3), run=lambda cmd, env: subprocess.call(cmd, cwd=REPO, env=env))
    before = load_file(sft / "adapter_model.safetensors")

    def run_from_scratch(cmd, env):  # what the forced stage starts from: nothing of the previous run
        assert not sft.exists()
        return subprocess.call(cmd, cwd=REPO, env=env)

    log = []
    assert run_pipeline(config(3e-3), force=True, log=log.append, run=run_from_scratch) == {"sft": "ran"}
    assert any("--force: removing the previous output" in line for line in log)
    history = json.loads((sft / "checkpoint-4/trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    assert {e["learning_rate"] for e in history if "loss" in e} == {3e-3}  # trained at the new rate
    after = load_file(sft / "adapter_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    record = _record(sft)
    assert record["config"]["learning_rate"] == 3e-3 and record["metrics"]["train_loss"] > 0


# ---- Security, network and processes: secrets, telemetry, signals, read-only inputs ------------------------------
# (items 7, 9, 11, 13)


def _children_of(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]  # the fields after "(command name)"
        if state != "Z":
            parents[int(entry)] = int(ppid)
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_pipeline_stops_its_running_stage(tmp_path, signum):
    """Item 9: the stage (accelerate's launcher and the training process under it) goes down with the pipeline,
    which says it stopped and exits non-zero; before, the stage went on training in the background."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "stages": {"pretrain": "recipes/configs/pretrain/tiny.yaml"},
        "overrides": {"pretrain": {**TINY_SHAPE, "max_steps": 100000, "eval_strategy": "no", "save_strategy": "no"}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # a file, not a pipe: an orphaned stage would hold a pipe open
        pipeline = subprocess.Popen([sys.executable, "-m", "rlhf_kit.cli", "pipeline", str(config)], cwd=REPO,
                                    env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    stage = []
    try:
        deadline = time.monotonic() + 60
        while len(stage) < 2 and time.monotonic() < deadline:  # the launcher, then the training process it starts
            time.sleep(0.2)
            stage = _children_of(pipeline.pid)
        assert len(stage) >= 2, "the stage never started"
        pipeline.send_signal(signum)
        pipeline.wait(timeout=30)
        gone_by = time.monotonic() + 10
        while any(map(_alive, stage)) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not [pid for pid in stage if _alive(pid)], "the stage outlived the pipeline"
        assert pipeline.returncode == 128 + signum
        err = log.read_text()
        assert f"stopped by {signal.Signals(signum).name}" in err and "again to resume" in err
        assert "Traceback" not in err.split("stopped by")[-1]
    finally:
        for pid in [pipeline.pid, *stage]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


PLANTED = "hf_PLANTEDsecret123"
# Put first on PYTHONPATH as `sitecustomize`, so every process of a run (launcher, recipe, threads) records each
# connection attempt and DNS lookup it makes, and is refused: nothing leaves the machine even when a test fails.
NETWORK_GUARD = '''
import os, socket, traceback

def _refuse(what):
    with open(os.environ["NETWORK_LOG"], "a") as f:
        f.write(f"{what}\\n{''.join(traceback.format_stack(limit=25))}\\n")
    raise OSError(f"network refused by the test: {what}")

def _connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _refuse(f"connect {address}")
    return _unguarded_connect(self, address)

_unguarded_connect = socket.socket.connect
socket.socket.connect = _connect
socket.getaddrinfo = lambda host, *args, **kwargs: _refuse(f"getaddrinfo {host}")
'''


@pytest.fixture(scope="module")
def guarded_pipeline(tmp_path_factory):
    """The real `rlhf-kit pipeline` through every stage (shrunk to a few steps, each saving checkpoints), with a
    planted Hub token (as pipeline overrides, and in the SFT stage's own YAML) and offline mode NOT set, every
    connection attempt recorded and refused. Returns the run's directory, its captured log and its network log."""
    root = tmp_path_factory.mktemp("guarded")
    (root / "guard").mkdir()
    (root / "guard" / "sitecustomize.py").write_text(NETWORK_GUARD)
    sft_yaml = root / "sft.yaml"
    sft_yaml.write_text((REPO / "recipes/configs/sft/tiny.yaml").read_text() + f"hub_token: {PLANTED}\n")
    quick = {"eval_strategy": "no", "save_strategy": "steps", "disable_tqdm": True, "report_to": "none"}
    config = {
        "output_dir": str(root / "out"),
        "stages": {"pretrain": "recipes/configs/pretrain/tiny.yaml", "sft": str(sft_yaml),
                   "reward": "recipes/configs/reward/tiny.yaml", "ppo": "recipes/configs/ppo/tiny.yaml"},
        "overrides": {
            "pretrain": {**quick, **TINY_SHAPE, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 8,
                         "hub_token": PLANTED},
            "sft": {**quick, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 8, "max_length": 64},
            "reward": {**quick, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 8, "max_length": 64,
                       "reference_pairs": 16, "hub_token": PLANTED},
            "ppo": {**quick, "max_steps": 2, "save_steps": 1, "eval_on_start": False, "per_device_train_batch_size": 4,
                    "response_length": 8, "allow_weak_reward_model": True, "hub_token": PLANTED},
        },
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in offline}
    env.update(PYTHONPATH=f"{root / 'guard'}:{REPO}", NETWORK_LOG=str(root / "network.log"), HF_HOME=str(root / "hf"),
               RLHF_KIT_CACHE=str(root / "cache"))
    with open(root / "pipeline.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "rlhf_kit.cli", "pipeline", str(root / "pipeline.yaml")],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    assert code == 0, (root / "pipeline.log").read_text()[-3000:]
    return root


def test_planted_token_reaches_no_file_checkpoint_or_log(guarded_pipeline):
    """Item 11: not in any stage output, checkpoint (training_args.bin is a pickle: searched as bytes), cache or the
    pipeline's log; before, every checkpoint-*/training_args.bin held it and the log printed it."""
    root = guarded_pipeline
    checkpoints = list((root / "out").glob("*/checkpoint-*"))
    assert {c.parent.name for c in checkpoints} == {"pretrain", "sft", "reward", "ppo"}
    assert (root / "cache" / "rlhf_kit_merged").is_dir()  # the merged SFT model is searched too
    inputs = {root / "pipeline.yaml", root / "sft.yaml"}  # where the user wrote it
    leaks = [str(f.relative_to(root)) for f in root.rglob("*")
             if f.is_file() and f not in inputs and PLANTED.encode() in f.read_bytes()]
    assert leaks == []
    assert "hub_token is ignored and kept out of every saved file" in (root / "pipeline.log").read_text()


def test_run_on_local_files_makes_no_network_call(guarded_pipeline):
    """Item 13: with every model and data set local and offline mode unset, no process of the run opens a
    connection; before, datasets' download count and TRL's telemetry reached for the Hub."""
    log = guarded_pipeline / "network.log"
    assert not log.exists(), log.read_text()[:3000]


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(directory)): (f.stat().st_size, f.stat().st_mtime_ns) for f in directory.rglob("*")}


def test_read_only_sft_adapter_feeds_the_reward_stage(tiny_base, tmp_path, monkeypatch):
    """Item 7: the merged SFT model is cached in the cache directory ($RLHF_KIT_CACHE), nothing is written inside the
    input directory, and the reward adapter's recorded base names the SFT adapter it derives from; before, the
    reward stage wrote `<sft>/merged` and failed on a read-only SFT directory (root ignores the mode bits, so the
    test checks that the directory is left exactly as it was)."""
    import contextlib
    import io

    from conftest import load_recipe

    from rlhf_kit.model import merged_source

    sft, cache = tmp_path / "sft", tmp_path / "cache"
    monkeypatch.setenv("RLHF_KIT_CACHE", str(cache))
    quick = {"eval_strategy": "no", "save_strategy": "no", "disable_tqdm": True, "max_length": 64,
             "per_device_train_batch_size": 8, "report_to": "none"}
    with contextlib.redirect_stdout(io.StringIO()):
        load_recipe("sft")(["--config", "recipes/configs/sft/tiny.yaml"],
                           overrides={**quick, "model_name_or_path": tiny_base, "output_dir": str(sft), "max_steps": 2})
    before = _snapshot(sft)
    for path in [sft, *sft.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            load_recipe("reward")(["--config", "recipes/configs/reward/tiny.yaml"], overrides={
                **quick, "model_name_or_path": str(sft), "output_dir": str(tmp_path / "reward"), "max_steps": 2,
                "reference_pairs": 16})
    finally:
        for path in [sft, *sft.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert _snapshot(sft) == before
    base = json.loads((tmp_path / "reward" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_relative_to(cache) and Path(base).is_dir()
    assert merged_source(base) == sft.resolve()
