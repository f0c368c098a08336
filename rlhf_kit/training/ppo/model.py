"""Policy, reference and critic of PPO on one frozen base model.

Memory is what decides whether PPO on an 8B model fits one 80 GB GPU, so nothing is loaded twice:

- the **policy** is a LoRA adapter named ``"default"`` (PEFT saves that one at the top of a directory, the
  standard layout every PEFT user and the export stage load);
- the **reference** is the same model with the adapters disabled (``PeftModel.disable_adapter``);
- the **critic** is, by default, a second LoRA adapter ``"critic"`` on the same base plus a float32 value head
  ``nn.Linear(hidden, 1)``; when the reward model is a LoRA adapter on that same base, the critic starts as the
  reward model (its adapter weights and its ``score`` head); with ``critic: full`` it is a separate
  sequence-classification model whose ``score`` head gives one value per token.

Only the response part of the logits is computed (``lm_head`` over T + 1 positions, not P + T), which on a 128k
vocabulary is most of the memory of a forward pass. The logits come from the causal LM's own forward (with
``logits_to_keep``), so whatever an architecture does after ``lm_head`` (Gemma-2's final soft-capping, Granite's
``logits_scaling``, Cohere's ``logit_scale``) is in the log-probs PPO trains on, as it is in what ``generate`` samples.

Adapters are switched by routing, never by ``requires_grad``: both adapters stay trainable throughout, and the
adapter a checkpointed layer ran with is part of what activation checkpointing replays in the backward pass.
Every use of the weights (sampling, scoring, the training forward) goes through :meth:`PolicyAndCritic.forward`,
so a model sharded by FSDP2 gathers its weights through the root module's hooks.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PeftType, TaskType, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from transformers import LogitsProcessor

from rlhf_kit.model import HEAD, adapter_base, is_adapter_dir
from rlhf_kit.training.fused_lora import fuse_lora
from rlhf_kit.training.ppo.losses import logprobs_from_logits
from rlhf_kit.training.ppo.rollout import position_ids

POLICY, CRITIC = "default", "critic"
# Config fields under which transformers models keep dropout probabilities.
_DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "activation_dropout", "resid_pdrop",
                   "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
                   "classifier_dropout", "summary_first_dropout")


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: ``nn.Dropout`` modules, dropout attributes and config fields.

    PPO's ratio compares two forward passes of the same weights; with dropout they differ at random, so the ratio
    is not 1 before the first step and clipping fires on noise. Llama applies its attention dropout inside the
    attention function from an ``attention_dropout`` attribute copied from the config at init, not through an
    ``nn.Dropout`` module, hence the attributes and the configs too.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for owner in (module, getattr(module, "config", None)):
            for name in _DROPOUT_FIELDS:
                if isinstance(getattr(owner, name, None), float):
                    setattr(owner, name, 0.0)


def reward_head(reward_model) -> nn.Linear | None:
    """The reward model's ``score`` layer (unwrapping PEFT's modules_to_save), or None if it has none."""
    model = getattr(reward_model, "model", None)
    if model is None:
        return None
    try:
        head = model.get_submodule(HEAD)
    except AttributeError:
        return None
    copies = getattr(head, "modules_to_save", None)  # PEFT's wrapper: one trained copy per adapter
    if copies is None:
        return head
    active = [name for name in getattr(head, "active_adapters", ["default"]) if name in copies]
    return copies[active[0]] if active else head


class PolicyAndCritic(nn.Module):
    """The trainable parts of PPO in one module: what the optimizer, DDP/FSDP and checkpoints see.

    ``forward(..., part=...)`` is the one entry point: ``"both"`` (training) returns the policy's response logits and
    the critic's values, each computed with only its own adapter active, so a single backward of
    ``policy_loss + vf_coef * value_loss`` reaches both; ``"policy"``, ``"reference"`` and ``"values"`` return one
    of them; ``"generate"`` samples from the policy.
    """

    PARTS = ("both", "policy", "reference", "values", "generate")

    def __init__(self, policy: PeftModel, value_head: nn.Linear | None = None, critic: nn.Module | None = None):
        super().__init__()
        if (value_head is None) == (critic is None):
            raise ValueError("give either a value head (LoRA critic) or a full critic model, not both or neither")
        if "logits_to_keep" not in inspect.signature(policy.get_base_model().forward).parameters:
            raise ValueError(f"{type(policy.get_base_model()).__name__} has no `logits_to_keep` argument, which PPO "
                             "needs to compute response log-probs through the model's own output head; use a "
                             "transformers architecture that has it (Llama, Qwen, Mistral, Gemma, Granite, Cohere...)")
        self.policy, self.value_head, self.critic = policy, value_head, critic
        # FSDP2's transformer-based wrap (accelerate) shards each class named here as its own unit.
        self._no_split_modules = list(getattr(self.lm, "_no_split_modules", None) or [])
        # PEFT's set_adapter routes the shared base through one adapter *and* freezes the others. Freezing is wrong
        # here twice over: a parameter that stops requiring grad before backward() gets no gradient although it
        # took part in the forward, and under activation checkpointing the recomputed forward must save exactly the
        # tensors the first one did. So record the routing PEFT sets up for each adapter (every wrapper's active
        # adapter: LoRA layers, saved modules, trainable tokens) and later switch by restoring it, nothing else.
        adapters = [POLICY, CRITIC] if critic is None else [POLICY]
        self._routing: dict[str, list[tuple[nn.Module, object]]] = {}
        trainable = set()
        for adapter in adapters:
            policy.base_model.set_adapter(adapter)
            trainable |= {id(p) for p in self.parameters() if p.requires_grad}
            self._routing[adapter] = [(m, copy.copy(m._active_adapter)) for m in policy.modules()
                                      if hasattr(m, "_active_adapter")]
        self._trainable_names = [n for n, p in self.named_parameters() if id(p) in trainable]
        for p in self.trainable:
            p.requires_grad_(True)
        self._active = None
        self._use(POLICY)

    @property
    def lm(self) -> nn.Module:
        """The causal LM under the adapters (LoRA layers injected in place)."""
        return self.policy.get_base_model()

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Both adapters' parameters and the value head (or full critic), by name: looked up on every call, because
        FSDP2 replaces the parameter objects."""
        params = dict(self.named_parameters())
        return [(n, params[n]) for n in self._trainable_names]

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable()]

    @property
    def quantization_method(self):
        # transformers' Trainer reads this to avoid calling .to() on bitsandbytes weights.
        return getattr(self.lm, "quantization_method", None)

    def _use(self, adapter: str) -> None:
        if adapter == self._active:
            return
        for module, active in self._routing[adapter]:
            module._active_adapter = copy.copy(active)
        self.policy.base_model.active_adapter = adapter
        self._active = adapter

    @contextlib.contextmanager
    def _using(self, adapter: str):
        previous = self._active
        self._use(adapter)
        try:
            yield
        finally:
            self._use(previous)

    def checkpoint_context(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for ``torch.utils.checkpoint``: the recomputation in backward runs with the adapter that
        was active in the forward. Without it, backward recomputes every checkpointed layer with whichever adapter is
        active then (the policy's), and the critic's gradients come out wrong (or, with another rank, raise)."""
        return contextlib.nullcontext(), self._using(self._active)

    def enable_activation_checkpointing(self, kwargs: dict | None = None) -> None:
        kwargs = dict(kwargs or {})
        if kwargs.setdefault("use_reentrant", False):
            # Reentrant checkpointing takes no context_fn (so it cannot replay the adapter) and only back-propagates
            # into segments whose inputs require grad, which a frozen embedding never gives.
            raise ValueError("PPO needs non-reentrant activation checkpointing (the critic adapter must be replayed "
                             "in the backward pass): drop use_reentrant from activation_checkpointing_kwargs")
        self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={
            **kwargs, "context_fn": self.checkpoint_context})
        if self.critic is not None:
            self.critic.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)

    def _hidden(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        # Hidden states at positions P-1 .. P+T-2, the states before each response token: (B, T, H).
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state[:, -response_length - 1 : -1]

    def policy_logits(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """Logits (B, T, V) of the policy at the positions that predict the T response tokens."""
        self._use(POLICY)
        return response_logits(self.lm, input_ids, attention_mask, response_length)

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """The same logits with every adapter disabled: the SFT model PPO started from."""
        try:
            with self.policy.disable_adapter():
                return response_logits(self.lm, input_ids, attention_mask, response_length)
        finally:
            # peft 0.21's disable_adapter freezes every adapter and re-enables only the active one on exit.
            for p in self.trainable:
                p.requires_grad_(True)

    def values(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """Critic values (B, T) float32 of the state before each response token."""
        if self.critic is not None:
            hidden = self._hidden(self.critic, input_ids, attention_mask, response_length)
            values = self.critic.score(hidden).float()
        else:
            with self._using(CRITIC):
                hidden = self._hidden(self.lm, input_ids, attention_mask, response_length)
            values = self.value_head(hidden.float())
        # (B, T, 1) -> (B, T), copied rather than viewed: FSDP2 warns of views returned by a root module's forward.
        return values.squeeze(-1).clone()

    def generate(self, input_ids: Tensor, attention_mask: Tensor, gather_weights: bool = True,
                 logits_processor: list | None = None) -> Tensor:
        """Sample from the policy with ``self.lm.generation_config``; (B, P + T_new)."""
        self._use(POLICY)
        with gathered_for_generation(self) if gather_weights else contextlib.nullcontext():
            return self.policy.generate(input_ids=input_ids, attention_mask=attention_mask,
                                        logits_processor=logits_processor)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_length: int | None = None,
                part: str = "both", **kwargs):
        if part == "both":
            return (self.policy_logits(input_ids, attention_mask, response_length),
                    self.values(input_ids, attention_mask, response_length))
        if part == "generate":
            return self.generate(input_ids, attention_mask, **kwargs)
        if part == "policy":
            return self.policy_logits(input_ids, attention_mask, response_length)
        if part == "reference":
            return self.reference_logits(input_ids, attention_mask, response_length)
        if part == "values":
            return self.values(input_ids, attention_mask, response_length)
        raise ValueError(f"part must be one of {self.PARTS}, got {part!r}")


def response_logits(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
    """Logits (B, T, V) at positions P-1 .. P+T-2 of ``[prompt (P)][response (T)]`` rows, from the model's forward.

    ``logits_to_keep`` as an index tensor computes the head at those T positions only (and gives a new tensor, not
    a view, which FSDP2 asks of a root module's outputs). Going through the forward (not ``lm_head`` on hidden
    states) keeps every transform an architecture applies after the head, exactly as in the logits ``generate``
    samples from.
    """
    width = input_ids.shape[1]
    keep = torch.arange(width - response_length - 1, width - 1, device=input_ids.device)
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
             use_cache=False, logits_to_keep=keep)
    return out.logits


class SampledLogprobs(LogitsProcessor):
    """Records, during ``generate``, the log-probability of each token it samples, at the sampling temperature.

    ``generate`` runs custom processors after its own (none under PPO's generation config: no minimum length,
    banned words or penalties) and before the temperature warper, so this one sees the model's own logits (every
    transform the architecture applies after ``lm_head`` included) and scores them exactly as
    :func:`logprobs_from_logits` scores the training forward's. A step's token is only known at the next call (it is
    the last column of ``input_ids`` then), so one (B, V) row of logits is kept between calls, never all T.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self._last: Tensor | None = None
        self._steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._last is not None:
            self._steps.append(self._score(input_ids[:, -1]))
        self._last = scores.detach().clone()  # a later processor may change `scores` in place
        return scores

    def _score(self, tokens: Tensor) -> Tensor:
        # The B rows as one (1, B, V) row: one logsumexp call per step, not B (same per-row arithmetic).
        return logprobs_from_logits(self._last[None], tokens[None], self.temperature).T  # (B, 1)

    def logprobs(self, new_tokens: Tensor) -> Tensor:
        """(B, T_new) log-probs of ``new_tokens``, the (B, T_new) tokens this ``generate`` call returned."""
        if self._last is None or len(self._steps) + 1 != new_tokens.shape[1]:
            raise RuntimeError(f"recorded {len(self._steps) + (self._last is not None)} sampling steps for "
                               f"{new_tokens.shape[1]} new tokens")
        return torch.cat([*self._steps, self._score(new_tokens[:, -1])], dim=1)


def _reshards_after_forward(unit: FSDPModule) -> bool:
    # torch 2.13 has a setter (set_reshard_after_forward) but no getter; a group reshards after forward exactly when
    # it has a post-forward mesh.
    groups = unit._get_fsdp_state()._fsdp_param_groups
    return any(group.post_forward_mesh_info is not None for group in groups)


@contextlib.contextmanager
def gathered_for_generation(module: nn.Module):
    """Under FSDP2, gather every shard once for a whole ``generate`` call and free them after it.

    Left alone, FSDP2 all-gathers each decoder layer before its forward and frees it after, which ``generate`` does
    once per new token: T all-gathers of the whole model per rollout instead of one. The price is the full weights
    on every device for the duration of sampling (set ``gather_weights_for_generation: false`` for models whose
    full weights do not fit one device: then sampling is slow but needs only one layer at a time).
    Not sharded: nothing to do.
    """
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    reshard = {unit: _reshards_after_forward(unit) for unit in units}
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(reshard[unit], recurse=False)
            if reshard[unit]:
                unit.reshard()


def critic_lora_config(policy_config: LoraConfig) -> LoraConfig:
    """The critic adapter: the policy's LoRA shape, without extra trainable embedding rows or saved modules."""
    config = copy.deepcopy(policy_config)
    config.modules_to_save = None
    config.trainable_token_indices = None
    config.lora_dropout = 0.0
    return config


def build_policy_and_critic(model, peft_config: LoraConfig | None, *, critic: str, reward_model=None,
                            critic_model: nn.Module | None = None, activation_checkpointing: bool = False,
                            activation_checkpointing_kwargs: dict | None = None,
                            fused_lora: bool = False) -> PolicyAndCritic:
    """Put the policy adapter (and the critic adapter + value head) on `model`, or wrap an existing PeftModel."""
    if isinstance(model, PeftModel):
        policy = model
        if POLICY not in policy.peft_config:
            raise ValueError(f"the policy PeftModel must hold its adapter under the name {POLICY!r}")
    elif peft_config is None:
        raise ValueError("PPOTrainer trains the policy as a LoRA adapter, so the reference model is the same weights "
                         "with the adapter disabled: pass peft_config (use_peft: true in the recipe)")
    else:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        policy = get_peft_model(model, peft_config, adapter_name=POLICY)
    value_head = None
    if critic == "lora":
        value_head = _add_critic(policy, reward_model)
    elif critic_model is None:
        raise ValueError("critic: full needs a critic model (critic_model_path, or the reward model)")
    for part in (policy, critic_model):
        if part is not None:
            disable_dropout(part)
    if fused_lora:
        fuse_lora(policy)
    model = PolicyAndCritic(policy, value_head=value_head, critic=critic_model)
    if activation_checkpointing:
        model.enable_activation_checkpointing(activation_checkpointing_kwargs)
    return model


def _add_critic(policy: PeftModel, reward_model) -> nn.Linear:
    """Add the critic adapter and return its float32 value head: a copy of the reward model when one fits.

    When the reward model is a LoRA adapter on the very base the policy starts from (the pipeline's case: both are
    trained from the SFT model), the critic adapter gets its weights and the value head its ``score`` head, so the
    critic starts as the reward model itself, as TRL's PPO starts its value model. The head alone is not copied
    onto another backbone: read from hidden states it was not trained on, it predicts noise, and on the tiny
    pipeline that noisy baseline kept the explained variance at 0 and the policy from learning. Otherwise the critic
    starts as a fresh adapter and a zero head (values 0, an unbiased baseline that the first updates fit).
    """
    lm = policy.get_base_model()
    source = _reward_adapter(reward_model, lm)
    if source is None:
        policy.add_adapter(CRITIC, critic_lora_config(policy.peft_config[POLICY]))
    else:
        config, weights = source
        policy.add_adapter(CRITIC, config)
        set_peft_model_state_dict(policy, weights, adapter_name=CRITIC)
    hidden = lm.config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1, bias=True, dtype=torch.float32, device=next(lm.parameters()).device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    score = reward_head(reward_model)
    if source is not None and score is not None and score.weight.shape == head.weight.shape:
        # The reward model scores (w . h + b - offset) / scale: folding offset and scale into the copy makes the
        # critic's first values estimates of the normalized score PPO is given, not of the raw logit.
        with torch.no_grad():
            head.weight.copy_(score.weight.float() / reward_model.scale)
            bias = score.bias.float() if score.bias is not None else torch.zeros(1)
            head.bias.copy_((bias.to(head.bias.device) - reward_model.offset) / reward_model.scale)
    return head


def _reward_adapter(reward_model, lm: nn.Module) -> tuple[LoraConfig, dict] | None:
    """The reward model's LoRA config and weights (without its head), if it is an adapter on `lm`'s own base."""
    metadata = getattr(reward_model, "metadata", None) or {}
    source = metadata.get("source")
    if not source or not is_adapter_dir(source):
        return None
    base = metadata.get("base_model") or adapter_base(source)
    if not base or Path(base).resolve() != Path(lm.config._name_or_path).resolve():
        return None
    config = LoraConfig.from_pretrained(source)
    if config.peft_type != PeftType.LORA:
        return None
    config.task_type, config.modules_to_save, config.trainable_token_indices = TaskType.CAUSAL_LM, None, None
    config.lora_dropout, config.inference_mode = 0.0, False
    weights = {k: v for k, v in load_peft_weights(source).items() if ".lora_" in k}
    return config, weights


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Eval mode for rollouts: enables the KV cache under gradient checkpointing; numerically equal to train mode
    because dropout is off (which the first-update health check verifies)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
