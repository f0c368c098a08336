"""docs/quickstart-real-model.md, run: every command of its `bash` blocks, in order, through the real `rlhf-kit`
command, on tiny stand-ins for the Hub model, the user's data and the Hub.

What changes in a command is in the two tables below and nothing else: STAND_INS swaps a name the doc uses for the
stand-in's, SHORT_RUN appends test-only settings to a command (a 2-step run of each stage on a CPU). The stand-in
"Hub model" is the tiny base with Llama 3.1's real tokenizer specials and chat template (as TRL ships it), saved to
a directory; the user's data is a few rows in the doc's formats; the Hub is tests/hub_server.py, reached through
HF_ENDPOINT; every other command runs with HF_HUB_OFFLINE=1.
"""

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from conftest import REPO
from hub_server import HubServer
from rlhf_kit.data.chat_template import RENDERED, assistant_mask_source
from test_chat_template import family_model

DOC = REPO / "docs" / "quickstart-real-model.md"
TOKEN = "hf_quickstartToken"

# A name in the doc's commands -> what the test puts in its place ({model}: the tiny Llama-3.1-shaped model's path).
STAND_INS = {
    "meta-llama/Llama-3.1-8B": "{model}",
    "your-name/llama-8b-rlhf": "tester/llama-8b-rlhf",  # the fake Hub's user is "tester"
}
# Appended to a command that starts so: a short run on tiny data. bf16 / 4-bit need a GPU; the stages' evaluation and
# checkpoints are left out for time. --allow_weak_reward_model: a reward model trained for 2 steps on 8 pairs does
# not pass PPO's accuracy gate, and is not meant to.
_QUICK = "--max_steps 2 --bf16 false --load_in_4bit false --eval_strategy no --save_strategy no --report_to none"
SHORT_RUN = {
    "rlhf-kit train sft": f"{_QUICK} --max_length 128 --per_device_train_batch_size 4 --gradient_accumulation_steps 1",
    "rlhf-kit train reward": f"{_QUICK} --max_length 128 --per_device_train_batch_size 4 "
                             "--gradient_accumulation_steps 1 --reference_pairs 4",
    "rlhf-kit train ppo": "--total_episodes 8 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 "
                          "--num_mini_batches 1 --rollout_forward_batch_size 4 --response_length 8 --bf16 false "
                          "--eval_on_start false --eval_strategy no --save_strategy no --report_to none "
                          "--allow_weak_reward_model true",
    "rlhf-kit eval": "--num_prompts 2 --max_new_tokens 4",
    "rlhf-kit chat": "--max_new_tokens 4",
    "rlhf-kit export": "--gguf_types f16",
}
# The rows the doc shows, as the user's files (train and test), a few of each.
ITEMS = ["tea", "lamp", "guitar", "car", "tent", "jacket", "museum", "hotel"]


def doc_commands() -> list[str]:
    """The command lines of every ```bash block, in order (one command a line; comments and blank lines skipped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def stand_in(command: str, model: str) -> str:
    for name, replacement in STAND_INS.items():
        command = command.replace(name, replacement.format(model=model))
    for prefix, extra in SHORT_RUN.items():
        if command.startswith(prefix):
            command = f"{command} {extra}"
    return command


def write_user_data(root):
    def write(name, rows):
        (root / name).mkdir(parents=True)
        for split, part in (("train", rows), ("test", rows[:4])):
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

    write("sft", [{"conversations": [{"from": "system", "value": "Be brief."},
                                     {"from": "human", "value": f"Review the {item}."},
                                     {"from": "gpt", "value": f"The {item} is great."}]} for item in ITEMS])
    write("preference", [{"prompt": f"Review the {item}.",
                          "chosen": [{"role": "user", "content": f"Review the {item}."},
                                     {"role": "assistant", "content": f"The {item} is great."}],
                          "rejected": [{"role": "user", "content": f"Review the {item}."},
                                       {"role": "assistant", "content": f"The {item} is awful."}]} for item in ITEMS])
    write("prompts", [{"prompt": [{"role": "user", "content": f"Review the {item}."}]} for item in ITEMS])


def plan_table() -> dict[str, tuple[str, str]]:
    """The doc's GPU table: config -> (peak, with slack), as printed."""
    rows = re.findall(r"^\| [^|]+ \| `([a-z]+/llama-8b-[a-z]+\.yaml)` \| ([\d.]+) GiB \| ([\d.]+) GiB \|", DOC.read_text(),
                      flags=re.M)
    return {f"recipes/configs/{config}": (peak, slack) for config, peak, slack in rows}


IN_PROCESS = ("rlhf-kit plan ", "rlhf-kit init", "rlhf-kit eval ", "rlhf-kit chat ", "rlhf-kit export ")


def run_in_process(run: str, work, monkeypatch) -> subprocess.CompletedProcess:
    """`rlhf-kit ...` through the CLI's own entry point, in `work`, its stdout captured as a subprocess's would be."""
    from rlhf_kit import cli

    out = io.StringIO()
    with monkeypatch.context() as m:
        m.chdir(work)
        m.setattr(sys, "stdin", io.StringIO("Review the tea.\n"))
        with contextlib.redirect_stdout(out):
            code = cli.main(shlex.split(run)[1:])
    return subprocess.CompletedProcess(run, code or 0, out.getvalue(), "")


@pytest.mark.slow
def test_the_doc_runs_on_tiny_stand_ins(tiny_base, tmp_path, monkeypatch):
    """The commands run as a user types them. Those that only read and write files in this process's way (plan,
    init, eval, chat, export) run through `rlhf_kit.cli.main` in-process, which skips a torch import each; `train`
    (it launches accelerate), `hf` and `push` (they talk to the fake Hub) each run in their own process."""
    model = family_model(tiny_base, "llama3.1", tmp_path / "hub-model")
    # What the doc says of Llama 3.1's template: no {% generation %} markers, so SFT finds the turns by rendering.
    assert assistant_mask_source(AutoTokenizer.from_pretrained(model)) == RENDERED
    work = tmp_path / "my-assistant"
    work.mkdir()
    write_user_data(work / "my-data")
    commands = doc_commands()
    assert commands[0] == "rlhf-kit init" and any(c.startswith("rlhf-kit push") for c in commands)
    base_env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf-home"),
                "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                # Merged adapters: the same cache for the processes and the in-process commands.
                "RLHF_KIT_CACHE": str(tmp_path / "hf-home")}
    base_env.pop("HF_TOKEN", None)
    plans = plan_table()
    assert len(plans) == 3
    with HubServer(token=TOKEN, lifetime=600) as hub:
        online = {**base_env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
        for command in commands:
            run = stand_in(command, model)
            uses_hub = run.startswith(("hf ", "rlhf-kit push"))
            env = dict(online if uses_hub else base_env)
            if not run.startswith("hf auth login"):
                env.pop("HF_TOKEN", None)  # after the login, the token comes from where it stored it
            if run.startswith(IN_PROCESS):
                monkeypatch.setenv("RLHF_KIT_CACHE", env["RLHF_KIT_CACHE"])
                done = run_in_process(run, work, monkeypatch)
            else:
                done = subprocess.run(["bash", "-c", run], cwd=work, env=env, capture_output=True, text=True,
                                      input="Review the tea.\n" if run.startswith("rlhf-kit chat") else "")
            assert done.returncode == 0, f"{run}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
            if command in plans:  # the doc's numbers are the command's
                peak, slack = plans[command]
                assert f"peak             {peak} GiB  (+ context and slack: {slack} GiB)" in done.stdout, done.stdout

        # Each step wrote what the next one reads, and the push uploaded the export.
        outputs = work / "outputs"
        for stage in ("sft", "reward", "ppo"):
            record = json.loads((outputs / f"llama-8b-{stage}" / "rlhf_kit_stage.json").read_text())
            assert record["stage"] == stage
        assert json.loads((outputs / "llama-8b-ppo" / "rlhf_kit_stage.json").read_text())["parent"]["stage"] == "sft"
        assert set(json.loads((outputs / "llama-8b-eval.json").read_text())) == {"llama-8b-ppo", "llama-8b-sft"}
        export = outputs / "llama-8b-ppo-export"
        uploaded = hub.files("tester/llama-8b-rlhf")
        assert "README.md" in uploaded and hub.repos["tester/llama-8b-rlhf"]["private"]
        assert {p for p in uploaded if p != ".gitattributes"} <= {
            str(p.relative_to(export)) for p in export.rglob("*") if p.is_file()}
        assert TOKEN.encode() not in b"".join(uploaded.values())
