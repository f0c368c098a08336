"""The installed package is the product: a wheel built from this checkout, installed (not editable) in a fresh
virtual environment, runs the shipped pipeline from an empty directory.

The fresh environment gets the dependencies from this one through a plain path line in a .pth file (offline, in
seconds): a path line adds site-packages to sys.path without running the .pth files there, so an editable install of
rlhf-kit in this environment stays invisible, which the tests check.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import yaml
from conftest import REPO, TINY_SHAPE

from rlhf_kit.cli import main
from rlhf_kit.resources import SHIPPED, missing_shipped_file

# What building a wheel reads: the build files, the package and what setup.py copies into it.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "rlhf_kit", *SHIPPED)
SHORT = {
    "pretrain": {**TINY_SHAPE, "max_steps": 3, "per_device_train_batch_size": 4, "eval_strategy": "no",
                 "save_strategy": "no", "disable_tqdm": True},
    "sft": {"max_steps": 3, "per_device_train_batch_size": 4, "eval_strategy": "no", "save_strategy": "no",
            "disable_tqdm": True},
}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh virtual environment with rlhf-kit installed from a wheel of this checkout."""
    tmp = tmp_path_factory.mktemp("install")
    # Built from a copy: building in the checkout would leave build/ there, with files that a later build keeps.
    source = tmp / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(source)])
    (wheel,) = (tmp / "dist").glob("rlhf_kit-*.whl")
    venv = tmp / "venv"
    # --without-pip and this environment's pip (--python) install the same wheel without seconds of ensurepip.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    with open(os.path.join(purelib, "rlhf_kit_test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)])
    return venv


def _env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout must not be importable
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd, cwd=None):
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_an_installed_wheel_runs_the_shipped_pipeline_from_an_empty_directory(venv, tmp_path):
    where = _run([str(venv / "bin/python"), "-c", "import rlhf_kit.resources as r; print(r.__file__, r.ROOT)"],
                 cwd=tmp_path).split()
    assert all(path.startswith(str(venv)) for path in where), where  # the wheel's package and its shipped files
    rlhf_kit = str(venv / "bin/rlhf-kit")

    # The shipped config is not read from the package behind the user's back: the error says what to run.
    done = subprocess.run([rlhf_kit, "pipeline", "recipes/configs/pipeline/tiny.yaml"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 2 and "run `rlhf-kit init` there" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())

    assert "Copied" in _run([rlhf_kit, "init"], cwd=tmp_path)
    # The shipped tiny pipeline as copied, shortened the way tests/test_pipeline.py shortens it.
    config = yaml.safe_load((tmp_path / "recipes/configs/pipeline/tiny.yaml").read_text())
    config["stages"] = {stage: config["stages"][stage] for stage in SHORT}
    config["overrides"] = SHORT
    config["evaluation"].update(num_prompts=4, max_new_tokens=8)
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(config))
    log = _run([rlhf_kit, "pipeline", "short.yaml"], cwd=tmp_path)

    out = tmp_path / config["output_dir"]
    # The inference rows too: the few-shot examples (data/few_shot) and the task's answer regex come with the wheel.
    assert (out / "report.md").is_file() and set(yaml.safe_load((out / "report.json").read_text())["rows"]) == {
        "base", "sft", "base_raw", "base_raw_3_shot", "base_constrained", "sft_constrained"}
    assert all((out / stage / "rlhf_kit_stage.json").is_file() for stage in SHORT)
    # The log names the recipe each stage ran: the installed package's copy.
    assert f"{where[1]}/recipes/sft.py" in log


def test_init_copies_the_shipped_files_and_overwrites_none_unasked(tmp_path, capsys):
    from rlhf_kit.inference.retrieval import Retriever

    Retriever.from_corpus(REPO / "data/shop/catalog.jsonl")  # a checkout that has searched the corpus holds its index
    assert main(["init", str(tmp_path)]) == 0
    for name in ("recipes/configs/pipeline/tiny.yaml", "recipes/sft.py", "accelerate_config.yaml",
                 "accelerate_configs/zero3.yaml", "data/sft/train.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / name).read_bytes()
    assert not list(tmp_path.rglob("__pycache__")) and not list(tmp_path.rglob("*.rlhf-kit-index"))
    (tmp_path / "data/sft/train.jsonl").write_text("mine\n")
    assert main(["init", str(tmp_path)]) == 2
    assert "would be overwritten" in capsys.readouterr().err
    assert (tmp_path / "data/sft/train.jsonl").read_text() == "mine\n"
    assert main(["init", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "data/sft/train.jsonl").read_bytes() == (REPO / "data/sft/train.jsonl").read_bytes()


def test_a_missing_shipped_path_says_to_run_init_only_where_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert missing_shipped_file("recipes/configs/sft/tiny.yaml") == ""
    monkeypatch.chdir(tmp_path)
    assert "rlhf-kit init" in missing_shipped_file("recipes/configs/sft/tiny.yaml")
    assert missing_shipped_file("recipes/configs/sft/my-own.yaml") == ""  # not shipped: the plain error is enough
