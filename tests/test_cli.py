"""The `rlhf-kit` command's own behaviour (each subcommand's work is tested with the module it runs)."""

import json
import subprocess
import sys

from conftest import REPO


def test_train_runs_a_stage_through_accelerate_and_says_what_to_run_next(tiny_base, tmp_path):
    """`rlhf-kit train sft CONFIG` is `accelerate launch --config_file accelerate_config.yaml recipes/sft.py --config
    CONFIG` (the pipeline's stages run the other recipes so)."""
    out = tmp_path / "sft"
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_kit.cli", "train", "sft", "recipes/configs/sft/tiny.yaml",
         "--model_name_or_path", tiny_base, "--output_dir", str(out), "--max_steps", "2", "--eval_strategy", "no",
         "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
         "--accelerate_config", str(REPO / "accelerate_config.yaml")],
        cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== sft finished" in done.stdout and (out / "adapter_model.safetensors").is_file()
    record = json.loads((out / "rlhf_kit_stage.json").read_text())
    assert record["stage"] == "sft" and record["config"]["max_steps"] == 2
    assert f"{REPO}/recipes/sft.py --config recipes/configs/sft/tiny.yaml" in done.stdout  # which recipe ran
    assert f"next:\n  rlhf-kit train reward recipes/configs/reward/tiny.yaml --model_name_or_path {out}" in done.stdout


def test_train_refuses_an_unknown_stage(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rlhf_kit.cli", "train", "sfft", "x.yaml"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'sfft'" in done.stderr and "Traceback" not in done.stderr


def test_the_command_starts_without_importing_transformers():
    """`rlhf-kit --help` and `rlhf-kit init` take 0.05 s; importing transformers at the top of the command, as a
    module-level import of rlhf_kit.config did for one commit, made every command start in 0.7 s."""
    script = "import sys; import rlhf_kit.cli; print(sorted({'transformers', 'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["[]"], done.stdout + done.stderr[-2000:]
