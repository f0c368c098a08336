"""A user error (a bad config, data file, path or gate) is one message and a non-zero exit, on the `rlhf-kit` command
and from a recipe under `accelerate launch`; a bug keeps its traceback, and `--debug` / RLHF_KIT_DEBUG=1 shows the
traceback of a user error too (issue 16, items 5 and 6)."""

import functools
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, load_recipe
from test_bad_inputs import NUMERIC_CASES, PIPELINE_CASES, _tiny_pipeline

from rlhf_kit import cli
from rlhf_kit.errors import DEBUG_ENV, is_user_error, run_main


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    # Set (to off) rather than deleted: monkeypatch restores only what it set, and `cli --debug` writes os.environ
    # itself, which would otherwise leak into every later test of the session.
    monkeypatch.setenv(DEBUG_ENV, "0")


def rlhf_kit_command(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "rlhf_kit.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_message(done, prefix, *fragments):
    """Non-zero, no traceback anywhere, and the message exactly once (other lines: progress bars, bitsandbytes
    saying it lacks optional CPU kernels on import)."""
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-4000:]
    [message] = [line for line in done.stderr.splitlines() if line.startswith(prefix)]
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------------ the real command

def test_train_through_accelerate_prints_the_recipes_message_once(tmp_path):
    """The recipe exits with its one line, and accelerate (launched --quiet) adds no traceback of its own."""
    done = rlhf_kit_command("train", "sft", "recipes/configs/sft/tiny.yaml", "--learning_rte", "1e-5",
                            "--output_dir", str(tmp_path / "sft"))
    assert_one_message(done, "error: ", "--learning_rte", "Did you mean 'learning_rate'")
    assert not (tmp_path / "sft").exists()


# Errors that need no model: (argv, the message's prefix, what it must say).
NO_MODEL_ERRORS = {
    "missing config": (["pipeline", "no-such-pipeline.yaml"], "rlhf-kit pipeline: ",
                       ["no-such-pipeline.yaml does not exist"]),
    "missing train config": (["train", "sft", "no-such-sft.yaml"], "rlhf-kit train: ",
                             ["Config file no-such-sft.yaml does not exist"]),
    "missing export": (["push", "outputs/no-such-export", "--repo_id", "me/model", "--dry_run"], "rlhf-kit push: ",
                       ["outputs/no-such-export does not exist"]),
    # A model path that does not exist, on each command that takes one ("./": a path even without an outputs/ here).
    "missing model, generate": (["generate", "./outputs/no-such-sft", "--prompts", "data/prompts", "--output",
                                 "no-such.jsonl"], "rlhf-kit generate: ", ["model: ./outputs/no-such-sft does not exist"]),
    "missing model, eval": (["eval", "./outputs/no-such-sft"], "rlhf-kit eval: ",
                            ["model: ./outputs/no-such-sft does not exist"]),
    "missing model, chat": (["chat", "./outputs/no-such-sft"], "rlhf-kit chat: ",
                            ["model: ./outputs/no-such-sft does not exist"]),
    "missing model, export": (["export", "./outputs/no-such-sft"], "rlhf-kit export: ",
                              ["model_path: ./outputs/no-such-sft does not exist"]),
    "missing model, best-of-n": (["best-of-n", "./outputs/no-such-sft"], "rlhf-kit best-of-n: ",
                                 ["model_name_or_path: ./outputs/no-such-sft does not exist"]),
    "unknown task": (["eval", "outputs/no-such-sft", "--task", "no_such_task"], "rlhf-kit eval: ",
                     ["task 'no_such_task'"]),
}


@pytest.mark.parametrize("argv,prefix,fragments", list(NO_MODEL_ERRORS.values()), ids=list(NO_MODEL_ERRORS))
def test_a_user_error_on_the_command_line_is_one_message(argv, prefix, fragments):
    assert_one_message(rlhf_kit_command(*argv), prefix, *fragments)


@pytest.mark.parametrize("argv", [argv for argv, _, _ in NO_MODEL_ERRORS.values()], ids=list(NO_MODEL_ERRORS))
def test_a_user_error_that_needs_no_model_is_found_before_torch_loads(argv):
    """Checked first, it fails in a fraction of a second; behind the imports of torch, transformers and PEFT it took
    11 s (push and eval, before)."""
    script = "import sys; from rlhf_kit import cli; code = cli.main(sys.argv[1:]); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.stderr.startswith(f"rlhf-kit {argv[0]}: "), done.stderr[-3000:]
    assert done.stdout.split() == ["False"], done.stdout[-3000:]


def test_debug_environment_variable_shows_the_traceback():
    done = rlhf_kit_command("pipeline", "no-such-pipeline.yaml", env={DEBUG_ENV: "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "ConfigError" in done.stderr


# ------------------------------------------------------------------------------------------------ cli.main in-process

@pytest.mark.parametrize("change,fragments", PIPELINE_CASES)
def test_every_pipeline_table_error_is_one_message(tmp_path, monkeypatch, capsys, change, fragments):
    """The pipeline cases of test_bad_inputs' table, through the command: return 2, the message, no traceback."""
    monkeypatch.chdir(REPO)
    config = _tiny_pipeline(tmp_path, change(tmp_path))
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": config.output_dir, "stages": config.stages,
                                    "overrides": config.overrides, "evaluation": config.evaluation}))
    assert cli.main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(fragment in err for fragment in fragments), err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_failed_stage_ends_the_pipeline_without_a_traceback(tmp_path, monkeypatch, capsys):
    """The stage printed why it failed; the pipeline adds which stage and how to resume, not its own traceback."""
    from rlhf_kit import pipeline

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(pipeline, "run_pipeline", functools.partial(pipeline.run_pipeline, run=lambda cmd, env: 3))
    assert cli.main(["pipeline", "recipes/configs/pipeline/tiny.yaml", "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stage 'pretrain' failed with exit code 3" in err and "rerun to resume" in err


def test_debug_flag_raises_the_user_error_and_passes_on_to_launched_recipes():
    with pytest.raises(FileNotFoundError, match="no-such-export does not exist"):
        cli.main(["--debug", "push", "outputs/no-such-export", "--repo_id", "me/model", "--dry_run"])
    assert os.environ[DEBUG_ENV] == "1"  # what `train` and `pipeline` hand to accelerate's processes


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only the kit's own refusals are user errors: a ValueError from another library is a bug, as is anything else."""
    from rlhf_kit.publish import hub

    argv = ["push", str(tmp_path), "--repo_id", "me/model", "--dry_run"]  # a folder that exists: on to the upload
    monkeypatch.setattr(hub, "push_output", lambda *a, **k: json.loads("{"))  # JSONDecodeError, a ValueError
    with pytest.raises(json.JSONDecodeError):
        cli.main(argv)
    monkeypatch.setattr(hub, "push_output", lambda *a, **k: [][0])
    with pytest.raises(IndexError):
        cli.main(argv)


# ------------------------------------------------------------------------------------------------ recipes' run_main

@pytest.mark.parametrize("recipe,argv,fragments", NUMERIC_CASES[:3], ids=lambda v: " ".join(v) if isinstance(v, list)
                         else v)
def test_recipe_user_error_exits_2_with_the_message(recipe, argv, fragments, capsys):
    main = load_recipe(recipe)
    config = str(REPO / f"recipes/configs/{recipe}/tiny.yaml")
    with pytest.raises(SystemExit) as exit_:
        run_main(functools.update_wrapper(lambda: main(["--config", config, *argv]), main))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(f in err for f in fragments), err


def test_missing_model_path_says_what_it_is_and_how_to_make_it(tmp_path, capsys, monkeypatch):
    """Item 5: `outputs/tiny-base` before the pretrain stage ran (it could also be a Hub id, which is not found)."""
    monkeypatch.chdir(tmp_path)  # no outputs/ here, so it is also a Hub id (with one it is a path: test_bad_inputs)
    main = load_recipe("sft")
    config = str(REPO / "recipes/configs/sft/tiny.yaml")
    with pytest.raises(SystemExit):
        run_main(functools.update_wrapper(lambda: main(["--config", config, "--model_name_or_path",
                                                        "outputs/no-such-base", "--output_dir", str(tmp_path),
                                                        "--dataset_name", str(REPO / "data/sft")]), main))
    err = capsys.readouterr().err
    assert "outputs/no-such-base is not a local directory" in err and "output_dir of an earlier stage" in err
    assert "rlhf-kit train pretrain recipes/configs/pretrain/tiny.yaml" in err and "rlhf-kit pipeline" in err


def test_a_plain_value_error_is_a_user_error_only_when_the_kit_raised_it():
    from rlhf_kit.config import ConfigError, load_yaml
    from rlhf_kit.tasks import review

    def raised(call):
        try:
            call()
        except Exception as error:
            return error

    assert is_user_error(raised(lambda: load_yaml("no-such.yaml")))  # a ConfigError
    assert isinstance(raised(lambda: load_yaml("no-such.yaml")), ConfigError)
    assert is_user_error(raised(lambda: review.make_prompt("no-such-item", 0)))  # a kit check's plain ValueError
    assert not is_user_error(raised(lambda: int("x")))  # raised here, in no kit file
    assert not is_user_error(raised(lambda: json.loads("{")))  # raised inside json
    assert not is_user_error(raised(lambda: [][0]))
