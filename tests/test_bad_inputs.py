"""Bad inputs and interruptions, one case each, with what the user must see: a clear early error naming the file,
row, field or key and saying what to do, or (for what is handled rather than refused) the warning and the record
entry that report it. None of them may be silent. The cases are those of issue 15's adversarial review.
"""

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
