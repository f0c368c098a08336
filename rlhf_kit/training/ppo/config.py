"""Settings of rlhf-kit's PPO trainer: transformers' TrainingArguments plus what PPO adds.

Batch sizes follow TRL's PPO (up to 1.12): one *update* (a ``global_step``) samples a rollout of
``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` prompts per process, then runs
``num_ppo_epochs`` passes over it in ``num_mini_batches`` shuffled mini-batches, each one optimizer step accumulated
over ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size`` sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from rlhf_kit.training.ppo.losses import KL_ESTIMATORS
from rlhf_kit.training.settings import StageSettings
from rlhf_kit.vllm_engine import BACKENDS, require_vllm

CRITICS = ("lora", "full")
ROLLOUT_LOGPROBS = ("auto", "sampler", "recompute")


@dataclass
class PPOConfig(StageSettings, TrainingArguments):
    """TrainingArguments for PPO with a LoRA policy, a critic on the same frozen base and a KL-penalized reward.

    Where the reward comes from is not here: recipes/ppo.py parses `rlhf_kit.rewards.RewardSources` next to it, as
    GRPO, RLOO and best-of-N do, and the trainer takes the loaded `Rewards`.

    Example (YAML, see ``recipes/configs/ppo/tiny.yaml``)::

        response_length: 16
        temperature: 0.7
        kl_coef: 0.05
    """

    # --- rewards: the sources (reward_model_path, reward_funcs, the gate...) are rlhf_kit.rewards.RewardSources
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward source, the reward model first (if any), then reward_funcs in "
                  "order. Default: 1 each. The score is the weighted sum."},
    )
    # --- critic
    critic: str = field(
        default="lora",
        metadata={"help": "'lora': a second LoRA adapter plus a value head on the policy's frozen base (no second "
                  "model in memory). 'full': a separate full sequence-classification critic (critic_model_path)."},
    )
    critic_model_path: str | None = field(
        default=None, metadata={"help": "critic 'full' only: the model to start the critic from (default: the reward "
                                "model, which must share the policy's tokenizer)."}
    )
    save_critic: bool = field(
        default=True, metadata={"help": "Also save the critic (adapter + value head, or full model) in output_dir/critic."}
    )
    # --- batch shape
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per PPO epoch."})
    total_episodes: int | None = field(
        default=None, metadata={"help": "Prompts to train on in all; default num_train_epochs * dataset size. "
                                "max_steps > 0 (updates) overrides it."}
    )
    rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Sequences per generate() and no-grad forward call during the rollout."}
    )
    gather_weights_for_generation: bool = field(
        default=True,
        metadata={"help": "FSDP2: gather the sharded weights once per rollout for sampling instead of once per new "
                  "token and layer. Needs the full model's weights on each device while sampling; set false when "
                  "they do not fit (sampling is then much slower)."},
    )
    fused_lora: bool = field(
        default=True,
        metadata={"help": "Compute the policy's and critic's LoRA layers without PEFT's full-size temporaries (the "
                  "scale on the rank-r activations, the low-rank product added in place, the same in backward): the "
                  "same function and gradients up to float rounding. At the PPO benchmark's 512x8 shape on a CPU: "
                  "about 3% more episodes/s and 20% less peak memory. Layers it does not cover (quantized base, "
                  "adapters in another dtype than the base, autocast) run PEFT's forward. Set false to run PEFT's "
                  "forward everywhere."},
    )
    generation_backend: str = field(
        default="hf",
        metadata={"help": "What samples the rollouts: 'hf' (the policy's own generate) or 'vllm' (a vLLM engine in "
                  "each process, given the merged policy weights before every rollout; log-probs are still computed "
                  "by the trainer's forward, and rollout/sampler_logprob_gap logs how far vLLM's differ)."},
    )
    rollout_logprobs: str = field(
        default="auto",
        metadata={"help": "Where the rollout's log-probs (PPO's old log-probs) come from. 'sampler': recorded by the "
                  "HF backend's generate as it samples, no extra forward pass (one fewer of the rollout's forward "
                  "passes: about 6% of an update at the benchmark's 512x8 shape); in float32 they match the training "
                  "forward's to about 3e-7 per token. 'recompute': a forward pass of the policy over the rollout, so "
                  "the first PPO ratio is exactly 1. 'auto': 'sampler' when the HF backend samples in float32, "
                  "'recompute' otherwise: in bf16/fp16 or from a quantized base, cached decoding and a full forward "
                  "differ by about 1e-2 per token, noise that PPO's clipping would act on; and vLLM's own log-probs "
                  "are only logged (rollout/sampler_logprob_gap)."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vllm backend: share of the GPU's memory vLLM may take (weights + KV cache)."}
    )
    vllm_kv_cache_gb: float | None = field(
        default=None, metadata={"help": "vllm backend: a fixed KV cache size in GB (default on CPU: 1 GB; on GPU "
                                "vllm_gpu_memory_utilization decides)."}
    )
    vllm_sleep_between_rollouts: bool = field(
        default=False, metadata={"help": "vllm backend, GPU: free vLLM's weights and KV cache during the update and "
                                 "take them back before the next rollout (one GPU shared by trainer and vLLM)."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Drop prompts longer than this many tokens (with a warning)."}
    )
    # --- sampling
    response_length: int = field(default=64, metadata={"help": "Most new tokens per response (max_new_tokens)."})
    temperature: float = field(
        default=0.7,
        metadata={"help": "Sampling temperature; the same one scales the logits when log-probs are scored. Pure "
                  "softmax sampling: no top-k / top-p, whose truncated distribution PPO's ratios would not describe."},
    )
    stop_token: str = field(
        default="eos",
        metadata={"help": "'eos': the tokenizer's EOS (plus <|im_end|> in a ChatML vocabulary) and the model's own EOS "
                  "ids, where inference stops too (rlhf_kit.model.stop_token_ids); or one token string."},
    )
    # --- KL penalty
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient beta (initial value if adaptive)."})
    kl_estimator: str = field(
        default="k1", metadata={"help": "Per-token KL estimator in the reward: 'k1' (log-ratio) or 'k3' (unbiased, >= 0)."}
    )
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef towards kl_target (Ziegler et al.)."})
    kl_target: float = field(default=6.0, metadata={"help": "Adaptive KL: target KL per sequence, in nats."})
    kl_horizon: float = field(default=10000.0, metadata={"help": "Adaptive KL: horizon in episodes."})
    # --- advantages and losses
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Rescale per-token rewards to unit variance."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range, in units of the value head."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    # --- health checks and logging
    disagreement_guard: float | None = field(
        default=None,
        metadata={"help": "With a reward ensemble: stop training (saving a checkpoint) when the members' mean "
                  "disagreement on the rollouts (reward/rm_std, logged at every update) exceeds this multiple of its "
                  "value at the first update: the policy is reaching responses the reward models were not trained "
                  "on, where over-optimization starts. E.g. 2.0. None: only logged."},
    )
    health_check_tolerance: float | None = field(
        default=1e-2,
        metadata={"help": "At the first update, the mean |log-ratio| (policy vs rollout) and, on a fresh run, the mean "
                  "|log policy - log reference| must be below this, else training stops and says why. None: off."},
    )
    log_completions: int = field(
        default=4, metadata={"help": "Sample completions written to output_dir/completions.jsonl at each logging step."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub (as TRL's configs)."})
    # --- TrainingArguments defaults that suit PPO
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=1, metadata={"help": "Log every this many PPO updates."})

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.critic in CRITICS, f"critic must be one of {CRITICS}, got {self.critic!r}"),
            (self.generation_backend in BACKENDS,
             f"generation_backend must be one of {BACKENDS}, got {self.generation_backend!r}"),
            (self.rollout_logprobs in ROLLOUT_LOGPROBS,
             f"rollout_logprobs must be one of {ROLLOUT_LOGPROBS}, got {self.rollout_logprobs!r}"),
            (not (self.rollout_logprobs == "sampler" and self.generation_backend == "vllm"),
             "rollout_logprobs: sampler takes the log-probs from the HF backend's generate; with "
             "generation_backend: vllm use 'auto' or 'recompute' (vLLM's are logged as rollout/sampler_logprob_gap)"),
            (self.kl_estimator in KL_ESTIMATORS, f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}; PPO needs sampling"),
            (self.num_ppo_epochs >= 1 and self.num_mini_batches >= 1, "num_ppo_epochs and num_mini_batches must be >= 1"),
            (self.response_length >= 1, f"response_length must be >= 1, got {self.response_length}"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}"),
            (self.cliprange > 0 and self.cliprange_value > 0, "cliprange and cliprange_value must be > 0"),
            (self.kl_coef >= 0 and self.vf_coef >= 0, "kl_coef and vf_coef must be >= 0"),
            (self.disagreement_guard is None or self.disagreement_guard > 0,
             f"disagreement_guard is a multiple of the first update's disagreement: give a number > 0 (e.g. 2.0), "
             f"got {self.disagreement_guard}"),
            (not self.adaptive_kl or self.kl_coef > 0, "adaptive_kl needs kl_coef > 0: a zero coefficient never moves"),
            (self.save_strategy in ("steps", "no"),
             f"save_strategy {self.save_strategy.value!r}: PPO counts updates, use 'steps' (every save_steps) or 'no'"),
            (self.eval_strategy in ("steps", "no"),
             f"eval_strategy {self.eval_strategy.value!r}: PPO counts updates, use 'steps' (every eval_steps) or 'no'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.generation_backend == "vllm":
            require_vllm()

    @property
    def mini_batch_size(self) -> int:
        """Sequences per optimizer step, per process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def local_batch_size(self) -> int:
        """Prompts per rollout, per process."""
        return self.mini_batch_size * self.num_mini_batches

    @property
    def batch_size(self) -> int:
        """Prompts per rollout over all processes: the episodes one update consumes."""
        return self.local_batch_size * self.world_size
