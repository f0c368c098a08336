"""The stage names of rlhf_kit.stages are the ones everything else accepts: a training stage has its recipe, its
configs and its entry in every per-stage table, the memory plan estimates it, export takes its output and the
pipeline runs it, in the pipeline's order."""

import json

import pytest
from conftest import REPO

from rlhf_kit.pipeline import WIRING, PipelineConfig
from rlhf_kit.plan import stage_of
from rlhf_kit.publish.export import ExportError, check_stage_output
from rlhf_kit.publish.model_card import KEY_METRICS, TITLES
from rlhf_kit.runs import STAGE_FILE, StageOutput
from rlhf_kit.stages import DATA_KIND, PIPELINE, RECIPE_ARGUMENTS, TRAINING


@pytest.mark.parametrize("stage", TRAINING)
def test_every_training_stage_is_known_everywhere(stage, tmp_path):
    tiny = REPO / "recipes/configs" / stage / "tiny.yaml"
    assert (REPO / "recipes" / f"{stage}.py").is_file() and tiny.is_file()
    assert stage in RECIPE_ARGUMENTS and stage in DATA_KIND and stage in WIRING
    assert stage in TITLES and stage in KEY_METRICS  # the model card can name it and show its metrics
    assert stage_of(tiny) == stage  # `rlhf-kit plan` estimates it
    assert PipelineConfig(stages={stage: str(tiny)}).ordered_stages() == [stage]  # the pipeline runs it

    # Export reads the stage's record: an unfinished one is refused as unfinished, not as an unknown stage.
    (tmp_path / STAGE_FILE).write_text(json.dumps({"stage": stage, "complete": False}))
    with pytest.raises(ExportError, match=f"the {stage} stage in .* did not finish"):
        check_stage_output(StageOutput.read(tmp_path))


def test_the_pipeline_runs_training_stages_in_their_order_then_best_of_n_and_rft():
    configs = {stage: str(REPO / "recipes/configs" / stage / "tiny.yaml") for stage in reversed(TRAINING)}
    configs.update(rft=str(REPO / "recipes/configs/sft/rft-tiny.yaml"),
                   best_of_n=str(REPO / "recipes/configs/best_of_n/tiny.yaml"))
    # The RL alternatives start from the SFT output after the reward model; the report lists them in this order.
    expected = ["pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo", "best_of_n", "rft"]
    assert PipelineConfig(stages=configs).ordered_stages() == expected == list(PIPELINE)
