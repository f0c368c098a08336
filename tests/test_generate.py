"""`rlhf-kit generate` and `rlhf_kit.inference.batch`: a resumed file equals an uninterrupted one (cut mid-line, or a
killed process), the vote's tie-break, best-of-N selection and its recorded scores, raw few-shot prompting stopped
by a stop string, one-line errors before any model loads, and the same responses as `evaluate_policy`."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from conftest import REPO, read_jsonl, write_jsonl

from rlhf_kit.cli import main as cli
from rlhf_kit.data.loading import load_data
from rlhf_kit.errors import DEBUG_ENV
from rlhf_kit.inference.batch import RAW_STOP, generate_file, generate_responses, make_job
from rlhf_kit.inference.best_of_n import best_of_n
from rlhf_kit.inference.evaluation import evaluate_policy
from rlhf_kit.inference.generation import generate, load_policy
from rlhf_kit.rewards import RewardSources, load_reward_functions

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = load_data(REPO / "data/prompts", kind="prompt", split="test")  # conversational, with an `item` column


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")  # a user error is its one line (see test_user_errors.py)


def test_a_file_cut_mid_line_resumes_to_the_uninterrupted_file(tiny_sft, tmp_path):
    policy = load_policy(tiny_sft)
    prompts = PROMPTS.select(range(10))
    settings = dict(n=2, batch_size=4, max_new_tokens=12, seed=5, progress=False)  # chunks of 2 prompts
    whole = tmp_path / "whole.jsonl"
    summary = generate_file(policy, prompts, whole, **settings)
    assert summary["rows"] == summary["new_rows"] == 10 and summary["tokens"] > 0
    data = whole.read_text()
    rows = [json.loads(line) for line in data.splitlines()]
    assert [r["prompt"] for r in rows] == prompts["prompt"] and all(len(r["responses"]) == 2 for r in rows)

    # Interrupted inside chunk 3: rows 0-4 complete, row 5 half written.
    cut = tmp_path / "cut.jsonl"
    lines = data.splitlines(keepends=True)
    cut.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    (tmp_path / "cut.jsonl.meta.json").write_text((tmp_path / "whole.jsonl.meta.json").read_text())
    resumed = generate_file(policy, prompts, cut, **settings)
    assert resumed["new_rows"] == 5 and cut.read_text() == data
    assert generate_file(policy, prompts, cut, **settings)["new_rows"] == 0 and cut.read_text() == data

    # A file written from other settings or other prompts is refused, saying what differs, and left as it is.
    with pytest.raises(ValueError, match="sampling.temperature was 1.0, now 0.7"):
        generate_file(policy, prompts, cut, **{**settings, "temperature": 0.7})
    with pytest.raises(ValueError, match="prompts was 10, now 9"):
        generate_file(policy, prompts.select(range(9)), cut, **settings)
    stray = tmp_path / "stray.jsonl"
    stray.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="no stray.jsonl.meta.json"):
        generate_file(policy, prompts, stray, **settings)
    assert cut.read_text() == data


SLOW_REWARD = '''
import time

def slow_length(prompts, completions, **kwargs):
    time.sleep(0.3)  # keeps the run going long enough to be killed between chunks
    return [float(len(str(c))) for c in completions]
'''


def test_a_killed_command_resumes_to_the_uninterrupted_file(tiny_sft, tmp_path, monkeypatch):
    (tmp_path / "slow_reward.py").write_text(SLOW_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS["prompt"][:12]])
    args = ["generate", tiny_sft, "--prompts", prompts, "--n", "2", "--batch_size", "4", "--max_new_tokens", "12",
            "--select", "reward", "--reward_funcs", "slow_reward:slow_length"]
    assert cli([*args, "--output", str(tmp_path / "whole.jsonl")]) == 0

    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.Popen([sys.executable, "-m", "rlhf_kit.cli", *args, "--output", str(out)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out.is_file() and out.read_bytes().count(b"\n")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    written = out.read_bytes().count(b"\n")
    assert 0 < written < 12, f"killed after {written} rows: expected within the run"  # 6 chunks of 2 prompts
    assert cli([*args, "--output", str(out)]) == 0
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_vote_counts_answers_and_breaks_ties_by_the_first_sample(tiny_sft):
    policy = load_policy(tiny_sft)
    prompts = PROMPTS["prompt"][:16]
    # The answer is the first adjective: "The tea is great and ..." -> "great"; 4 samples often split 2-2 or 1-1-1-1.
    settings = dict(n=4, select="vote", answer_pattern=r"is (\w+)", max_new_tokens=12, temperature=1.5)
    rows = generate_responses(policy, prompts, **settings)
    ties = 0
    for row in rows:
        answers = row["answers"]
        assert row["votes"] == dict(Counter(a for a in answers if a is not None))
        assert list(row["votes"]) == list(dict.fromkeys(a for a in answers if a is not None))  # order of sampling
        top = max(row["votes"].values())
        tied = [a for a in row["votes"] if row["votes"][a] == top]
        assert row["answer"] == tied[0] and row["selected"] == answers.index(tied[0])
        assert row["response"] == row["responses"][row["selected"]]
        ties += len(tied) > 1 and answers[0] != tied[0]  # a tie the first sample itself did not win
    assert ties >= 1, rows  # the tie-break was exercised beyond "take the first sample"
    assert generate_responses(policy, prompts, **settings) == rows  # the same seed, the same choice

    with pytest.raises(ValueError, match="select vote needs n >= 2"):
        make_job(n=1, select="vote")


def test_select_reward_keeps_the_best_weighted_score_and_records_every_score(tiny_sft, tiny_reward):
    policy = load_policy(tiny_sft)
    prompts = PROMPTS.select(range(8))
    rows = generate_responses(policy, prompts, n=4, select="reward", reward_model=tiny_reward,
                              reward_funcs=["rlhf_kit.tasks.review:gold"], reward_weights=[1.0, 0.5],
                              max_new_tokens=12)
    for row in rows:
        rm, gold = row["rewards"]["reward_model"], row["rewards"]["gold"]
        assert row["scores"] == pytest.approx([a + 0.5 * b for a, b in zip(rm, gold)], abs=1e-5)
        assert row["selected"] == row["scores"].index(max(row["scores"]))
        assert row["response"] == row["responses"][row["selected"]]
    assert len({r["selected"] for r in rows}) > 1  # not always the first sample

    # Best-of-N at inference is the best-of-N of rlhf_kit.inference.best_of_n: the same samples, the same scores.
    funcs, weights, _ = load_reward_functions(RewardSources(reward_model_path=tiny_reward,
                                                            reward_funcs=["rlhf_kit.tasks.review:gold"]),
                                              policy.tokenizer, weights=[1.0, 0.5])
    picks = best_of_n(policy, prompts["prompt"], n=4, reward_funcs=funcs, weights=weights,
                      columns={"item": prompts["item"]}, max_new_tokens=12, batch_size=32)
    assert [p.completions for p in picks] == [r["responses"] for r in rows]
    assert [p.best for p in picks] == [r["selected"] for r in rows]


def test_raw_few_shot_prompting_stops_at_the_stop_string(tiny_base, tmp_path):
    """The base model continues a document of examples; the response ends where "." first appears, cut off it."""
    policy = load_policy(tiny_base)
    shots = write_jsonl(tmp_path / "shots.jsonl", [{"prompt": "Review the tea.", "completion": "The tea is great."},
                                                   {"prompt": "Review the sofa.", "completion": "The sofa is cozy."}])
    prompts = [f"Review the {item}." for item in ("coffee", "book", "phone", "park", "cake", "lamp")]
    settings = dict(raw=True, few_shot=shots, n=2, max_new_tokens=24)
    stopped = generate_responses(policy, prompts, stop=["."], **settings)
    running = generate_responses(policy, prompts, stop=["<never>"], **settings)
    cut = 0
    for short, long in zip(stopped, running):
        for a, b in zip(short["responses"], long["responses"]):
            assert "." not in a
            if "." in b:  # the same sample up to the stop string, nothing after it
                assert a == b[: b.index(".")].strip()
                cut += 1
    assert cut >= 6, (stopped, running)

    # And generation itself ended there: no token was generated after the one that completed the stop string.
    job = make_job(stop=["."], **settings)
    gens = generate(policy, prompts, sampling=job.sampling, prompting=job.prompting, progress=False)
    decode = lambda ids: policy.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    tokens = [[t for t in ids if t != policy.tokenizer.pad_token_id] for ids in gens.response_ids]
    assert all("." not in decode(ids[:-1]) for ids in tokens)
    assert sum("." in decode(ids) for ids in tokens) == cut
    assert [r["responses"] for r in stopped] == gens.grouped()
    assert make_job(raw=True).sampling.stop == RAW_STOP and make_job(raw=True, stop=["Q:"]).sampling.stop == ("Q:",)


def test_generate_samples_as_evaluate_policy_does(tiny_sft, tmp_path):
    """With n = 1 and select first, each chunk of prompts gets the responses `evaluate_policy` samples with the
    chunk's seed; one chunk is the whole evaluation, so `rlhf-kit eval` numbers stay what they were."""
    policy = load_policy(tiny_sft)
    prompts = PROMPTS["prompt"][:10]
    evaluated = evaluate_policy(policy, prompts, max_new_tokens=16, temperature=1.0, seed=3).responses
    rows = generate_responses(policy, prompts, max_new_tokens=16, seed=3)
    assert [r["response"] for r in rows] == evaluated and "responses" not in rows[0]
    chunked = generate_responses(policy, prompts, max_new_tokens=16, seed=3, batch_size=4)
    per_chunk = [evaluate_policy(policy, prompts[start : start + 4], max_new_tokens=16, seed=3 + start).responses
                 for start in range(0, 10, 4)]
    assert [r["response"] for r in chunked] == [response for chunk in per_chunk for response in chunk]

    out = tmp_path / "out.jsonl"
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    assert cli(["generate", tiny_sft, "--prompts", data, "--output", str(out), "--max_new_tokens", "16",
                "--seed", "3"]) == 0
    assert [json.loads(line)["response"] for line in out.read_text().splitlines()] == evaluated


@dataclass
class OnlyToken:
    """A stand-in for `constraints.Constraint`: every sampled token is `token` (a fresh processor per call)."""

    token: int

    def logits_processor(self, policy):
        def only(input_ids, scores):
            allowed = torch.full_like(scores, float("-inf"))
            allowed[:, self.token] = 0.0
            return allowed

        return lambda: [only]


def test_a_constraint_shapes_every_sample_and_is_part_of_the_recorded_settings(tiny_sft, tmp_path):
    policy = load_policy(tiny_sft)
    eos = policy.tokenizer.eos_token_id
    out = tmp_path / "out.jsonl"
    generate_file(policy, PROMPTS.select(range(3)), out, n=2, max_new_tokens=8, constraint=OnlyToken(eos),
                  progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["responses"] for r in rows] == [["", ""]] * 3  # the stop token at once, for both samples
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["constraint"] == f"OnlyToken(token={eos})"
    with pytest.raises(ValueError, match="constraint was"):
        generate_file(policy, PROMPTS.select(range(3)), out, n=2, max_new_tokens=8, constraint=OnlyToken(eos + 1))


@pytest.mark.parametrize("flags,message", [
    (["--prompt_template", "{tpl}"], "prompt template file {tpl}: "),
    (["--few_shot", "{shots}"], "{shots}: row 2: field 'completion'"),
    (["--n", "4", "--select", "vote", "--answer_pattern", "is (\\w+"], "answer pattern 'is (\\\\w+' is not a valid"),
    (["--answer_pattern", "is (\\w+)", "--n", "4"], "an answer pattern is only used with select vote"),
    (["--select", "vote"], "select vote needs n >= 2"),
    (["--select", "reward", "--n", "4"], "select reward needs a reward source"),
    (["--select", "reward", "--reward_funcs", "no_such_module:f"], "cannot import module 'no_such_module'"),
    (["--n", "0"], "n (samples per prompt) must be >= 1"),
    (["--n", "4", "--temperature", "0"], "greedy samples would all be the same"),
    (["--prompts", "{tpl}"], "{tpl}"),
    (["--regex", "The (coffee"], "regex 'The (coffee' cannot constrain generation"),
    (["--reflect", "1", "--reflect_min_score", "0.5"], "it needs select reward and reflect >= 1"),
    (["--reflect", "1", "--raw"], "cannot be asked about its answer"),
], ids=["template", "few-shot row", "pattern", "pattern without vote", "vote of one", "reward without source",
        "reward function", "n", "greedy n", "prompts", "regex", "reflect score without reward", "reflect raw"])
def test_a_bad_flag_or_file_is_one_line_before_any_model_loads(flags, message, tmp_path, capsys):
    tpl = tmp_path / "template.txt"
    tpl.write_text("Answer this: {question}\n")
    shots = write_jsonl(tmp_path / "shots.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Review the tea."}])
    fill = lambda s: s.format(tpl=tpl, shots=shots)  # noqa: E731
    # An empty directory, no model: an error about loading it would mean the flags were checked only after loading.
    (tmp_path / "empty-model").mkdir()
    argv = ["generate", str(tmp_path / "empty-model"), "--prompts", prompts, "--output", str(tmp_path / "o.jsonl"),
            *map(fill, flags)]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("rlhf-kit generate: ") and fill(message) in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_the_command_constrains_every_sample_to_a_regex(tiny_base, tmp_path):
    """`--regex` on the barely trained base model: every one of n samples per prompt has the review's shape."""
    import re

    from rlhf_kit.tasks.review import ANSWER_REGEX, has_review_shape

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review the {item}."} for item in
                                                         ("tea", "coffee", "hat")])
    out = tmp_path / "out.jsonl"
    assert cli(["generate", tiny_base, "--prompts", prompts, "--output", str(out), "--n", "3", "--regex",
                ANSWER_REGEX, "--max_new_tokens", "32"]) == 0
    samples = [r for row in read_jsonl(out) for r in row["responses"]]
    assert len(samples) == 9 and all(re.fullmatch(ANSWER_REGEX, r) and has_review_shape(r) for r in samples)


def test_reflection_by_reward_score_retries_rejected_answers_and_keeps_the_transcript(tiny_sft):
    """--reflect 2 --reflect_min_score 0.5 with the gold annotator as the reward: a kept response scoring below 0.5 is
    drawn again (up to twice); the transcript holds every kept response with its score and verdict."""
    from rlhf_kit.tasks.review import gold_score

    policy, prompts = load_policy(tiny_sft), PROMPTS.select(range(16))
    settings = dict(n=2, select="reward", reward_funcs=["rlhf_kit.tasks.review:gold"], max_new_tokens=12)
    plain = generate_responses(policy, prompts, **settings)
    rows = generate_responses(policy, prompts, **settings, reflect=2, reflect_min_score=0.5)
    for before, row in zip(plain, rows):
        steps = row["reflection"]
        assert steps[0]["response"] == before["response"]  # the first draw is the run without reflection
        assert steps[-1]["response"] == row["response"] and 1 <= len(steps) <= 3
        assert [s["verdict"] for s in steps[:-1]] == ["no"] * (len(steps) - 1)
        assert steps[-1]["verdict"] == "yes" or len(steps) == 3
        for step in steps:
            assert step["score"] == pytest.approx(gold_score(row["prompt"], step["response"]))
            assert step["verdict"] == ("yes" if step["score"] >= 0.5 else "no")
    passing = lambda rs: sum(gold_score(r["prompt"], r["response"]) >= 0.5 for r in rs)  # noqa: E731
    assert any(len(r["reflection"]) > 1 and r["reflection"][-1]["verdict"] == "yes" for r in rows)
    assert passing(rows) > passing(plain)


def test_reflection_by_the_model_asks_it_and_holds_its_reply_to_yes_or_no(tiny_sft, tmp_path):
    """The model judges its own answer: its greedy reply is held to yes/no; a no is followed by one more draw."""
    out = tmp_path / "out.jsonl"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review the {item}."} for item in
                                                         ("tea", "coffee", "hat", "park")])
    assert cli(["generate", tiny_sft, "--prompts", prompts, "--output", str(out), "--reflect", "1",
                "--max_new_tokens", "16"]) == 0
    rows = read_jsonl(out)
    for row in rows:
        verdicts = [s["verdict"] for s in row["reflection"]]
        assert set(verdicts) <= {"yes", "no"} and verdicts[0] in ("yes", "no")
        assert len(verdicts) == (1 if verdicts[0] == "yes" else 2)
        assert row["response"] == row["reflection"][-1]["response"]
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["reflection"] == {"rounds": 1,
                                                                                        "min_score": None}
