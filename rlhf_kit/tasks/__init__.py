"""Tasks shipped with the kit, each with a programmatic gold annotator, so that a pipeline's gains can be measured.

A task is a module that evaluation names by its import path (`task: rlhf_kit.tasks.review` in a pipeline config,
`rlhf-kit eval --task rlhf_kit.tasks.review`). It provides:

- ``metrics(prompts, responses) -> dict[str, float]``: the task's columns in an evaluation table;
- ``gold_score(prompt, response) -> float``: the gold annotator, which judges win rates;
- ``gold(prompts, completions, **columns) -> list[float]``: the same as a reward function (`module:function`).

Nothing else in the library imports a task: evaluating a model on other prompts reports only the metrics that apply
to any prompt (reward-model score, KL, length, stops, win rates by a reward model or a judge).
"""
