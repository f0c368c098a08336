"""Scoring with a trained reward model, and the gate it passes before PPO, GRPO, RLOO or best-of-N trust it.

    rm = RewardModel.from_pretrained("outputs/tiny-reward")
    rm.score([[{"role": "user", "content": "Review the tea."}, {"role": "assistant", "content": "The tea is fun."}]])
    rm.score_texts_for(["Review the tea."], ["The tea is fun."])          # the same, built from prompt + completion

A reward stage directory (`recipes/reward.py`) holds a LoRA adapter with the score head in it (or a full model), the
tokenizer with its chat template, `rlhf_kit_reward.json` (normalization and how to rebuild the model) and
`reward_eval.json` (the held-out report `gate` reads). Scores are normalized on load,
`(raw - offset) / scale`, where offset and scale make the scores on a reference set mean 0 / std 1, so a KL
coefficient means the same thing whichever reward model PPO uses.

A reward stage trained with `ensemble_size` K > 1 holds K such reward models as LoRA adapters on one base
(`member-<k>/`); `load_reward_model(path)` loads either kind, an ensemble as a `RewardEnsemble` that scores with an
aggregate of its members (`aggregate_scores`: mean, mean - lambda * std, or min) and measures their `disagreement`.

Every RL stage declares its reward sources with `RewardSources` and loads them with `load_rewards`: PPO scores with
the `Rewards` it returns directly; GRPO, RLOO and best-of-N take them as TRL-style functions,
`fn(prompts, completions, **kwargs)`, which `load_reward_functions(RewardSources(...), tokenizer, stop_ids=...)`
builds (the reward model as a `RewardModelFunction`, Python functions, a `MissingStopPenalty`) with one weight each.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_kit.errors import UserError
from rlhf_kit.model import HEAD, IM_END, ModelArguments, is_adapter_dir, load_model
from rlhf_kit.runs import EVAL_FILE, REWARD_FILE

# How a reward ensemble's members combine (`aggregate_scores`), and its key in rlhf_kit_reward.json:
# {"members": [member directories], "aggregate", "coef"}.
AGGREGATES = ("mean", "mean_minus_std", "min")
ENSEMBLE_KEY = "ensemble"
DEFAULT_MIN_ACCURACY = 0.6
# reward_eval.json's "held_out" when the pairs scored are the training pairs (the data had none to spare).
IN_SAMPLE = "in-sample"
QUANTIZATION_KEYS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
                      "bnb_4bit_quant_storage")

Sample = str | list[dict[str, str]]
# A TRL-style reward function: fn(prompts=..., completions=..., **dataset_columns) -> one number per completion.
RewardFunc = Callable[..., list[float]]


class RewardGateError(UserError):
    """The reward model is not fit to drive PPO; the message says what to fix and how to override."""


def encode(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> list[int]:
    """Token ids of one sample exactly as TRL 1.16's RewardTrainer tokenizes a chosen or rejected response.

    A conversation goes through the chat template as is (no generation prompt: the template itself closes the
    assistant turn with its end-of-turn token). Plain text gets the tokenizer's EOS appended unless it already ends
    with it, then is tokenized with the tokenizer's own special tokens (a BOS where the tokenizer adds one).
    """
    if isinstance(sample, str):
        eos = tokenizer.eos_token
        return tokenizer(text=sample if sample.endswith(eos) else sample + eos)["input_ids"]
    if tokenizer.chat_template is None:
        raise ValueError("this tokenizer has no chat template, so it cannot score conversations; pass plain text")
    return tokenizer.apply_chat_template(list(sample), tokenize=True, return_dict=True)["input_ids"]


def read_reward_file(path: str | Path) -> dict[str, Any]:
    file = Path(path) / REWARD_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def read_eval_report(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / EVAL_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def write_reward_files(output_dir: str | Path, metadata: dict[str, Any], report: dict[str, Any] | None) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REWARD_FILE).write_text(json.dumps(metadata, indent=2))
    if report is not None:
        (out / EVAL_FILE).write_text(json.dumps(report, indent=2))


class RewardModel:
    """A sequence-classification reward model, its own tokenizer and its normalization.

    Build one with `from_pretrained(reward_dir)`, or wrap a model in memory (the reward recipe does, to evaluate
    with the very code PPO scores with).
    """

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, *, offset: float = 0.0, scale: float = 1.0,
                 conversational: bool = True, metadata: dict[str, Any] | None = None):
        pad = model.config.get_text_config().pad_token_id
        if tokenizer.pad_token_id is None or pad != tokenizer.pad_token_id:
            # The model reads the reward at the last token that is not pad_token_id: a mismatch reads it elsewhere.
            raise ValueError(f"the model's pad_token_id ({pad}) differs from the tokenizer's "
                             f"({tokenizer.pad_token_id}); set model.config.pad_token_id = tokenizer.pad_token_id")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.offset, self.scale = float(offset), float(scale)
        self.conversational = conversational
        self.metadata = dict(metadata or {})

    @classmethod
    def from_pretrained(cls, path: str, *, device=None, dtype=None, trust_remote_code: bool = False) -> RewardModel:
        """Load a reward stage output (adapter + score head, or a full/merged model) with its normalization.

        An adapter trained on a 4-bit base is loaded on the same 4-bit base, unmerged, so its scores are the ones
        its evaluation and normalization measured; any other adapter is merged into its base for speed.
        """
        path = str(path)
        if not Path(path).is_dir():
            what = "is not a directory" if Path(path).exists() else "does not exist"
            raise FileNotFoundError(f"reward model {path} {what} (working directory {os.getcwd()}); pass a reward "
                                    "stage output_dir")
        meta = read_reward_file(path)
        if meta.get(ENSEMBLE_KEY):
            raise ValueError(f"{path} is a reward ensemble (ensemble_size > 1): load it with load_reward_model or "
                             "RewardEnsemble.from_pretrained; one member is a reward model of its own "
                             f"({path}/member-0)")
        saved_head = _saved_head(path)
        if not saved_head:
            raise ValueError(f"{path} holds no '{HEAD}' head weights: the adapter was saved without the reward head, "
                             f"so loading it would score with a random head. Train with modules_to_save=['{HEAD}'] "
                             "(rlhf_kit.model.lora_config(..., task_type=TaskType.SEQ_CLS) adds it).")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype if dtype is not None else meta.get("dtype") or "float32"
        dtype = str(dtype).removeprefix("torch.")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        quant = {k: v for k, v in meta.get("quantization", {}).items() if k in QUANTIZATION_KEYS}
        quantized = bool(quant.get("load_in_4bit") or quant.get("load_in_8bit"))
        adapter = is_adapter_dir(path)
        args = ModelArguments(model_name_or_path=_base_model(path, meta) if adapter else path, dtype=dtype,
                              use_peft=quantized, **(quant if adapter else {}))
        model = load_model(args, tokenizer, sequence_classification=True, trust_remote_code=trust_remote_code,
                           device_map={"": _placement(device)} if quantized else None)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path)
            if not quantized:
                model = model.merge_and_unload()
        if not quantized:
            model = model.to(device)
        _check_head(model, saved_head, path)
        return cls(model, tokenizer, offset=meta.get("offset", 0.0), scale=meta.get("scale", 1.0),
                   conversational=meta.get("conversational", tokenizer.chat_template is not None),
                   metadata={**meta, "source": path})

    def save_pretrained(self, output_dir: str | Path) -> None:
        """Save a full (merged) reward model: an ordinary transformers directory plus the normalization."""
        if getattr(self.model, "peft_config", None) is not None:
            raise ValueError("this reward model is an unmerged adapter on a quantized base; merging into 4/8-bit "
                             "weights would round the adapter away. Train without quantization to export a merged RM.")
        self.model.save_pretrained(output_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(output_dir)
        meta = {**self.metadata, "offset": self.offset, "scale": self.scale, "conversational": self.conversational,
                "adapter": False, "quantization": {}}
        meta.pop("base_model", None)
        write_reward_files(output_dir, meta, None)
        source = self.metadata.get("source")
        if source and (Path(source) / EVAL_FILE).is_file():
            (Path(output_dir) / EVAL_FILE).write_text((Path(source) / EVAL_FILE).read_text())

    def encode(self, sample: Sample) -> list[int]:
        return encode(self.tokenizer, sample)

    @torch.no_grad()
    def score(self, samples: Sequence[Sample], *, batch_size: int = 16, normalize: bool = True) -> torch.Tensor:
        """Rewards (N,) float32 on CPU for N samples: plain texts or full conversations (prompt and response).

        Each sample is tokenized exactly as in reward training (`encode`). Batches hold samples of similar length,
        so little padding is computed; the result is in the order given.
        """
        if isinstance(samples, (str, dict)) or (len(samples) and isinstance(samples[0], dict)):
            raise TypeError("score() takes a list of samples: a list of strings, or a list of conversations "
                            "(each a list of {'role', 'content'} messages)")
        ids = [self.encode(sample) for sample in samples]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        rewards = torch.empty(len(ids), dtype=torch.float32)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = self._collate([ids[i] for i in chunk], device)
            logits = self.model(**batch, use_cache=False).logits  # (B, 1)
            rewards[chunk] = logits[:, 0].float().cpu()
        return (rewards - self.offset) / self.scale if normalize else rewards

    def _collate(self, ids: list[list[int]], device) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):  # right padding, as TRL's DataCollatorForPreference
            input_ids[row, : len(x)] = torch.tensor(x)
            attention_mask[row, : len(x)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    def to_sample(self, prompt: Sample, completion: str | list[dict[str, str]]) -> Sample:
        """One prompt (string or messages) + one completion (string or assistant messages) in the RM's format."""
        if self.conversational:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
            return messages + reply
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("this reward model was trained on plain-text pairs: pass prompts and completions as "
                             "strings (a completion is appended to its prompt as is)")
        return prompt + completion

    def score_texts_for(self, prompts: Sequence[Sample], completions: Sequence[str | list[dict[str, str]]], *,
                        batch_size: int = 16, normalize: bool = True) -> torch.Tensor:
        """Rewards (N,) for N (prompt, completion) pairs, e.g. a policy's decoded completions (stop token removed)."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        samples = [self.to_sample(p, c) for p, c in zip(prompts, completions)]
        return self.score(samples, batch_size=batch_size, normalize=normalize)


def disagreement(members: Tensor) -> Tensor:
    """(N,) spread of K members' (K, N) normalized scores: their standard deviation (population, so 0 for K=1)."""
    return members.double().std(dim=0, correction=0).float()


def check_aggregate(aggregate: str) -> None:
    """Refuse an aggregate name `aggregate_scores` does not know, before anything is loaded or trained."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"reward ensemble aggregate must be one of {list(AGGREGATES)}, got {aggregate!r}")


def aggregate_scores(members: Tensor, aggregate: str = "mean", coef: float = 1.0) -> Tensor:
    """(N,) ensemble score from K members' (K, N) normalized scores.

    mean: the members' average. mean_minus_std: the average less `coef` times their disagreement, so a response the
    members argue about scores low (the conservative objective of Coste et al. 2023). min: the worst member's score.
    """
    check_aggregate(aggregate)
    if members.dim() != 2 or members.shape[0] < 1:
        raise ValueError(f"expected (K, N) member scores with K >= 1, got shape {tuple(members.shape)}")
    if aggregate == "mean":
        return members.mean(dim=0)
    if aggregate == "mean_minus_std":
        return members.mean(dim=0) - coef * disagreement(members)
    return members.min(dim=0).values  # "min"


class RewardEnsemble(RewardModel):
    """K reward models that are LoRA adapters, each with its own score head, on one shared base: an ensemble that
    costs one base model plus K adapters, not K models.

    `score` returns the aggregate (`aggregate_scores`) of the members' scores, each normalized with its own offset
    and scale, so the ensemble's scores are already in normalized units: its own offset is 0 and scale 1, and
    `normalize` has no effect. `score_members` gives the (K, N) member scores, from which `disagreement` measures how
    much the members argue (the over-optimization monitor logs it).
    """

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, members: Sequence[dict[str, Any]], *,
                 aggregate: str = "mean", coef: float = 1.0, conversational: bool = True,
                 metadata: dict[str, Any] | None = None):
        super().__init__(model, tokenizer, conversational=conversational, metadata=metadata)
        check_aggregate(aggregate)  # an unknown aggregate fails here, not mid-training
        self.members = [dict(m) for m in members]  # adapter, offset, scale, source of each, in order
        self.aggregate, self.coef = aggregate, float(coef)

    @classmethod
    def from_pretrained(cls, path: str, *, device=None, dtype=None, trust_remote_code: bool = False,
                        aggregate: str | None = None, coef: float | None = None) -> RewardEnsemble:
        """Load an ensemble stage output: the shared base once, then each member's adapter and head onto it.
        `aggregate` and `coef` override the ones the stage recorded."""
        path = str(path)
        meta = read_reward_file(path)
        spec = meta.get(ENSEMBLE_KEY)
        if not spec:
            raise ValueError(f"{path} is a single reward model, not an ensemble; load it with RewardModel")
        dirs = [str(Path(path) / member) for member in spec["members"]]
        metas = [read_reward_file(d) for d in dirs]
        if not all(m.get("adapter") for m in metas) or any(m.get("quantization", {}).get("load_in_4bit")
                                                            or m.get("quantization", {}).get("load_in_8bit")
                                                            for m in metas):
            raise ValueError(f"the members of ensemble {path} must be LoRA adapters on an unquantized base")
        bases = {_base_model(d, m) for d, m in zip(dirs, metas)}
        if len(bases) != 1:
            raise ValueError(f"the members of ensemble {path} are adapters on different bases ({sorted(bases)}); an "
                             "ensemble shares one base")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = str(dtype if dtype is not None else metas[0].get("dtype") or "float32").removeprefix("torch.")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        args = ModelArguments(model_name_or_path=bases.pop(), dtype=dtype)
        model = load_model(args, tokenizer, sequence_classification=True, trust_remote_code=trust_remote_code)
        from peft import PeftModel

        members = []
        for k, (member_dir, member_meta) in enumerate(zip(dirs, metas)):
            saved_head = _saved_head(member_dir)
            if not saved_head:
                raise ValueError(f"ensemble member {member_dir} holds no '{HEAD}' head weights")
            name = f"member-{k}"
            if k == 0:
                model = PeftModel.from_pretrained(model, member_dir, adapter_name=name)
            else:
                model.load_adapter(member_dir, adapter_name=name)
            members.append({"adapter": name, "offset": member_meta.get("offset", 0.0),
                            "scale": member_meta.get("scale", 1.0), "source": member_dir})
        model = model.to(device)
        return cls(model, tokenizer, members, aggregate=aggregate or spec.get("aggregate", "mean"),
                   coef=spec.get("coef", 1.0) if coef is None else coef,
                   conversational=meta.get("conversational", tokenizer.chat_template is not None),
                   metadata={**meta, "source": path})

    def save_pretrained(self, output_dir: str | Path) -> None:
        raise ValueError("a reward ensemble is saved by the reward stage (ensemble_size > 1); copy its output "
                         "directory to move it")

    @torch.no_grad()
    def score_members(self, samples: Sequence[Sample], *, batch_size: int = 16) -> torch.Tensor:
        """(K, N) normalized scores of every member on N samples, in member order."""
        active = self.model.active_adapter
        try:
            rows = []
            for member in self.members:
                self.model.set_adapter(member["adapter"])
                raw = super().score(samples, batch_size=batch_size, normalize=False)
                rows.append((raw - member["offset"]) / member["scale"])
        finally:
            self.model.set_adapter(active)
        return torch.stack(rows)

    def score(self, samples: Sequence[Sample], *, batch_size: int = 16, normalize: bool = True) -> torch.Tensor:
        """(N,) aggregate of the members' normalized scores (`normalize` has no effect: see the class)."""
        return self.combine(self.score_members(samples, batch_size=batch_size))

    def combine(self, members: torch.Tensor) -> torch.Tensor:
        """(N,) ensemble scores from (K, N) member scores, with this ensemble's aggregate and coef."""
        return aggregate_scores(members, self.aggregate, self.coef)

    def score_members_for(self, prompts: Sequence[Sample], completions: Sequence[str | list[dict[str, str]]], *,
                          batch_size: int = 16) -> torch.Tensor:
        """(K, N) member scores for N (prompt, completion) pairs."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        return self.score_members([self.to_sample(p, c) for p, c in zip(prompts, completions)],
                                  batch_size=batch_size)

    def critic_reference(self) -> RewardModel:
        """The first member as a plain RewardModel view (its adapter active, its own normalization): what PPO copies
        its critic from."""
        first = self.members[0]
        self.model.set_adapter(first["adapter"])
        return RewardModel(self.model, self.tokenizer, offset=first["offset"], scale=first["scale"],
                           conversational=self.conversational,
                           metadata={**read_reward_file(first["source"]), "source": first["source"]})


def load_reward_model(path: str, *, device=None, dtype=None, trust_remote_code: bool = False,
                      aggregate: str | None = None, coef: float | None = None) -> RewardModel:
    """A reward stage output as a RewardModel, or a RewardEnsemble when the stage trained one (ensemble_size > 1);
    `aggregate` and `coef` override an ensemble's recorded scoring and are refused for a single model."""
    if read_reward_file(path).get(ENSEMBLE_KEY):
        return RewardEnsemble.from_pretrained(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                              aggregate=aggregate, coef=coef)
    if aggregate not in (None, "mean"):
        raise ValueError(f"reward_aggregate {aggregate!r} needs a reward ensemble; {path} is a single reward model "
                         "(train one with ensemble_size > 1)")
    return RewardModel.from_pretrained(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def _placement(device: torch.device) -> int | str:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return str(device)


def _base_model(path: str, meta: dict[str, Any]) -> str:
    """The adapter's base: the absolute path recorded at training time, else adapter_config.json's (maybe relative)."""
    recorded = meta.get("base_model")
    if recorded and Path(recorded).is_dir():
        return recorded
    from rlhf_kit.model import adapter_base

    return adapter_base(path)


def _saved_head(path: str) -> dict[str, torch.Tensor]:
    """The score-head tensors as saved in `path` ({"weight": ..., "bias": ...}), from any *.safetensors file."""
    from safetensors import safe_open

    head = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                parts = key.split(".")  # "score.weight", or "base_model.model.score.weight" in an adapter
                if len(parts) >= 2 and parts[-2] == HEAD:
                    head[parts[-1]] = f.get_tensor(key)
    return head


def _check_head(model, saved: dict[str, torch.Tensor], path: str) -> None:
    """Fail loudly if the loaded score head is not the saved one.

    The two classic reward-model bugs both pass silently in transformers/PEFT: an adapter saved without its head
    (the base's fresh random head is used), and a head bias the architecture does not declare (the loader drops it
    as an "unexpected key" with a log line). Either would give scores unrelated to the evaluation.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = getattr(base, HEAD)
    if hasattr(module, "modules_to_save"):  # PEFT's wrapper on an unmerged model: the trained copy is active
        module = module.modules_to_save[module.active_adapters[0]]
    for name, tensor in saved.items():
        loaded = getattr(module, name, None)
        if loaded is None:
            raise ValueError(f"{path} saves a reward head '{name}' ({HEAD}.{name}) that the model architecture does "
                             f"not have, so transformers would drop it on load and shift every score. Fold it into "
                             f"the normalization offset ({REWARD_FILE}) or load with an architecture that has it.")
        if loaded.shape != tensor.shape or not torch.equal(loaded.detach().cpu(), tensor.to(loaded.dtype)):
            raise ValueError(f"the loaded reward head {HEAD}.{name} differs from the one saved in {path}")


def tokenizer_compatibility(reward_tokenizer: PreTrainedTokenizerBase,
                            policy_tokenizer: PreTrainedTokenizerBase) -> tuple[str, str | None]:
    """How PPO may feed the policy's samples to the reward model: ("shared" | "re-render", problem or None).

    "shared": identical vocabulary, chat template and pad / EOS / <|im_end|> ids. The policy's token ids mean the
    same to the RM, and rendering a conversation gives the same ids for both.
    "re-render": a different vocabulary. PPO decodes the policy's completions to text and `score_texts_for`
    re-renders prompt + completion with the RM's own tokenizer and chat template, so this is fine, provided the RM
    has a chat template to render with.
    Incompatible (the problem is returned): an identical vocabulary with a different chat template or pad / EOS /
    <|im_end|> ids -- two tokenizers that look interchangeable but format or end turns differently, typically an RM
    trained from another model's tokenizer setup -- or a different vocabulary and no RM chat template.
    """
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        if reward_tokenizer.chat_template is None:
            return "re-render", ("the reward model's tokenizer differs from the policy's and has no chat template, so "
                                 "PPO cannot render the policy's conversations for it. Train the reward model with "
                                 "recipes/reward.py (it gives the tokenizer a chat template) or from the policy's SFT "
                                 "model.")
        return "re-render", None
    differences = []
    if reward_tokenizer.chat_template != policy_tokenizer.chat_template:
        differences.append("chat template")
    for name, rm_id, policy_id in _special_ids(reward_tokenizer, policy_tokenizer):
        if rm_id != policy_id:
            differences.append(f"{name} id ({rm_id} in the reward model, {policy_id} in the policy)")
    if differences:
        return "shared", ("the reward model and the policy share a vocabulary but differ in " + ", ".join(differences)
                          + ": the reward model was trained on conversations formatted or ended differently from "
                          "the policy's. Train the reward model from the policy's SFT model (model_name_or_path: "
                          "<sft output_dir>) so both use one tokenizer setup.")
    return "shared", None


def _special_ids(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase):
    yield "pad", a.pad_token_id, b.pad_token_id
    yield "eos", a.eos_token_id, b.eos_token_id
    yield IM_END, a.get_vocab().get(IM_END), b.get_vocab().get(IM_END)


def gate(reward_dir: str, policy_tokenizer: PreTrainedTokenizerBase, *, min_accuracy: float = DEFAULT_MIN_ACCURACY,
         allow_weak_reward_model: bool = False) -> dict[str, Any]:
    """Check that the reward model in `reward_dir` may drive PPO; return its held-out report.

    Refuses (RewardGateError) when the held-out pairwise accuracy in reward_eval.json is missing or below
    `min_accuracy`, or when the tokenizers are incompatible (see `tokenizer_compatibility`). With
    `allow_weak_reward_model` the problems become one warning. The returned report gains a "gate" entry:
    {"passed", "overridden", "tokenizer": "shared" | "re-render", "problems"}.
    """
    if not Path(reward_dir).is_dir():
        raise FileNotFoundError(f"reward_model_path: {reward_dir} does not exist (working directory {os.getcwd()}); "
                                "give a reward stage output_dir")
    problems = []
    report = read_eval_report(reward_dir)
    if report is None:
        problems.append(f"{reward_dir} has no {EVAL_FILE}, so its held-out accuracy is unknown. Train it with "
                        "recipes/reward.py on preference data that has a test split (or set eval_dataset_name).")
        report = {}
    elif report.get("held_out") == IN_SAMPLE:
        problems.append(f"{EVAL_FILE} scores the reward model on its own training pairs (in-sample accuracy "
                        f"{report['accuracy']:.3f} on {report['pairs']} pairs), which says nothing about new pairs. "
                        "Train it on preference data with a test split (a directory with test.jsonl, or "
                        "eval_dataset_name), or on enough pairs for eval_holdout_fraction to hold some out.")
    elif report["accuracy"] < min_accuracy:
        problems.append(f"held-out pairwise accuracy {report['accuracy']:.3f} on {report['pairs']} pairs is below "
                        f"min_accuracy {min_accuracy} (chance is 0.5): PPO would optimize mostly noise. Train the "
                        f"reward model longer, with a higher learning rate or on more or cleaner preference data "
                        f"(see {EVAL_FILE}), or lower min_accuracy if you know this task is hard.")
    mode, problem = tokenizer_compatibility(AutoTokenizer.from_pretrained(reward_dir), policy_tokenizer)
    if problem:
        problems.append(problem)
    report["gate"] = {"passed": not problems, "overridden": bool(problems) and allow_weak_reward_model,
                      "tokenizer": mode, "problems": problems}
    if problems:
        message = (f"reward model {reward_dir} failed the reward-model gate:\n" + "\n".join(f"  - {p}" for p in problems)
                   + "\nTo run PPO with it anyway, set allow_weak_reward_model: true.")
        if not allow_weak_reward_model:
            raise RewardGateError(message)
        warnings.warn(message.replace("To run PPO with it anyway", "Running anyway because"), stacklevel=2)
    return report


class RewardModelFunction:
    """A TRL-style reward function, `fn(prompts, completions, **kwargs) -> list[float]`, backed by a RewardModel.

    Prompts and completions may be strings or TRL's conversational form (message lists); extra dataset columns
    arrive as keyword arguments and are ignored.

        reward = RewardModelFunction("outputs/tiny-reward")
        reward(prompts=["Review the tea."], completions=["The tea is fun."])  # -> [1.3...]
    """

    def __init__(self, reward_model: RewardModel | str, *, batch_size: int = 16, normalize: bool = True,
                 name: str = "reward_model"):
        if not isinstance(reward_model, RewardModel):
            reward_model = RewardModel.from_pretrained(reward_model)
        self.reward_model = reward_model
        self.batch_size, self.normalize = batch_size, normalize
        self.__name__ = name

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if isinstance(self.reward_model, RewardEnsemble):
            members = self.reward_model.score_members_for(prompts, completions, batch_size=self.batch_size)
            self.last = (list(prompts), list(completions), members)  # for EnsembleDisagreement, called next
            return self.reward_model.combine(members).tolist()
        rewards = self.reward_model.score_texts_for(prompts, completions, batch_size=self.batch_size,
                                                    normalize=self.normalize)
        return rewards.tolist()


class EnsembleDisagreement:
    """A TRL-style function, weight 0: a reward ensemble's disagreement (std of its members) on each completion, so
    GRPO and RLOO log it (`rewards/reward_model_std/mean`) beside the score, as PPO logs `reward/rm_std`.

    It reuses the member scores of the `RewardModelFunction` called just before it on the same completions (TRL calls
    the functions in order on one batch), and scores them again otherwise.
    """

    __name__ = "reward_model_std"

    def __init__(self, scorer: RewardModelFunction):
        self.scorer = scorer

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        last = getattr(self.scorer, "last", None)
        if last is not None and last[0] == list(prompts) and last[1] == list(completions):
            members = last[2]
        else:
            members = self.scorer.reward_model.score_members_for(prompts, completions,
                                                                 batch_size=self.scorer.batch_size)
        return disagreement(members).tolist()


class MissingStopPenalty:
    """A TRL-style reward function: `-penalty` for a completion that never emitted a stop token, else 0.

    Reward models score a completion as if it had ended: the chat template closes every assistant turn with its
    end-of-turn token, so a completion cut off at max_completion_length reads like a finished one. Adding this
    function (weight 1) makes running on past the length limit cost what PPO's `missing_eos_penalty` costs.
    It reads the `completion_ids` that TRL's GRPO/RLOO trainers (and best-of-N) pass, which keep the stop token.
    """

    __name__ = "missing_stop"

    def __init__(self, stop_token_ids: Sequence[int], penalty: float):
        if not penalty > 0:
            raise ValueError(f"the missing-stop penalty is subtracted, so it must be > 0; got {penalty}")
        self.stop_token_ids, self.penalty = set(stop_token_ids), float(penalty)

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("the missing-stop penalty needs the completions' token ids (completion_ids=...); TRL's "
                             "GRPO and RLOO trainers pass them, decoded text has lost the stop token")
        return [0.0 if self.stop_token_ids.intersection(ids) else -self.penalty for ids in completion_ids]


# The one message for a stage with nothing to optimize, whichever method it is.
NO_REWARD = "no reward to optimize: set reward_model_path (a reward stage output), reward_funcs, or both"
REWARD_BATCH_SIZE = 32


@dataclass
class RewardSources:
    """Where the reward of an RL stage (PPO, GRPO, RLOO, best-of-N) comes from: the one declaration of these keys.

    The weights are the method's own `reward_weights` (TRL's GRPO/RLOO configs declare it, so it cannot live here).
    """

    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward stage output (LoRA adapter or full/merged model) to score with."}
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Python reward functions as 'module:function' import strings; each is called as "
                  "fn(prompts=..., completions=..., completion_ids=..., **extra_dataset_columns) -> list[float] "
                  "(PPO passes no completion_ids)."},
    )
    eval_reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "'module:function' rewards that are only measured and logged (weight 0), never optimized: "
                  "e.g. rlhf_kit.tasks.review:gold, to see whether the learned reward is being hacked."},
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the reward of a completion that never emits the stop token."}
    )
    allow_weak_reward_model: bool = field(
        default=False, metadata={"help": "Run even if the reward model fails the gate (accuracy, tokenizer)."}
    )
    min_reward_accuracy: float = field(
        default=DEFAULT_MIN_ACCURACY, metadata={"help": "Held-out pairwise accuracy the reward model must reach."}
    )
    reward_batch_size: int = field(
        default=REWARD_BATCH_SIZE, metadata={"help": "Samples per reward-model forward pass."}
    )
    reward_aggregate: str | None = field(
        default=None,
        metadata={"help": f"For a reward ensemble (a reward stage trained with ensemble_size > 1): how its members' "
                  f"scores combine, one of {list(AGGREGATES)}; mean_minus_std and min are conservative, scoring low "
                  "what the members disagree on. Default: what the reward stage recorded."},
    )
    reward_aggregate_coef: float | None = field(
        default=None, metadata={"help": "lambda of mean_minus_std (mean - lambda * std). Default: the stage's."}
    )


@dataclass
class Rewards:
    """The reward sources of a stage, loaded: what PPO scores with directly, and what `load_reward_functions` turns
    into TRL-style functions for GRPO, RLOO and best-of-N. `load_rewards(RewardSources(...), tokenizer)` builds one.

    reward_model: a `RewardModel` (or anything with its `score_texts_for`, `offset` and `scale`), or None.
    funcs: the optimized Python functions, in order; eval_funcs: the ones only measured.
    missing_eos_penalty: subtracted from the reward of a completion without a stop token (None: off).
    batch_size: samples per reward-model forward pass. report: the reward model's gate report.
    """

    reward_model: Any = None
    funcs: list[RewardFunc] = field(default_factory=list)
    eval_funcs: list[RewardFunc] = field(default_factory=list)
    missing_eos_penalty: float | None = None
    batch_size: int = REWARD_BATCH_SIZE
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.missing_eos_penalty is not None and not self.missing_eos_penalty >= 0:
            raise ValueError("missing_eos_penalty is subtracted from the reward: give a positive number (or leave it "
                             "unset)")


def reward_weights(has_reward_model: bool, funcs: Sequence, weights: Sequence[float] | None) -> list[float]:
    """One weight per optimized source, the reward model first (if any), then `funcs` in order; default 1 each.

    Raises the one `NO_REWARD` error when there is nothing to optimize.
    """
    optimized = int(has_reward_model) + len(funcs)
    if not optimized:
        raise ValueError(NO_REWARD)
    if weights is None:
        return [1.0] * optimized
    if len(weights) != optimized:
        raise ValueError(f"reward_weights has {len(weights)} values for {optimized} reward sources (the reward model "
                         "first, if any, then reward_funcs in order); the missing-stop penalty and eval_reward_funcs "
                         "take no weight here (they get 1 and 0)")
    return [float(w) for w in weights]


def load_rewards(sources: RewardSources, policy_tokenizer: PreTrainedTokenizerBase, *,
                 weights: Sequence[float] | None = None, device=None, trust_remote_code: bool = False) -> Rewards:
    """Import the reward functions, check them against `weights` (the method's reward_weights), gate and load the
    reward model. Cheap checks (imports, weights, the gate) run before the reward model loads."""
    if sources.reward_aggregate is not None:
        check_aggregate(sources.reward_aggregate)  # an unknown name fails before any loading
    funcs = [import_reward_func(name) for name in sources.reward_funcs]
    measured = [import_reward_func(name) for name in sources.eval_reward_funcs]
    reward_weights(bool(sources.reward_model_path), funcs, weights)
    model, report = None, {}
    if sources.reward_model_path:
        report = gate(sources.reward_model_path, policy_tokenizer, min_accuracy=sources.min_reward_accuracy,
                      allow_weak_reward_model=sources.allow_weak_reward_model)
        model = load_reward_model(sources.reward_model_path, device=device, trust_remote_code=trust_remote_code,
                                  aggregate=sources.reward_aggregate, coef=sources.reward_aggregate_coef)
    return Rewards(model, funcs, measured, missing_eos_penalty=sources.missing_eos_penalty,
                   batch_size=sources.reward_batch_size, report=report)


def load_reward_functions(sources: RewardSources, policy_tokenizer: PreTrainedTokenizerBase, *,
                          stop_ids: Sequence[int] | None = None, weights: Sequence[float] | None = None, device=None,
                          trust_remote_code: bool = False) -> tuple[list, list[float], dict[str, Any]]:
    """The reward functions of a sampling stage (GRPO, RLOO, best-of-N), one weight each, and the reward model's gate
    report: `load_rewards` in TRL's form.

    Order: the reward model (normalized, scoring prompt + completion rendered with its own tokenizer and template),
    then `reward_funcs`, then the missing-stop penalty (weight 1), then, for a reward ensemble, its disagreement
    (`EnsembleDisagreement`, weight 0), then `eval_reward_funcs` (weight 0). `weights`
    covers the first two groups, as PPO's reward_weights does; default 1 each. `stop_ids` are the policy's stop
    tokens, `rlhf_kit.model.stop_token_ids(tokenizer, policy)`, needed for the missing-stop penalty.
    """
    if sources.missing_eos_penalty and stop_ids is None:
        # The tokenizer alone would miss the model's own EOS, and penalize completions that did stop.
        raise ValueError("missing_eos_penalty needs the policy's stop tokens: pass "
                         "stop_ids=rlhf_kit.model.stop_token_ids(tokenizer, <the policy or its path>)")
    rewards = load_rewards(sources, policy_tokenizer, weights=weights, device=device,
                           trust_remote_code=trust_remote_code)
    weights = reward_weights(rewards.reward_model is not None, rewards.funcs, weights)
    funcs = list(rewards.funcs)
    measured = list(rewards.eval_funcs)
    if rewards.reward_model is not None:
        funcs.insert(0, RewardModelFunction(rewards.reward_model, batch_size=rewards.batch_size))
        if isinstance(rewards.reward_model, RewardEnsemble):  # the over-optimization monitor's signal, logged
            measured.insert(0, EnsembleDisagreement(funcs[0]))
    if rewards.missing_eos_penalty:
        funcs.append(MissingStopPenalty(stop_ids, rewards.missing_eos_penalty))
        weights.append(1.0)
    return funcs + measured, weights + [0.0] * len(measured), rewards.report


def import_reward_func(spec: str) -> RewardFunc:
    """A reward function from a 'module:function' import string."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"reward function {spec!r} must be an import string 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({error}); is it installed "
                         "or on PYTHONPATH?") from error
    func = getattr(module, name, None)
    if not callable(func):
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no callable {name!r}")
    return func


def as_completions(prompts: Sequence, texts: Sequence[str]) -> list:
    """Completions in the prompts' format (TRL's convention): strings for text prompts, an assistant message list for
    conversational ones."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def call_reward_func(func: RewardFunc, prompts: list, completions: list, columns: dict[str, list]) -> Tensor:
    """Run one reward function on a batch and check what it returns: (B,) float32."""
    name = getattr(func, "__name__", repr(func))
    values = func(prompts=prompts, completions=completions, **columns)
    if len(values) != len(prompts):
        raise ValueError(f"reward function {name} returned {len(values)} values for {len(prompts)} completions")
    try:
        return torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"reward function {name} must return a list of numbers, got {list(values)[:3]}...") from error
