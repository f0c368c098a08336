"""Loading the evaluation task a config or command names (`task: rlhf_kit.tasks.review`) by its import path.

Apart from `evaluation`, which imports torch and the models, so that a misspelt task fails in a fraction of a second,
before anything heavy loads; and by name only, so the library never imports a shipped task itself.
"""

import importlib


def load_task(name: str | None):
    """The task module `name` names (see `rlhf_kit.tasks`), checked for what evaluation calls; None for none."""
    if not name:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"task '{name}' cannot be imported ({e}); a task is a module path, such as "
                         "rlhf_kit.tasks.review") from None
    missing = [f for f in ("metrics", "gold_score") if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"task module '{name}' has no {' or '.join(missing)} function; a task provides "
                         "metrics(prompts, responses) and gold_score(prompt, response) (see rlhf_kit.tasks)")
    return module
