"""`rlhf-kit eval` and the report's evaluation on any prompts: the task's columns only when a task is named."""

import json

import pytest

from rlhf_kit.cli import main as cli
from rlhf_kit.inference.task_loading import load_task

OWN_PROMPTS = ["Summarize the meeting in one line.", "Name a colour.", "What is two plus two?", "Say hello.",
               "Give me a word that rhymes with cat.", "Suggest a name for a dog."]


def test_eval_on_a_users_own_prompts_reports_reward_kl_length_and_win_rates(tiny_sft, tiny_reward, tiny_base,
                                                                            tmp_path, single_thread):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in OWN_PROMPTS))
    out = tmp_path / "metrics.json"
    assert cli(["eval", tiny_sft, "--prompts", str(prompts), "--reward_model", tiny_reward, "--reference", tiny_sft,
                "--against", tiny_base, "--judge", "test_evaluation:longer", "--max_new_tokens", "8",
                "--output", str(out)]) == 0
    ours = json.loads(out.read_text())[tiny_sft.rstrip("/").split("/")[-1]]
    assert {"reward_model_score", "kl_to_reference", "response_tokens", "stop_rate", "rm_win_rate",
            "judge_win_rate"} <= set(ours)
    assert ours["kl_to_reference"] == 0.0 and 0.0 <= ours["rm_win_rate"] <= 1.0
    assert not {"gold_score", "shape_rate", "format_rate", "gold_win_rate"} & set(ours)  # no task was named


def longer(prompts, completions, **columns):
    """A judge for the test: the longer answer wins."""
    return [float(len(c)) for c in completions]


def test_a_named_task_adds_its_columns_and_a_bad_one_fails_first(tiny_sft, tmp_path, single_thread):
    out = tmp_path / "metrics.json"
    assert cli(["eval", tiny_sft, "--task", "rlhf_kit.tasks.review", "--num_prompts", "4", "--max_new_tokens", "8",
                "--output", str(out)]) == 0
    assert {"gold_score", "shape_rate", "format_rate"} <= set(next(iter(json.loads(out.read_text()).values())))
    with pytest.raises(ValueError, match="task 'rlhf_kit.tasks.reviews' cannot be imported"):
        load_task("rlhf_kit.tasks.reviews")
    with pytest.raises(ValueError, match="has no metrics or gold_score function"):
        load_task("json")


def test_chat_and_eval_say_where_an_adapters_merged_copy_goes(sft_straight, tiny_sft, tmp_path, monkeypatch, capsys,
                                                              single_thread):
    """Generating from an adapter merges it into its base on disk (16 GB at 8B): both commands say where and how big
    (issue 16, item 10); a full model writes nothing, so nothing is said."""
    from rlhf_kit.inference.chat import chat

    cache = tmp_path / "cache"
    monkeypatch.setenv("RLHF_KIT_CACHE", str(cache))
    written = []
    chat(str(sft_straight), lines=["Say hello."], write=written.append, max_new_tokens=2, temperature=0)
    merged = next(cache.rglob("config.json")).parent
    size = sum(f.stat().st_size for f in merged.rglob("*") if f.is_file()) / 1e9
    assert f"the merged model ({size:.2f} GB) is cached at {merged}" in written[0]

    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "Say hello."}]}) + "\n")
    capsys.readouterr()
    assert cli(["eval", str(sft_straight), "--prompts", str(prompts), "--against", tiny_sft,
                "--max_new_tokens", "2"]) == 0
    said = capsys.readouterr().err
    assert f"is cached at {merged}" in said and said.count("is cached at") == 1  # the full model: nothing to say


def test_standard_errors_and_paired_differences():
    from rlhf_kit.inference.evaluation import EvalResult, paired_difference, standard_error

    assert standard_error([1.0]) == 0.0
    assert standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx((1 / 3) ** 0.5 / 2)  # std (n-1) 0.577 / sqrt(4)
    a = EvalResult("a", {"gold": 0.5}, per_prompt={"gold": [1.0, 0.0, 1.0, 0.0]})
    b = EvalResult("b", {"gold": 0.25}, per_prompt={"gold": [1.0, 0.0, 0.0, 0.0]})
    assert a.metrics["gold_se"] == pytest.approx(standard_error([1.0, 0.0, 1.0, 0.0]))
    assert paired_difference(a, b, "gold") == pytest.approx((0.25, standard_error([0.0, 0.0, 1.0, 0.0])))


def test_a_task_column_only_some_prompts_have_gets_no_per_prompt_values():
    """Exact match by kind of question exists only for the prompts of that kind: the per-prompt columns (for standard
    errors and paired gains) are those every prompt has."""
    from types import SimpleNamespace

    from rlhf_kit.inference.evaluation import task_per_prompt

    def metrics(prompts, responses):
        right = [float(p == r) for p, r in zip(prompts, responses)]
        by_kind = {f"exact_match_{p[0]}": [x for x, q in zip(right, prompts) if q[0] == p[0]] for p in prompts}
        return {"exact_match": sum(right) / len(right), **{k: sum(v) / len(v) for k, v in by_kind.items()}}

    per_prompt = task_per_prompt(SimpleNamespace(metrics=metrics), ["a1", "b2", "a3"], ["a1", "x", "a3"])
    assert per_prompt == {"exact_match": [1.0, 0.0, 1.0]}
