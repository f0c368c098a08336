"""Checkpoint directories: which ones a run can resume from, and writing one whole or not at all.

A run killed while saving (or stopped by a full disk) leaves a checkpoint cut off part-way. transformers 5.24's
Trainer writes `checkpoint-N` in place, and its `get_last_checkpoint` takes the newest by name whatever it holds, so
one such directory blocked every rerun. A resume therefore takes the newest checkpoint that is complete (see
:func:`checkpoint_problem`) and says which ones it skipped; rlhf-kit's own PPO trainer also writes into a staging
directory and renames it only when every file is in place (:func:`staged_checkpoint`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# The staging name must not start with "checkpoint-": transformers' rotation globs "checkpoint-*".
STAGING_PREFIX = "tmp-"
TRAINER_STATE = "trainer_state.json"  # both trainers write it last, so its presence means the rest was written
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "adapter_model.bin")
# Weights that sharded runs save instead: accelerate's FSDP sharded state dict, DeepSpeed's per-tag directory.
SHARDED_WEIGHTS = ("pytorch_model_fsdp*", "global_step*")


def checkpoint_step(path: str | Path) -> int | None:
    match = CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` cannot be resumed from, or None when it is complete.

    Complete means: trainer_state.json parses and names the directory's step; model weights are present; every
    safetensors file is as long as its header says; every torch file (optimizer, scheduler, RNG: zip archives) has
    its closing directory, which is written last; every JSON file parses.
    """
    path = Path(path)
    state = path / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the save did not finish)"
    try:
        step = dict(json.loads(state.read_text())).get("global_step")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        return f"{TRAINER_STATE} is truncated or corrupt ({e})"
    if checkpoint_step(path) is not None and step != checkpoint_step(path):
        return f"{TRAINER_STATE} is for step {step}, not {checkpoint_step(path)}"
    if not _has_weights(path):
        return f"no model weights (none of {', '.join(WEIGHTS)})"
    for file in sorted(path.rglob("*")):
        problem = _file_problem(file)
        if problem:
            return f"{file.relative_to(path)} {problem}"
    return None


def _has_weights(path: Path) -> bool:
    return any((path / name).exists() for name in WEIGHTS) or any(any(path.glob(p)) for p in SHARDED_WEIGHTS)


def _file_problem(file: Path) -> str | None:
    if file.suffix == ".safetensors":
        return _safetensors_problem(file)
    if file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):
        return "is truncated or corrupt (not a complete torch archive)"
    if file.suffix == ".json":
        try:
            json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "is truncated or corrupt (not valid JSON)"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes the header locates."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_length)) if 8 + header_length <= size else None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if header is None:
        return "is truncated or corrupt (unreadable safetensors header)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_length + end:
        return f"is truncated or corrupt ({size} bytes, its header describes {8 + header_length + end})"
    return None


def last_valid_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint-N in `output_dir`; each newer incomplete one is skipped with a warning."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                        key=checkpoint_step, reverse=True)
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        warnings.warn(f"Skipping checkpoint {candidate}: {problem}. It was probably cut off while being written (a "
                      "kill or a full disk); resuming from the newest complete checkpoint before it instead.",
                      stacklevel=2)
    return None


def staging_dir(final: Path) -> Path:
    return final.with_name(STAGING_PREFIX + final.name)


@contextmanager
def staged_checkpoint(final: Path, needed_bytes: int, write: bool = True) -> Iterator[Path]:
    """Write a checkpoint into a staging directory, then rename it to `final` when every file is in place.

    Yields the staging directory. A kill part-way leaves only the staging directory, which no resume looks at and
    the next save of that step replaces. A full disk is reported with the path and the space the checkpoint needs.
    With several processes, every one writes into the staging directory; only the one with `write` renames, and
    the caller must synchronize the processes around the block, and clear a staging directory a killed save left
    (one process, before the others start writing).
    """
    staging = staging_dir(final)
    try:
        yield staging
    except Exception as e:
        if not _is_disk_full(e, staging, needed_bytes):
            raise
        raise OSError(errno.ENOSPC, disk_full_message(final, needed_bytes)) from e
    if write:
        shutil.rmtree(final, ignore_errors=True)  # an older copy of this step, from a run that went on before
        os.replace(staging, final)


@contextmanager
def disk_full_explained(trainer) -> Iterator[None]:
    """Around a transformers Trainer's `train()` and `save_model()`, whose saves we do not write ourselves: a full
    disk is reported with the directory being written and about how much space it needs."""
    try:
        yield
    except Exception as e:
        # In train() the write that failed is the checkpoint of the current step; after it, the final model.
        path = Path(trainer.args.output_dir)
        if trainer.is_in_train:
            path = path / f"checkpoint-{trainer.state.global_step}"
        needed = trainer_checkpoint_bytes(trainer.model)
        if not _is_disk_full(e, path, needed):
            raise
        raise OSError(errno.ENOSPC, disk_full_message(path, needed)) from e


def trainer_checkpoint_bytes(model) -> int:
    """About the size of one checkpoint: the saved weights (the adapter with PEFT, else the whole model) and the
    optimizer's two fp32 moments per trainable parameter (Adam)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    saved = [p for p in params if p.requires_grad] if hasattr(model, "peft_config") else params
    return sum(p.numel() * p.element_size() for p in saved) + 2 * 4 * trainable


# How a full disk shows in the libraries that write checkpoints: an OSError from Python, a Rust io error (code 28)
# from safetensors, and from torch.save's C++ writer a RuntimeError without an errno, where the free space tells.
_DISK_FULL_TEXT = ("No space left", "StorageFull", "code: 28")
_TORCH_WRITER_TEXT = ("PytorchStreamWriter", "inline_container")


def _is_disk_full(error: BaseException, path: Path, needed_bytes: int) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if any(t in text for t in _DISK_FULL_TEXT):
        return True
    return any(t in text for t in _TORCH_WRITER_TEXT) and _free_bytes(path) < needed_bytes


def _free_bytes(path: Path) -> int:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(existing).free


def disk_full_message(path: Path, needed_bytes: int) -> str:
    return (f"No space left on the device while writing {path}: it needs about "
            f"{_megabytes(needed_bytes)} and {_megabytes(_free_bytes(path))} are free there. Free some space, lower "
            "save_total_limit, or set output_dir on a larger disk, then run the same command again to resume from "
            "the last complete checkpoint.")


def _megabytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) state dict: about what saving it takes on disk."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
