"""Scale-out: every shipped accelerate profile dry-runs its documented launch line; SFT, reward and PPO really run as
2 processes (CPU, gloo) and agree with 1 process on the same global batch; PPO also runs, agrees and resumes exactly
sharded by FSDP2, and DPO, GRPO and RLOO run under the same FSDP2 profile."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from ppo_update_worker import update_once
from safetensors.torch import load_file

from rlhf_kit.config import ConfigError, parse_config
from rlhf_kit.stages import recipe_arguments
from rlhf_kit.training.distributed import accumulation_steps, apply_global_batch_size, end_processes
from rlhf_kit.training.sft import SFTArguments

PROFILES = [REPO / "accelerate_config.yaml", *sorted((REPO / "accelerate_configs").glob("*.yaml"))]
# Values for the placeholders of the multi-node launch line.
PLACEHOLDERS = {"$NODE_RANK": "1", "$HEAD_IP": "10.1.2.3"}
TWO_PROCESSES = REPO / "accelerate_configs/cpu_ddp.yaml"
FSDP2 = REPO / "accelerate_configs/cpu_fsdp2.yaml"

# ------------------------------------------------------------------------------------------------ global batch size


def test_accumulation_from_global_batch():
    assert accumulation_steps(64, per_device_batch_size=4, processes=8) == 2
    assert accumulation_steps(64, per_device_batch_size=4, processes=1) == 16
    assert accumulation_steps(32, per_device_batch_size=4, processes=2, mini_batches=2) == 2  # PPO: 32 prompts/update
    with pytest.raises(ConfigError, match=r"not divisible by per_device_train_batch_size \(4\) x processes \(8\) = 32"):
        accumulation_steps(48, per_device_batch_size=4, processes=8)
    with pytest.raises(ConfigError, match="x num_mini_batches"):
        accumulation_steps(8, per_device_batch_size=4, processes=1, mini_batches=4)


def test_global_batch_size_sets_accumulation_and_refuses_a_contradiction(tmp_path):
    def parse(*cli):
        (args,) = parse_config(SFTArguments, args=["--output_dir", str(tmp_path), "--report_to", "none", *cli])
        apply_global_batch_size(args)
        return args

    assert parse("--per_device_train_batch_size", "4", "--global_batch_size", "32").gradient_accumulation_steps == 8
    assert parse("--gradient_accumulation_steps", "3").gradient_accumulation_steps == 3  # unset: untouched
    # A saved config holds both keys: it reruns while they agree, and says what to do when they do not.
    assert parse("--per_device_train_batch_size", "4", "--global_batch_size", "32",
                 "--gradient_accumulation_steps", "8").gradient_accumulation_steps == 8
    with pytest.raises(ConfigError, match="means gradient_accumulation_steps 8, but it is set to 2"):
        parse("--per_device_train_batch_size", "4", "--global_batch_size", "32", "--gradient_accumulation_steps", "2")


def test_processes_that_would_each_train_alone_are_refused(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; transformers saw a single process
    with pytest.raises(ConfigError, match="started 2 processes, but each was set up to train alone.*ACCELERATE_USE_CPU"):
        apply_global_batch_size(SimpleNamespace(world_size=1, global_batch_size=None))
    apply_global_batch_size(SimpleNamespace(world_size=2, global_batch_size=None))


def test_a_launched_recipe_tears_its_process_group_down(tmp_path):
    """Each launched recipe runs main through run_main (a user error: its message, no traceback) and ends with
    end_processes: a gloo group left alive at exit can abort the interpreter's
    finalization (SIGABRT, seen on CI in a finished FSDP2 GRPO run), so the group is destroyed after a barrier."""
    import ast

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    end_processes()
    assert not dist.is_initialized()
    end_processes()  # a single process without a group: nothing to do
    for recipe in sorted((REPO / "recipes").glob("*.py")):
        if recipe.stem == "export":
            continue  # converts files in one process: no group to tear down
        guard = [node for node in ast.parse(recipe.read_text()).body
                 if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        calls = [ast.unparse(statement) for statement in guard[0].body]
        assert calls == ["run_main(main)", "end_processes()"], recipe.name


def test_end_processes_keeps_what_its_barrier_holds_from_the_gloo_worker_threads():
    """The barrier's work holds the collectives still in flight when it was issued. Freed by a gloo worker thread
    after the interpreter began finalizing, their tensors aborted finished runs (SIGABRT, about 1 launch in 60 of
    the FSDP2 PPO resume test, 3 in 13 under load; the core dumps showed that path), so end_processes keeps it.
    Before, the output below was freed at once."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests/end_processes_worker.py")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: in-flight output alive after end_processes: True" in done.stdout, done.stdout + done.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ profiles


def launch_argv(profile):
    """The `accelerate launch` arguments of the launch line documented in the profile's header comment."""
    lines = [line[1:].strip() for line in profile.read_text().splitlines()
             if line.startswith("#") and "accelerate launch" in line]
    assert len(lines) == 1, f"{profile.name} must document exactly one launch line, found {len(lines)}"
    words = shlex.split(lines[0])
    return [PLACEHOLDERS.get(w, w) for w in words[words.index("launch") + 1:]]


def dry_run(argv):
    """Everything `accelerate launch` does short of starting processes: parse the command line, merge the config
    file, build the environment the processes would get and torchrun's launch config.

    Returns (launch args, config file, environment, torchrun config or None for the single-process launcher). It
    follows `accelerate.commands.launch.launch_command` of accelerate 1.15, and uses its private
    `_validate_launch_command`; adjust here if a later accelerate moves it.
    """
    import torch.distributed.run as torchrun
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as launching

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if not (args.use_deepspeed or args.use_fsdp or args.multi_gpu):
        _, env = launching.prepare_simple_launcher_cmd_env(args)
        return args, defaults, env, None
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        cmd, env = launching.prepare_deepspeed_cmd_env(args)
        assert cmd is None, "a pdsh multi-node DeepSpeed launch would shell out to `deepspeed`"
    else:
        env = launching.prepare_multi_gpu_env(args)
    torchrun_args = launching._filter_args(args, torchrun.get_args_parser(), [
        "--training_script", args.training_script, "--training_script_args", args.training_script_args])
    config, _, _ = torchrun.config_from_args(torchrun_args)
    return args, defaults, env, config


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_launch_line_dry_runs(profile):
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, patch_environment

    raw = yaml.safe_load(profile.read_text())
    # accelerate rejects unknown top-level keys but copies nested ones onto the launch arguments unchecked.
    options = {a.dest for a in launch_command_parser()._actions}
    for section in ("deepspeed_config", "fsdp_config"):
        unknown = set(raw.get(section, {})) - options
        assert not unknown, f"{profile.name}: {section} keys accelerate does not know: {unknown}"

    args, config_file, env, torchrun_config = dry_run(launch_argv(profile))
    # The recipe and its config named in the launch line exist and parse (use_cpu: bf16 configs on a CPU machine).
    assert (REPO / args.training_script).is_file()
    parse_config(*recipe_arguments(Path(args.training_script).stem), args=args.training_script_args,
                 overrides={"use_cpu": True})

    name = profile.stem
    if torchrun_config is None:
        assert name == "accelerate_config" and config_file.num_processes == 1
        return
    processes = torchrun_config.nproc_per_node * torchrun_config.max_nodes
    assert processes == (2 if name.startswith("cpu_") else 16 if name == "multi_node" else 8), name
    ds_env = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    if name.startswith("zero"):
        with patch_environment(**ds_env):
            zero = DeepSpeedPlugin().deepspeed_config["zero_optimization"]
        assert zero["stage"] == int(name[4])
        assert zero["offload_optimizer"]["device"] == ("cpu" if name.endswith("offload") else "none")
        assert zero["offload_param"]["device"] == ("cpu" if name == "zero3_offload" else "none")
        # ZeRO-3 must gather the shards when saving, or the output directory holds no usable model or adapter.
        assert zero["stage3_gather_16bit_weights_on_model_save"] == (name.startswith("zero3"))
    elif name in ("fsdp2", "cpu_fsdp2"):
        with patch_environment(**ds_env):
            fsdp = FullyShardedDataParallelPlugin()
        assert fsdp.fsdp_version == 2 and fsdp.state_dict_type.name == "FULL_STATE_DICT"
        # PPO's LoRA critic needs the recipe's own checkpointing, which replays the adapter (see ppo_model.py).
        assert not fsdp.activation_checkpointing
        assert args.use_cpu == (name == "cpu_fsdp2")
    elif name == "multi_node":
        assert torchrun_config.rdzv_endpoint == "10.1.2.3:29500"
        assert torchrun_config.rdzv_configs["rank"] == 1
    elif name == "cpu_ddp":
        # MULTI_GPU + use_cpu: torchrun really starts 2 processes, which find no GPU and join with gloo.
        assert config_file.distributed_type.value == "MULTI_GPU" and args.use_cpu


# ------------------------------------------------------------------------------------------------ 2 processes

FAST = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--global_batch_size", "8", "--logging_steps", "1",
        "--eval_strategy", "no", "--save_strategy", "no", "--learning_rate", "3e-3", "--warmup_steps", "0",
        "--lr_scheduler_type", "constant", "--disable_tqdm", "true", "--report_to", "none", "--max_length", "64"]


def launch(processes, script, argv, timeout=300, profile=TWO_PROCESSES):
    """Run a script through `accelerate launch`: 1 process with the default profile, 2 on the CPU with gloo
    (data-parallel, or with `profile=FSDP2` sharded).

    The 1-process reference runs in its own process too, exactly as users launch it.
    """
    profile = REPO / "accelerate_config.yaml" if processes == 1 else profile
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(profile),
           "--main_process_port", "0", script, *argv]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def processes_used(output_dir, per_device=2, global_batch=8):
    """The process count the run saw: its saved config holds the accumulation derived from it."""
    saved = yaml.safe_load((output_dir / "rlhf_kit_config.yaml").read_text())
    return global_batch // (per_device * saved["gradient_accumulation_steps"])


def assert_same_adapter(one, two, atol):
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved <= atol, f"1 and 2 processes differ by up to {moved:.2e} in the adapter weights"


def train_loss(output_dir):
    return json.loads((output_dir / "rlhf_kit_stage.json").read_text())["metrics"]["train_loss"]


@pytest.fixture(scope="module")
def sft_pair(tiny_base, tmp_path_factory):
    """The same SFT run on 1 process (in this one) and on 2 (launched): 3 steps of 8 sequences each."""
    root = tmp_path_factory.mktemp("dist-sft")
    argv = ["--config", "recipes/configs/sft/tiny.yaml", "--model_name_or_path", tiny_base, *FAST]
    # 1 process: 2 sequences x 4 accumulated; 2 processes: 2 sequences x 2 accumulated x 2 processes.
    launch(1, "recipes/sft.py", [*argv, "--output_dir", str(root / "one")])
    launch(2, "recipes/sft.py", [*argv, "--output_dir", str(root / "two")])
    return root / "one", root / "two"


def test_sft_on_two_processes_matches_one(sft_pair):
    one, two = sft_pair
    assert (processes_used(one), processes_used(two)) == (1, 2)
    assert train_loss(two) == pytest.approx(train_loss(one), rel=1e-4)
    assert_same_adapter(one, two, atol=1e-4)


def test_reward_on_two_processes_matches_one(sft_pair, tmp_path):
    sft, _ = sft_pair
    argv = ["--config", "recipes/configs/reward/tiny.yaml", "--model_name_or_path", str(sft), *FAST,
            "--reference_pairs", "16", "--use_peft", "true"]
    launch(1, "recipes/reward.py", [*argv, "--output_dir", str(tmp_path / "one")])
    launch(2, "recipes/reward.py", [*argv, "--output_dir", str(tmp_path / "two")])
    assert (processes_used(tmp_path / "one"), processes_used(tmp_path / "two")) == (1, 2)
    assert train_loss(tmp_path / "two") == pytest.approx(train_loss(tmp_path / "one"), rel=1e-4)
    assert_same_adapter(tmp_path / "one", tmp_path / "two", atol=1e-4)


def test_ppo_recipe_runs_on_two_processes(sft_pair, tmp_path):
    """PPO's sampling differs with the process count, so the recipe run checks the shape of the run; the update
    itself is compared with one process in the next test."""
    sft, _ = sft_pair
    out = tmp_path / "ppo"
    launch(2, "recipes/ppo.py", [
        "--config", "recipes/configs/ppo/tiny.yaml", "--model_name_or_path", str(sft), "--reward_model_path", "",
        "--reward_funcs", "rlhf_kit.tasks.review:gold", "--dataset_test_split", "none",  # no held-out set: no final eval
        "--per_device_train_batch_size", "2",
        "--global_batch_size", "8", "--num_mini_batches", "2", "--response_length", "8", "--max_steps", "2",
        "--eval_on_start", "false", "--eval_strategy", "no", "--save_steps", "2", "--output_dir", str(out)])
    # 8 prompts per update = 2 per micro-batch x 1 accumulated x 2 mini-batches x 2 processes.
    assert processes_used(out, global_batch=8 // 2) == 2
    checkpoint = out / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    episodes = [e["episode"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
                if "episode" in e]
    assert episodes == [8, 16]
    assert (out / "adapter_model.safetensors").is_file() and (out / "critic/value_head.safetensors").is_file()


@pytest.mark.parametrize("profile", [TWO_PROCESSES, FSDP2], ids=["ddp", "fsdp2"])
def test_ppo_update_on_two_processes_matches_one(sft_pair, tmp_path, profile):
    """The same global rollout of 8 responses, whitened and updated on by 1 process or split over 2 (data-parallel
    or sharded): the same SGD step, which needs the advantages whitened over both halves, the gradients averaged,
    and the loss's token weighting to count every process's tokens."""
    sft, _ = sft_pair
    start, one = update_once(str(sft), str(tmp_path / "one"))
    launch(2, "tests/ppo_update_worker.py", [str(sft), str(tmp_path / "two.safetensors")], profile=profile)
    two = load_file(tmp_path / "two.safetensors")
    assert int(two.pop("world_size")) == 2
    assert one.keys() == two.keys()
    step = max(float((one[k] - start[k]).abs().max()) for k in one)
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert step > 1e-3, f"the update barely moved the weights ({step:.1e}): the comparison would prove nothing"
    assert gap <= 1e-4 * step, f"1 and 2 processes differ by up to {gap:.2e} after a step of {step:.2e}"


def ppo_argv(sft, out, *extra):
    return ["--config", "recipes/configs/ppo/tiny.yaml", "--model_name_or_path", str(sft), "--reward_model_path", "",
            "--reward_funcs", "rlhf_kit.tasks.review:gold", "--dataset_test_split", "none", "--per_device_train_batch_size",
            "2", "--global_batch_size", "8", "--num_mini_batches", "2", "--response_length", "8",
            "--eval_on_start", "false", "--eval_strategy", "no", "--lr_scheduler_type", "constant",
            "--output_dir", str(out), *extra]


def test_ppo_recipe_under_fsdp2_resumes_exactly(sft_pair, tmp_path):
    """`accelerate launch --config_file accelerate_configs/cpu_fsdp2.yaml recipes/ppo.py`: 2 processes, weights
    sharded. A run stopped after its checkpoint of update 2 and started again ends where the uninterrupted run does."""
    sft, _ = sft_pair
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(2, "recipes/ppo.py", ppo_argv(sft, straight, "--max_steps", "4", "--save_steps", "2"), profile=FSDP2)
    assert json.loads((straight / "rlhf_kit_stage.json").read_text())["metrics"]["parallelism"] == "fsdp2 x 2"
    # What a run killed during update 3 leaves: checkpoint-2 and nothing after it (one launch fewer than training a
    # second run to update 2: the checkpoint is the same one).
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    launch(2, "recipes/ppo.py", ppo_argv(sft, resumed, "--max_steps", "4", "--save_steps", "2"), profile=FSDP2)
    assert json.loads((resumed / "rlhf_kit_stage.json").read_text())["metrics"]["parallelism"] == "fsdp2 x 2"
    assert processes_used(straight, global_batch=8 // 2) == 2
    checkpoint = resumed / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]

    def updates(out):
        return {e["step"]: e for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
                if "objective/kl" in e}

    assert sorted(updates(resumed)) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value"):
            assert updates(resumed)[step][key] == pytest.approx(updates(straight)[step][key], rel=1e-5, abs=1e-7), key
    assert_same_adapter(straight, resumed, atol=1e-6)
    critic = [load_file(out / "checkpoint-4/critic/value_head.safetensors") for out in (straight, resumed)]
    assert all(torch.allclose(critic[0][k], critic[1][k], atol=1e-6) for k in critic[0])


TRL_STAGE_ARGS = {
    "dpo": ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"],
    "grpo": ["--reward_model_path", "", "--reward_funcs", "rlhf_kit.tasks.review:gold", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "1", "--num_generations", "4", "--max_completion_length", "8"],
    "rloo": ["--reward_model_path", "", "--reward_funcs", "rlhf_kit.tasks.review:gold", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "1", "--num_generations", "4", "--max_completion_length", "8"],
}


@pytest.mark.parametrize("stage", TRL_STAGE_ARGS)
def test_trl_stages_run_sharded_under_fsdp2(sft_pair, tmp_path, stage):
    """DPO, GRPO and RLOO (TRL's trainers) train and save under the same FSDP2 profile as PPO: 2 processes, weights
    sharded (the stage record says so), a loadable adapter written."""
    sft, _ = sft_pair
    out = tmp_path / stage
    launch(2, f"recipes/{stage}.py", [
        "--config", f"recipes/configs/{stage}/tiny.yaml", "--model_name_or_path", str(sft), "--output_dir", str(out),
        "--max_steps", "2", "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no",
        "--dataset_test_split", "none", "--report_to", "none", *TRL_STAGE_ARGS[stage]], profile=FSDP2)
    assert json.loads((out / "rlhf_kit_stage.json").read_text())["metrics"]["parallelism"] == "fsdp2 x 2"
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())
