"""The stages, in one place: their names and order, what each recipe parses its config into and what kind of data it
reads. The recipes, the CLI's help, the pipeline (order and its check of every stage before the first one runs), the
memory plan, export and the model card all read them from here, so a new stage is one entry per table.

    data_args, model_args, args = parse_config(*recipe_arguments("sft"), args=argv)

The dataclasses are named as "module:Class" and imported on demand: a recipe should not import the trainers' configs
of every other stage. Naming them, like a config names a task, also keeps this module at the bottom of the import
layers (it imports nothing of rlhf_kit), so export and the model card below the pipeline read the same names.
"""

from __future__ import annotations

from importlib import import_module

_DATA, _MODEL, _REWARDS = "rlhf_kit.data.loading:DataArguments", "rlhf_kit.model:ModelArguments", "rlhf_kit.rewards:RewardSources"

# The config dataclasses of each recipe (recipes/<name>.py), in the order parse_config returns them.
RECIPE_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "pretrain": ("rlhf_kit.training.pretraining:PretrainArguments",
                 "rlhf_kit.training.pretraining:PretrainTrainingArguments"),
    "sft": (_DATA, _MODEL, "rlhf_kit.training.sft:SFTArguments"),
    "reward": (_DATA, _MODEL, "rlhf_kit.training.reward_model:RewardArguments"),
    "ppo": (_DATA, _MODEL, "rlhf_kit.training.ppo.config:PPOConfig", _REWARDS),
    "grpo": (_DATA, _MODEL, "rlhf_kit.training.grpo:GRPOArguments", _REWARDS),
    "rloo": (_DATA, _MODEL, "rlhf_kit.training.grpo:RLOOArguments", _REWARDS),
    "dpo": (_DATA, _MODEL, "rlhf_kit.training.dpo:DPOArguments"),
    "best_of_n": (_DATA, _MODEL, "rlhf_kit.inference.best_of_n:BestOfNArguments", _REWARDS),
    "export": ("rlhf_kit.publish.export:ExportArguments",),
}

# The recipes that train a model, in the order the pipeline runs them: what `rlhf-kit train STAGE` runs, `rlhf-kit
# plan` estimates and export accepts (best-of-N writes a dataset, export converts). PPO, GRPO, RLOO and DPO each
# start from the SFT output; the pipeline runs them in this order and its report lists them in it.
TRAINING = ("pretrain", "sft", "reward", "ppo", "grpo", "rloo", "dpo")

# The pipeline's stages in the order it runs them: the training recipes, then best-of-N sampling from the SFT policy
# and RFT (rejection-sampling fine-tuning: the SFT recipe on the best-of-N dataset).
PIPELINE = (*TRAINING, "best_of_n", "rft")

# The stages that sample from the policy and score the samples with a reward model and/or reward functions: the
# reward model they train against belongs to their lineage, though their parent is the SFT model.
ONLINE_RL = ("ppo", "grpo", "rloo")

# The kind of data (rlhf_kit.data.loading.FORMATS) each recipe trains on; export reads none.
DATA_KIND: dict[str, str] = {"pretrain": "text", "sft": "sft", "reward": "preference", "ppo": "prompt",
                             "grpo": "prompt", "rloo": "prompt", "dpo": "preference", "best_of_n": "prompt"}


def recipe_arguments(recipe: str) -> tuple[type, ...]:
    """The config dataclasses of `recipe`, imported."""
    if recipe not in RECIPE_ARGUMENTS:
        raise KeyError(f"unknown recipe {recipe!r}; recipes are {sorted(RECIPE_ARGUMENTS)}")
    classes = []
    for name in RECIPE_ARGUMENTS[recipe]:
        module, _, attribute = name.partition(":")
        classes.append(getattr(import_module(module), attribute))
    return tuple(classes)
