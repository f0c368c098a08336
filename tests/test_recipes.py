"""The shipped recipes and their configs, without training: every YAML under recipes/configs parses exactly as its
recipe (or the pipeline) parses it, and GRPO and RLOO, two recipes as in TRL, differ only where their trainers do."""

import ast
import re

import pytest
from conftest import REPO

from rlhf_kit.config import field_names, load_yaml, parse_config
from rlhf_kit.pipeline import PipelineConfig, check_pipeline
from rlhf_kit.stages import RECIPE_ARGUMENTS, recipe_arguments

CONFIGS = REPO / "recipes/configs"
RECIPE_CONFIGS = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "pipeline")
PIPELINE_CONFIGS = sorted((CONFIGS / "pipeline").glob("*.yaml"))


def config_id(path):
    return f"{path.parent.name}/{path.name}"


def test_every_recipe_ships_a_tiny_config_and_every_config_folder_is_a_recipe():
    folders = {p.name for p in CONFIGS.iterdir() if p.is_dir()} - {"pipeline"}
    assert folders == set(RECIPE_ARGUMENTS)
    assert all((CONFIGS / recipe / "tiny.yaml").is_file() for recipe in RECIPE_ARGUMENTS)
    assert PIPELINE_CONFIGS


def as_parsed(key, value):
    """What the parsed config holds for a YAML value that its dataclass stores in another form."""
    if key == "report_to" and isinstance(value, str):  # TrainingArguments keeps a list; "none" is no integration
        return [] if value == "none" else [value]
    return value


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=config_id)
def test_shipped_recipe_config_parses_with_its_recipes_dataclasses_and_keeps_every_value(path):
    """Recipes rot when nothing parses their configs: a renamed key, a value out of bounds, a contradiction between
    settings. Parsed as `recipes/<stage>.py --config <path>` parses it (unknown keys, bounds, precision, the
    dataclasses' own checks), and every key reaches the run with the value the file gives it."""
    classes = recipe_arguments(path.parent.name)
    # The GPU configs ask for bf16, which transformers refuses to even parse on a machine without a GPU.
    overrides = {"use_cpu": True} if "use_cpu" in field_names(*classes) else None
    instances = parse_config(*classes, args=["--config", str(path)], overrides=overrides)
    parsed = {key: value for instance in instances for key, value in vars(instance).items()}
    for key, value in load_yaml(path).items():
        assert parsed[key] == as_parsed(key, value), key


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=config_id)
def test_shipped_pipeline_config_passes_the_pipelines_own_check(path, monkeypatch):
    """`rlhf-kit pipeline <path>` from the repository root: the pipeline's loader, then its check of every stage's
    config with the pipeline's overrides and wiring, data files and model paths, before the first stage would run."""
    monkeypatch.chdir(REPO)
    config = PipelineConfig.from_yaml(path)
    assert config.ordered_stages() == list(config.stages)  # the file lists its stages in the order they run
    check_pipeline(config)


# The only differences GRPO's recipe may have from RLOO's beyond its docstring: the trainer, and the stage's name
# (which picks its config dataclasses and names its stage record and summary).
GRPO_TO_RLOO = {"GRPOTrainer": "RLOOTrainer", '"grpo"': '"rloo"'}
# Lines only GRPO has: TRL 1.16's GRPOTrainer takes tools, its RLOOTrainer does not.
GRPO_ONLY = re.compile(r"\btools\b|require_response_template")


def recipe_body(name):
    """recipes/<name>.py after its docstring, as lines."""
    source = (REPO / "recipes" / f"{name}.py").read_text()
    docstring = ast.parse(source).body[0]
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant), name
    return source.splitlines()[docstring.end_lineno:]


def test_grpo_and_rloo_recipes_differ_only_where_their_trainers_differ():
    """GRPO and RLOO stay two recipes, as TRL keeps two trainers, so each reads top to bottom on its own. Beyond
    GRPO_TO_RLOO and GRPO's tool lines (GRPO_ONLY), only the docstring differs: it explains the method's advantage estimate and gives its own launch
    line. Anything else, a fix or a comment made in one file only, is drift."""
    grpo = [line for line in recipe_body("grpo") if not GRPO_ONLY.search(line)]
    for old, new in GRPO_TO_RLOO.items():
        assert any(old in line for line in grpo), old  # an allowed difference that is gone is removed from the list
        grpo = [line.replace(old, new) for line in grpo]
    assert grpo == recipe_body("rloo")
    for name, trainer in (("grpo", "GRPOTrainer"), ("rloo", "RLOOTrainer")):
        docstring = ast.get_docstring(ast.parse((REPO / "recipes" / f"{name}.py").read_text()))
        assert trainer in docstring and f"recipes/{name}.py --config recipes/configs/{name}/tiny.yaml" in docstring
