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
