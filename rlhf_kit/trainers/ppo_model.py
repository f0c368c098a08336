"""Policy, reference and critic of PPO on one frozen base model.

Memory is what decides whether PPO on an 8B model fits one 80 GB GPU, so nothing is loaded twice:

- the **policy** is a LoRA adapter named ``"default"`` (PEFT saves that one at the top of a directory, the
  standard layout every PEFT user and the export stage load);
- the **reference** is the same model with the adapters disabled (``PeftModel.disable_adapter``);
- the **critic** is, by default, a second LoRA adapter ``"critic"`` on the same base plus a float32 value head
  ``nn.Linear(hidden, 1)``; when the reward model is a LoRA adapter on that same base, the critic starts as the
  reward model (its adapter weights and its ``score`` head); with ``critic: full`` it is a separate
  sequence-classification model whose ``score`` head gives one value per token.

Only the response part of the logits is computed (``lm_head`` over T positions, not P + T), which on a 128k
vocabulary is most of the memory of a forward pass.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PeftType, TaskType, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import Tensor, nn

from ..model import adapter_base, is_adapter_dir
from ..rollout import position_ids

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
        head = model.get_submodule("score")
    except AttributeError:
        return None
    return getattr(head, "modules_to_save", {}).get("default", head)


class PolicyAndCritic(nn.Module):
    """The trainable parts of PPO in one module: what the optimizer, DDP and checkpoints see.

    ``forward`` returns the policy's response logits and the critic's values, each computed with only its own
    parameters active, so a single backward of ``policy_loss + vf_coef * value_loss`` reaches both.
    """

    def __init__(self, policy: PeftModel, value_head: nn.Linear | None = None, critic: nn.Module | None = None):
        super().__init__()
        if (value_head is None) == (critic is None):
            raise ValueError("give either a value head (LoRA critic) or a full critic model, not both or neither")
        self.policy, self.value_head, self.critic = policy, value_head, critic
        # PEFT's set_adapter freezes the adapters it does not activate. Both must stay trainable: a parameter that
        # stops requiring grad before backward() gets no gradient even though it took part in the forward. So
        # collect what each adapter trains (LoRA weights, trainable token rows, saved modules) and keep it all on.
        trainable = set()
        for adapter in [POLICY, CRITIC] if critic is None else [POLICY]:
            policy.base_model.set_adapter(adapter)
            trainable |= {id(p) for p in self.parameters() if p.requires_grad}
        self.trainable = [p for p in self.parameters() if id(p) in trainable]
        self._active = None
        self._use(POLICY)

    @property
    def lm(self) -> nn.Module:
        """The causal LM under the adapters (LoRA layers injected in place)."""
        return self.policy.get_base_model()

    @property
    def quantization_method(self):
        # transformers' Trainer reads this to avoid calling .to() on bitsandbytes weights.
        return getattr(self.lm, "quantization_method", None)

    def _use(self, adapter: str) -> None:
        if adapter == self._active:
            return
        self.policy.base_model.set_adapter(adapter)
        for p in self.trainable:
            p.requires_grad_(True)
        self._active = adapter

    def _hidden(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        # Hidden states at positions P-1 .. P+T-2, the states before each response token: (B, T, H).
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state[:, -response_length - 1 : -1]

    def policy_logits(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """Logits (B, T, V) of the policy at the positions that predict the T response tokens."""
        self._use(POLICY)
        hidden = self._hidden(self.lm, input_ids, attention_mask, response_length)
        return self.lm.get_output_embeddings()(hidden)

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """The same logits with every adapter disabled: the SFT model PPO started from."""
        with self.policy.disable_adapter():
            hidden = self._hidden(self.lm, input_ids, attention_mask, response_length)
            return self.lm.get_output_embeddings()(hidden)

    def values(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """Critic values (B, T) float32 of the state before each response token."""
        if self.critic is not None:
            hidden = self._hidden(self.critic, input_ids, attention_mask, response_length)
            return self.critic.score(hidden).squeeze(-1).float()
        self._use(CRITIC)
        try:
            hidden = self._hidden(self.lm, input_ids, attention_mask, response_length)
        finally:
            self._use(POLICY)
        return self.value_head(hidden.float()).squeeze(-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> tuple[Tensor, Tensor]:
        return (self.policy_logits(input_ids, attention_mask, response_length),
                self.values(input_ids, attention_mask, response_length))


def critic_lora_config(policy_config: LoraConfig) -> LoraConfig:
    """The critic adapter: the policy's LoRA shape, without extra trainable embedding rows or saved modules."""
    config = copy.deepcopy(policy_config)
    config.modules_to_save = None
    config.trainable_token_indices = None
    config.lora_dropout = 0.0
    return config


def build_policy_and_critic(model, peft_config: LoraConfig | None, *, critic: str, reward_model=None,
                            critic_model: nn.Module | None = None, activation_checkpointing: bool = False,
                            activation_checkpointing_kwargs: dict | None = None) -> PolicyAndCritic:
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
    if activation_checkpointing:
        # Reentrant checkpointing only back-propagates into segments whose inputs require grad, which a frozen
        # embedding never gives; non-reentrant checkpointing has no such condition.
        kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        policy.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        if critic_model is not None:
            critic_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    for part in (policy, critic_model):
        if part is not None:
            disable_dropout(part)
    return PolicyAndCritic(policy, value_head=value_head, critic=critic_model)


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
