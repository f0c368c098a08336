"""A stage's output directory: the whole run's training loss after a resume, and checkpoints written whole."""

import errno
import json
from types import SimpleNamespace

import pytest

from rlhf_kit.checkpoints import checkpoint_problem, staged_checkpoint
from rlhf_kit.runs import whole_run_train_loss


def test_whole_run_train_loss_by_hand(tmp_path):
    """Logged means 2.0 over steps 1-2 and 1.0 over steps 3-4; checkpoint-4; the resumed steps 5-6 average 0.5:
    (2.0 * 2 + 1.0 * 2 + 0.5 * 2) / 6 = 7 / 6."""
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    state = SimpleNamespace(global_step=6, log_history=[{"loss": 2.0, "step": 2}, {"loss": 1.0, "step": 4},
                                                        {"eval_loss": 9.0, "step": 4}, {"loss": 0.5, "step": 6}])
    assert whole_run_train_loss(state, 0.5, str(tmp_path)) == pytest.approx(7 / 6)
    assert whole_run_train_loss(state, 0.5, None) == 0.5  # no resume: the trainer's own figure


def test_a_staged_checkpoint_takes_its_name_only_when_complete(tmp_path):
    final = tmp_path / "checkpoint-3"
    with pytest.raises(OSError, match=r"No space left .*checkpoint-3: it needs about 1.0 MiB") as caught:
        with staged_checkpoint(final, needed_bytes=2**20) as staging:
            staging.mkdir()
            (staging / "model.safetensors").write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC
    assert not final.exists() and (tmp_path / "tmp-checkpoint-3").is_dir()

    with staged_checkpoint(final, needed_bytes=0) as staging:  # the next save of that step replaces it
        staging.mkdir(exist_ok=True)
        (staging / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert final.is_dir() and not (tmp_path / "tmp-checkpoint-3").exists()
    # The zero-byte weights file the failed attempt left (PPO clears the staging directory first) is named corrupt.
    assert checkpoint_problem(final) == "model.safetensors is truncated or corrupt (unreadable safetensors header)"
