"""Model cards: Hub metadata and the lineage of a model (base -> SFT -> reward model -> PPO) from its stage records.

    write_card("outputs/tiny-ppo-export")                        # README.md beside the model
    render_card("outputs/tiny-ppo-export", repo_id="me/tiny-ppo") # the same card, with load snippets for the Hub

Everything comes from the directory itself, read once (`runs.StageOutput`): the stage record (each stage's record,
its parent's record nested inside), the export settings (license, the base's Hub id, the name) and the artifacts
present (adapter, merged model, GGUF files, reward normalization). So a card can be rendered again anywhere the
directory is copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from huggingface_hub import ModelCardData
from transformers import AutoTokenizer

from rlhf_kit.config import CONFIG_FILE
from rlhf_kit.model import merged_source, stop_token_ids
from rlhf_kit.runs import CARD_FILE, EXPORT_FILE, REWARD_FILE, STAGE_FILE, StageOutput, library_versions, read_stage
from rlhf_kit.stages import ONLINE_RL

TITLES = {"base": "base model", "pretrain": "pretraining", "sft": "SFT", "reward": "reward model", "ppo": "PPO",
          "dpo": "DPO", "grpo": "GRPO", "rloo": "RLOO", "best_of_n": "best-of-N sampling"}
# The metrics that say whether a stage worked, first in the lineage table; all metrics are listed in the details.
KEY_METRICS = {
    "pretrain": ("eval_loss", "train_loss", "parameters"),
    "sft": ("eval_loss", "train_loss"),
    "reward": ("eval_accuracy", "eval_mean_margin", "train_loss"),
    "ppo": ("eval_reward", "eval_reward_at_start", "eval_kl", "eval_stop_rate", "reward_model_accuracy"),
    "dpo": ("eval_rewards/accuracies", "eval_rewards/margins", "eval_loss", "train_loss"),
    "grpo": ("eval_reward", "eval_reward_at_start", "eval_kl", "reward_model_accuracy"),
    "rloo": ("eval_reward", "eval_reward_at_start", "eval_kl", "reward_model_accuracy"),
    "best_of_n": ("best_score", "mean_score", "n", "kl_bound"),
}
RL_STAGES = ONLINE_RL
_VERSIONS = ("rlhf-kit", "torch", "transformers", "trl", "peft", "accelerate")


def lineage(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps that produced a model, oldest first: [{"stage", "record" (None for a base), "model", "output"}].

    The chain follows each record's `parent`. An RL stage's reward model is not its parent (the policy starts from
    the SFT model) but is part of how it was made, so it appears right before that stage: from the record's
    `reward_model` entry if it has one, else from the stage record in its `reward_model_path`.
    """
    chain = []
    while record:
        chain.append(record)
        record = record.get("parent")
    chain.reverse()
    steps = []
    if chain and chain[0]["stage"] != "pretrain":
        steps.append({"stage": "base", "record": None, "model": None, "output": chain[0]["model"]})
    for rec in chain:
        reward_path = (rec.get("config") or {}).get("reward_model_path")
        if rec["stage"] in RL_STAGES and reward_path:
            reward = rec.get("reward_model")
            if reward is None and Path(str(reward_path)).is_dir():
                reward = read_stage(reward_path)
            steps.append({"stage": "reward", "record": reward, "model": (reward or {}).get("model"),
                          "output": reward_path})
        steps.append({"stage": rec["stage"], "record": rec, "model": rec.get("model"),
                      "output": (rec.get("config") or {}).get("output_dir")})
    return steps


def render_card(output: StageOutput | str | Path, repo_id: str | None = None) -> str:
    """The README.md for the model in `output` (an export or a stage output, as read or its path)."""
    output = output if isinstance(output, StageOutput) else StageOutput.read(output)
    if output.record is None:
        raise ValueError(f"{output.path} has no {STAGE_FILE}: a card is rendered from the stage records.")
    options = output.export_settings
    artifacts = _artifacts(output)
    steps = lineage(output.record)
    name = options.get("model_name") or Path(str(options.get("model_path") or output.path)).resolve().name
    where = repo_id or str(output.path)
    sections = [
        "---\n" + _metadata(steps, artifacts, options).strip() + "\n---",
        f"# {name}\n\n{_summary(steps, artifacts, options.get('license', 'other'))}",
        _lineage_table(steps),
        _usage(output, where, artifacts, steps, repo_id is not None),
        _files_section(output),
        _stage_details(steps),
        _provenance(options),
    ]
    return "\n\n".join(s for s in sections if s).rstrip() + "\n"


def write_card(output: StageOutput | str | Path, repo_id: str | None = None) -> Path:
    output = output if isinstance(output, StageOutput) else StageOutput.read(output)
    path = output.path / CARD_FILE
    path.write_text(render_card(output, repo_id=repo_id))
    return path


# ---------------------------------------------------------------------------------------------------------------


def _artifacts(output: StageOutput) -> dict[str, Any]:
    found: dict[str, Any] = {"reward": REWARD_FILE in output.files}
    if output.has_model:
        found["merged"] = "."
    if output.adapter_dir:
        found["adapter"] = output.adapter_dir
    if output.gguf_files:
        found["gguf"] = output.gguf_files
    return found


def _is_hub_id(name: Any) -> bool:
    if not isinstance(name, str) or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return False
    return not name.endswith((".json", ".jsonl", ".csv", ".parquet", ".txt"))


def _metadata(steps, artifacts, options) -> str:
    root = steps[0]["output"] if steps[0]["stage"] == "base" else None
    base = options.get("base_model_id") or (root if _is_hub_id(root) else None)
    datasets = sorted({d for s in steps if s["record"] for d in _as_list(s["record"].get("data")) if _is_hub_id(d)})
    stages = [s["stage"] for s in steps if s["stage"] != "base"]
    tags = ["rlhf-kit", *dict.fromkeys(stages), *(["rlhf"] if set(stages) & set(RL_STAGES) else [])]
    if "adapter" in artifacts:
        tags += ["peft", "lora"]
    if "gguf" in artifacts:
        tags.append("gguf")
    reward = artifacts["reward"]
    tags.append("reward-model" if reward else "conversational")
    library = "peft" if "adapter" in artifacts and "merged" not in artifacts else "transformers"
    return ModelCardData(base_model=base, library_name=library, license=options.get("license", "other"), tags=tags,
                         datasets=datasets or None,
                         pipeline_tag="text-classification" if reward else "text-generation").to_yaml()


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value] if value else []


def _summary(steps, artifacts, license: str) -> str:
    path = " → ".join(TITLES.get(s["stage"], s["stage"]) for s in steps)
    what = "A reward model" if artifacts["reward"] else "A chat model"
    forms = [k for k in ("merged", "adapter", "gguf") if k in artifacts]
    names = {"merged": "the full model (safetensors)", "adapter": "the LoRA adapter (PEFT)", "gguf": "GGUF files"}
    text = f"{what} trained with rlhf-kit: {path}.\n\nThis repository holds: {', '.join(names[f] for f in forms)}."
    if license == "other":
        text += ("\n\n**License:** `other` is a placeholder: set the `license:` field above to the license of the base "
                 "model and of the training data.")
    return text


def _lineage_table(steps) -> str:
    rows = ["## Lineage", "", "| step | stage | trained from | data | key metrics |", "|---|---|---|---|---|"]
    for i, step in enumerate(steps):
        rec = step["record"]
        title = TITLES.get(step["stage"], step["stage"]) + (" (this model)" if i == len(steps) - 1 else "")
        if step["stage"] == "base":
            rows.append(f"| {i} | {title} | `{step['output']}` | | |")
            continue
        if rec is None:
            rows.append(f"| {i} | {title} | | | record not found at `{step['output']}` |")
            continue
        rows.append(f"| {i} | {title} | {_origin(steps, i)} | {_data(rec.get('data'))} | "
                    f"{_metrics(rec, KEY_METRICS.get(step['stage']), limit=4)} |")
    return "\n".join(rows)


def _origin(steps, i) -> str:
    model = steps[i]["model"]
    if model in (None, "from scratch"):
        return "from scratch"
    origin = next((f"step {j}" for j in range(i - 1, -1, -1) if steps[j]["output"] and
                   _same(steps[j]["output"], model)), f"`{model}`")
    if steps[i]["stage"] in RL_STAGES and i > 0 and steps[i - 1]["stage"] == "reward":
        origin += f", rewarded by step {i - 1}"
    return origin


def _same(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def _data(data) -> str:
    return ", ".join(f"`{d}`" for d in _as_list(data))


def _metrics(record, keys=None, limit=None) -> str:
    metrics = record.get("metrics") or {}
    names = [k for k in (keys or ()) if k in metrics] or sorted(metrics)
    names = names[:limit] if limit else names
    return ", ".join(f"{k} {_fmt(metrics[k])}" for k in names)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _usage(output: StageOutput, where: str, artifacts, steps, on_hub: bool) -> str:
    parts = ["## How to use"]
    if "merged" in artifacts:
        parts.append(_reward_snippet(where, on_hub) if artifacts["reward"] else _chat_snippet(output.path, where))
    if "adapter" in artifacts:
        parts.append(_adapter_snippet(output.adapter_config, where, artifacts, steps, output.path))
    if "gguf" in artifacts:
        parts.append(_gguf_snippet(where, artifacts["gguf"], on_hub))
    return "\n\n".join(parts)


def _stop_token(model_dir: Path, sub: str = ".") -> str:
    file = model_dir / sub / "tokenizer_config.json"
    eos = json.loads(file.read_text()).get("eos_token") if file.is_file() else None
    return eos.get("content") if isinstance(eos, dict) else eos or "EOS"


def _chat_snippet(model_dir: Path, where: str) -> str:
    return f"""### Chat with the merged model (transformers)

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForCausalLM.from_pretrained("{where}")
messages = [{{"role": "user", "content": "Review the coffee."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=128)  # stops at {_stop_token(model_dir)} (generation_config.json)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

In a terminal, from a local copy: `rlhf-kit chat <directory>`."""


def _reward_snippet(where: str, on_hub: bool) -> str:
    norm = (f'hf_hub_download("{where}", "{REWARD_FILE}")' if on_hub else f'"{where}/{REWARD_FILE}"')
    imports = "from huggingface_hub import hf_hub_download\n" if on_hub else ""
    return f"""### Score a conversation (transformers)

Scores are normalized as in training, `(raw - offset) / scale` with the values in `{REWARD_FILE}` (mean 0, std 1
on the reference set), so that PPO's KL coefficient keeps its meaning.

```python
import json

{imports}from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForSequenceClassification.from_pretrained("{where}")
norm = json.load(open({norm}))
conversation = [{{"role": "user", "content": "Review the tea."}}, {{"role": "assistant", "content": "The tea is fun."}}]
inputs = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)
raw = model(**inputs).logits[0, 0].item()
print((raw - norm["offset"]) / norm["scale"])
```

With rlhf-kit, from a local copy: `RewardModel.from_pretrained(<directory>).score([conversation])`."""


def _adapter_snippet(config: dict[str, Any], where: str, artifacts, steps, path: Path) -> str:
    sub = artifacts["adapter"]
    base = config.get("base_model_name_or_path")
    subfolder = f', subfolder="{sub}"' if sub != "." else ""
    reward = config.get("task_type") == "SEQ_CLS"
    auto = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    extra = ", num_labels=1" if reward else ""
    note = ""
    if not _is_hub_id(base):
        note = (f"\n\nThe adapter's base, `{base}`, is {_describe_local(base, steps)} on the machine that trained it: "
                "load the adapter on that model, or use the merged model.")
    chat = "" if reward else _adapter_chat(path / sub, base)
    return f"""### The LoRA adapter alone (plain PEFT)

```python
from peft import PeftModel
from transformers import {auto}, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}"{subfolder})
base = {auto}.from_pretrained("{base}"{extra})
if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # tokens added for the chat template
    base.resize_token_embeddings(len(tokenizer))
model = PeftModel.from_pretrained(base, "{where}"{subfolder}){chat}
```{note}"""


def _adapter_chat(adapter_dir: Path, base: str) -> str:
    """Generation lines for a causal adapter. The base's generation config knows only the base's EOS, not the chat
    template's end of turn (<|im_end|>), so without explicit stop tokens the answer runs on to max_new_tokens."""
    if not (adapter_dir / "tokenizer_config.json").is_file():
        return ""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    # The base's own EOS ids only when it is here to read: rendering a card must not need the network.
    local_base = base if base and Path(base).is_dir() else None
    stops = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, local_base))
    return f"""
messages = [{{"role": "user", "content": "Review the coffee."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
stop = tokenizer.convert_tokens_to_ids({stops!r})  # the chat's end of turn: the base's generation config lacks it
output = model.generate(**inputs, max_new_tokens=128, eos_token_id=stop)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""


def _describe_local(base: str, steps) -> str:
    """Which step of the lineage a local base path is: PPO and reward adapters apply to the SFT output, merged."""
    source = merged_source(base)
    merged = source is not None
    for i, step in enumerate(steps):
        if step["output"] and _same_dir(source or base, step["output"]):
            title = TITLES.get(step["stage"], step["stage"])
            return f"the output of step {i} ({title})" + (", merged" if merged else "")
    return "a local model"


def _same_dir(a: str | Path, b: str | Path) -> bool:
    return str(a).rstrip("/") == str(b).rstrip("/") or Path(a).resolve() == Path(b).resolve()


def _gguf_snippet(where: str, files: list[str], on_hub: bool) -> str:
    listed = "\n".join(f"- `{f}`" for f in files)
    fetch = f"hf download {where} {files[-1]} --local-dir .\n" if on_hub else ""
    return f"""### GGUF (llama.cpp, Ollama, LM Studio, ...)

{listed}

The chat template, the stop tokens and the tokenizer are inside each file.

```bash
{fetch}llama-cli -m {files[-1]} -cnv
```

Or with transformers, which reads the tokenizer and its chat template from the file too:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{where}", gguf_file="{files[0]}")
tokenizer = AutoTokenizer.from_pretrained("{where}", gguf_file="{files[0]}")
messages = [{{"role": "user", "content": "Review the coffee."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=128, eos_token_id=tokenizer.eos_token_id)  # the end of turn
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def _files_section(output: StageOutput) -> str:
    rows = [f"- `{f}` ({_size(size)})" for f, size in sorted(output.files.items()) if f != CARD_FILE]
    return "## Files\n\n" + "\n".join(rows)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _stage_details(steps) -> str:
    parts = ["## Stage details"]
    for i, step in enumerate(steps):
        rec = step["record"]
        if rec is None:
            continue
        versions = ", ".join(f"{k} {v}" for k, v in (rec.get("versions") or {}).items() if k in _VERSIONS)
        config = {k: v for k, v in sorted((rec.get("config") or {}).items()) if v is not None}
        parts.append(f"""### {i}. {TITLES.get(step['stage'], step['stage'])}: `{step['output']}`

- trained from: {_origin(steps, i)}
- data: {_data(rec.get('data')) or '-'}
- metrics: {_metrics(rec) or '-'}
- versions: {versions or '-'}

<details><summary>config</summary>

```yaml
{yaml.safe_dump(config, sort_keys=True).strip()}
```

</details>""")
    return "\n\n".join(parts)


def _provenance(options) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items() if k in _VERSIONS)
    kept = {k: options[k] for k in ("formats", "gguf_types", "dtype", "model_path") if k in options}
    line = f" with `{json.dumps(kept)}`" if kept else ""
    return (f"## Provenance\n\nWritten by rlhf-kit{line}; {versions}. The full lineage is in `{STAGE_FILE}`, the "
            f"training config in `{CONFIG_FILE}` and the export settings in `{EXPORT_FILE}`.")
