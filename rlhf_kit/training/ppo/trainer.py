"""PPO for language models with a LoRA policy, a LoRA (or full) critic and a frozen reference on one base model.

TRL removed its ``PPOTrainer`` in 2026 (1.12.0 was the last release with ``trl.experimental.ppo``); this is
rlhf-kit's own, in TRL's shape: a config dataclass (:class:`PPOConfig`) extending ``TrainingArguments`` and a
``transformers.Trainer`` subclass whose ``train()`` is the PPO loop, so ``report_to``, callbacks, ``save_model``
and the model card behave as in any other trainer.

    trainer = PPOTrainer(model=sft_model, args=PPOConfig(output_dir="out"), processing_class=tokenizer,
                         train_dataset=prompts, rewards=Rewards(reward_model=RewardModel.from_pretrained(...)),
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer.train()

Each update (one ``global_step``): **rollout** (sample responses, truncate after the first stop token; their
log-probs, reference log-probs and values, the first micro-batch's values from the update's own training forward pass),
**score** (reward model and reward functions, weighted; missing-stop penalty; KL penalty per token, score on the last
real token), **advantages** (GAE, whitened), **update** (``num_ppo_epochs`` over shuffled mini-batches, clipped
policy and value losses).

Departures from the paper recipe (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593), all on purpose: the reference and the critic share the policy's frozen base
(adapters), the value head starts from the reward head, old log-probs are taken from ``generate`` only where they
equal the training forward's to float32 rounding and recomputed by a forward pass elsewhere (``rollout_logprobs``:
in reduced precision cached decoding and a full forward differ by more than rounding), and micro-batch losses are
weighted by their token counts so that gradient accumulation gives the same step as one big batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from transformers import GenerationConfig, Trainer, TrainerControl, TrainerState
from transformers.trainer_utils import TrainOutput

from rlhf_kit.checkpoints import last_valid_checkpoint, staged_checkpoint, staging_dir, tensor_bytes
from rlhf_kit.errors import UserError
from rlhf_kit.training.distributed import shard_on_cpu
from rlhf_kit.training.ppo.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from rlhf_kit.model import stop_token_ids
from rlhf_kit.rewards import (
    RewardEnsemble,
    Rewards,
    as_completions,
    call_reward_func,
    disagreement,
    reward_weights,
)
from rlhf_kit.training.ppo.rollout import (
    Rollout,
    UpdatePlan,
    assemble_rewards,
    left_pad,
    right_pad,
    truncate_at_stop,
)
from rlhf_kit.training.ppo.config import PPOConfig
from rlhf_kit.training.ppo.model import CRITIC, POLICY, SampledLogprobs, build_policy_and_critic, eval_mode
from rlhf_kit.vllm_engine import VLLMEngine, merged_weights

logger = logging.getLogger(__name__)

PPO_STATE = "ppo_state.json"
COMPLETIONS_FILE = "completions.jsonl"
# Trend warnings look at this many recent updates.
TREND_WINDOW = 10


class PPOHealthError(RuntimeError):
    """The first update found the rollout and the training forward pass (or policy and reference) disagreeing."""


class PPOTrainer(Trainer):
    """Proximal Policy Optimization with a KL-penalized reward, on a LoRA policy.

    Args:
        model: the SFT policy, a causal LM (an adapter is added from `peft_config`) or a PeftModel whose adapter is
            named "default".
        args: a :class:`PPOConfig`.
        processing_class: the policy's tokenizer, with a pad token distinct from every stop token.
        train_dataset: prompt-only data, TRL's format: a `prompt` column of strings or of message lists; other
            columns are passed to reward functions as keyword arguments.
        eval_dataset: held-out prompts for :meth:`evaluate`.
        rewards: :class:`rlhf_kit.rewards.Rewards` (``load_rewards`` builds it from the config): the reward model
            (any tokenizer: completions are decoded to text), Python functions
            ``fn(prompts, completions, **columns) -> list[float]`` weighted by ``args.reward_weights``, functions
            measured at evaluation only, the missing-stop penalty and the reward model's batch size.
        peft_config: the policy's LoRA config (required unless `model` is a PeftModel).
        critic_model: the critic for ``critic: full``, a sequence-classification model sharing the policy tokenizer.
        callbacks: transformers callbacks.
    """

    _name = "PPO"

    def __init__(self, model, args: PPOConfig, processing_class, train_dataset, eval_dataset=None, *,
                 rewards: Rewards, peft_config=None, critic_model=None, callbacks=None):
        self.rewards = rewards
        reward_model = self.reward_model = rewards.reward_model
        self.reward_funcs, self.eval_reward_funcs = list(rewards.funcs), list(rewards.eval_funcs)
        self.reward_weights = reward_weights(reward_model is not None, self.reward_funcs, args.reward_weights)
        _check_names(self.reward_funcs)
        self.stop_token_ids = _stop_ids(processing_class, args.stop_token, model)
        if critic_model is not None and critic_model is getattr(reward_model, "model", None):
            raise ValueError("critic_model is the reward model itself, which training would change under PPO's feet: "
                             "load a second copy for the critic")
        if args.eval_on_start and eval_dataset is None:
            raise ValueError("eval_on_start needs an eval_dataset (held-out prompts)")
        if args.disagreement_guard is not None and not isinstance(reward_model, RewardEnsemble):
            raise UserError("disagreement_guard watches the disagreement of a reward ensemble's members: give "
                            "reward_model_path a reward stage trained with ensemble_size > 1, or unset the guard")
        # An ensemble's critic starts as its first member, as a single reward model's critic starts as that model.
        critic_source = reward_model.critic_reference() if isinstance(reward_model, RewardEnsemble) else reward_model
        policy = build_policy_and_critic(
            model, peft_config, critic=args.critic, reward_model=critic_source, critic_model=critic_model,
            activation_checkpointing=args.activation_checkpointing,
            activation_checkpointing_kwargs=args.activation_checkpointing_kwargs, fused_lora=args.fused_lora)
        if args.generation_backend == "vllm" and policy.quantization_method is not None:
            raise UserError("generation_backend: vllm samples from the policy with its LoRA merged, which a quantized "
                            "(QLoRA) base cannot hold; use generation_backend: hf, or LoRA on an unquantized base")
        # Our own sampling config replaces the model's: a checkpoint's generation_config.json may set top_p, top_k
        # or a repetition penalty, and any of them would sample from a distribution the log-probs do not describe.
        policy.lm.generation_config = GenerationConfig(
            max_new_tokens=args.response_length, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
            eos_token_id=self.stop_token_ids, pad_token_id=processing_class.pad_token_id,
            bos_token_id=processing_class.bos_token_id, use_cache=True)
        self._encoder = _prompt_encoder(processing_class)
        train_dataset = _drop_long_prompts(train_dataset, self._encoder, args.max_prompt_length)
        if len(train_dataset) < args.batch_size:
            raise ValueError(f"the training set has {len(train_dataset)} prompts, fewer than one rollout batch "
                             f"({args.batch_size} = per_device_train_batch_size * gradient_accumulation_steps * "
                             "num_mini_batches * processes); use a smaller batch or more prompts")
        super().__init__(model=policy, args=args, processing_class=processing_class, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks)
        shard_on_cpu(self)
        self._recompute_logprobs = self._recomputes_logprobs()
        if args.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(args.kl_coef)
        self._trend: list[tuple[float, float, float]] = []  # (score, kl, response length) per update
        self._engine: VLLMEngine | None = None  # generation_backend: vllm, built at the first rollout
        self._engine_holds: int | None = None  # the update whose weights the engine holds
        self._warned: set[str] = set()
        self._disagreement_start: float | None = None  # the ensemble's disagreement at the first update

    # ------------------------------------------------------------------------------------------------ the loop

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """Run PPO until ``max_steps`` updates; resume from a checkpoint directory (or True: the newest one)."""
        start = time.time()
        self._setup_training(resume_from_checkpoint)
        args = self.args
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if args.eval_on_start and self.state.global_step == 0 and self.eval_dataset is not None:
            self.evaluate()
        updates = 0
        while self.state.global_step < self.state.max_steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            rollout = self.sample(self._prompt_batch(self.state.global_step))
            self._release_engine()
            stats = self.train_on(rollout)
            self._losses.append(stats["loss/total"])
            updates += 1
            self._end_step(rollout, stats)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.is_in_train = False
        metrics = {"train_runtime": time.time() - start, "train_updates": updates}
        # The mean over every update of the run: a resumed run restores the losses of the updates before it.
        train_loss = float(np.mean(self._losses)) if self._losses else float("nan")
        return TrainOutput(self.state.global_step, train_loss, metrics)

    def train_on(self, rollout: Rollout) -> dict[str, float]:
        """One PPO update on a freshly sampled rollout (`sample`): its rewards, reference log-probs and values, its
        advantages, then ``num_ppo_epochs`` over its mini-batches. Returns the update's statistics."""
        # The reward model runs first, so that its activations never share memory with those that the training
        # forward pass below keeps for the update.
        components = self.reward_components(rollout)
        plan = self._update_plan(rollout)
        # The first micro-batch's training forward pass also gives its rollout values (see _update_plan).
        self._score_logprobs_and_values(rollout, plan)
        self.score(rollout, components)
        self.compute_advantages(rollout)
        return self.update(rollout, plan)

    def _setup_training(self, resume_from_checkpoint) -> None:
        args = self.args
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_valid_checkpoint(args.output_dir)
            if resume_from_checkpoint is None:
                raise FileNotFoundError(f"resume_from_checkpoint=True but {args.output_dir} has no complete "
                                        "checkpoint-*")
        if args.fp16:
            raise ValueError("fp16 needs loss scaling, which this trainer does not do; use bf16 (or a bfloat16 dtype)")
        self.is_in_train = True
        self.control = TrainerControl()
        max_steps = self._num_updates()
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero(),
            max_steps=max_steps, num_train_epochs=math.ceil(max_steps / self._batches_per_epoch()),
            train_batch_size=args.batch_size)
        self.state.compute_steps(args, max_steps)
        self.create_optimizer_and_scheduler(num_training_steps=max_steps)
        self._fresh_start = resume_from_checkpoint is None
        self._losses: list[float] = []  # "loss/total" of every update, for the run's mean training loss
        if resume_from_checkpoint:
            self._load_weights(str(resume_from_checkpoint))  # before sharding: full tensors into full parameters
        if self.is_fsdp_enabled:
            # FSDP2 replaces the parameters by shards, so the optimizer must be prepared with the model to follow.
            if self.accelerator.state.fsdp_plugin.activation_checkpointing:
                raise ValueError("fsdp_activation_checkpointing wraps each layer in a checkpoint that cannot replay "
                                 "which adapter (policy or critic) ran; set it to false in the accelerate config and "
                                 "use the recipe's activation_checkpointing: true instead")
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            self.model_wrapped = self.model
        else:
            self.model_wrapped = self.accelerator.prepare(self.model)
        for name in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, name, getattr(self, name))
        if resume_from_checkpoint:
            self._load_training_state(str(resume_from_checkpoint))
        self._health_checked = args.health_check_tolerance is None
        self.model.train()

    def _end_step(self, rollout: Rollout, stats: dict[str, float]) -> None:
        """Advance the step counter and the schedules, then log / evaluate / save as the callbacks decide."""
        args = self.args
        self.state.global_step += 1
        self.state.epoch = self.state.global_step / self._batches_per_epoch()
        self.lr_scheduler.step()
        metrics = self._rollout_metrics(rollout)
        # The controller moves after the rollout it measured, as in Ziegler et al.; a resumed run restores it.
        self.kl_ctl.update(metrics["objective/kl"], args.batch_size)
        metrics.update(stats, episode=self.state.global_step * args.batch_size,
                       learning_rate=self.lr_scheduler.get_last_lr()[0])
        self._warn_on_trends(metrics, rollout)
        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if args.disagreement_guard is not None and self._disagreement_rose(metrics["reward/rm_std"]):
            self.control.should_training_stop = self.control.should_save = self.control.should_log = True
        if self.control.should_log:
            self.log(metrics)
            self._log_samples(rollout)
            self.control.should_log = False
        if self.control.should_evaluate and self.eval_dataset is not None:
            self.evaluate()
        self.control.should_evaluate = False
        if self.control.should_save:
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(args, self.state, self.control)
            self.control.should_save = False

    # ------------------------------------------------------------------------------------------------ rollout

    def rollout(self, batch: dict[str, list]) -> Rollout:
        """Sample one response per prompt and compute what PPO needs about it, without gradients.

        `batch` holds dataset columns (`prompt` and any others), one list entry per prompt.
        """
        rollout = self.sample(batch)
        self._score_logprobs_and_values(rollout)
        return rollout

    @torch.no_grad()
    def sample(self, batch: dict[str, list]) -> Rollout:
        """One response per prompt, truncated after its first stop token, and its decoded text; not yet scored."""
        prompts = list(batch["prompt"])
        columns = {k: list(v) for k, v in batch.items() if k != "prompt"}
        tokenizer, device = self.processing_class, self.args.device
        query_ids, query_mask = left_pad([self._encoder(p) for p in prompts], tokenizer.pad_token_id)
        query_ids, query_mask = query_ids.to(device), query_mask.to(device)
        if self.args.generation_backend == "vllm":
            responses, sampler_logprobs = self._sample_with_vllm(query_ids, query_mask)
        else:
            responses, sampler_logprobs = self._sample_with_hf(query_ids, query_mask)
        response_ids, response_mask, stopped = truncate_at_stop(responses, self.stop_token_ids, tokenizer.pad_token_id)
        rollout = Rollout(prompts, columns, query_ids, query_mask, response_ids, response_mask, stopped)
        rollout.completions = self._decode(rollout)
        if sampler_logprobs is not None:
            rollout.sampler_logprobs = sampler_logprobs[:, : response_ids.shape[1]] * response_mask
        return rollout

    def _recomputes_logprobs(self) -> bool:
        """``rollout_logprobs`` resolved: True when a forward pass gives the rollout's log-probs, False when the
        sampler's are used. 'auto' trusts the sampler only where cached decoding is exact to float32 rounding: the
        HF backend, float32 weights, no autocast, no TF32 matmuls, no quantized base."""
        if self.args.rollout_logprobs != "auto":
            return self.args.rollout_logprobs == "recompute"
        lm = self.model.lm
        float32 = all(p.dtype == torch.float32 for p in lm.parameters() if p.is_floating_point())
        exact = (float32 and self.model.quantization_method is None and self.accelerator.mixed_precision == "no"
                 and torch.get_float32_matmul_precision() == "highest")
        return self.args.generation_backend != "hf" or not exact

    def _sample_with_hf(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) new tokens from the policy's own `generate`, right-padded, and their (B, T) log-probs."""
        pieces, logprobs = [], []
        with eval_mode(self.model), self.accelerator.autocast():
            for chunk in torch.arange(len(query_ids)).split(self.args.rollout_forward_batch_size):
                recorder = SampledLogprobs(self.args.temperature)
                generated = self.model(query_ids[chunk], query_mask[chunk], part="generate",
                                       gather_weights=self.args.gather_weights_for_generation,
                                       logits_processor=[recorder])
                pieces.append(generated[:, query_ids.shape[1]:])  # (b, T_chunk): the new tokens only
                logprobs.append(recorder.logprobs(pieces[-1]))
        width = max(p.shape[1] for p in pieces)
        pad = self.processing_class.pad_token_id
        return (torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in pieces]),
                torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in logprobs]))

    def _sample_with_vllm(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) new tokens from this process's vLLM engine, right-padded, and vLLM's log-probs of them.

        The engine is given the policy as it is now (LoRA merged) when the weights changed since the last push. Each
        prompt's sample is seeded from the run's random stream, so a resumed run draws what the interrupted one
        would have, whatever the batch around it. Sampling settings are the HF path's: the training temperature,
        no top-k / top-p, the same stop tokens, response_length new tokens at most.
        """
        args, engine = self.args, self._vllm_engine()
        if self._engine_holds != self.state.global_step:
            engine.load_weights(merged_weights(self.model.lm, POLICY))
            self._engine_holds = self.state.global_step
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(query_ids.cpu(), query_mask.cpu())]
        seeds = torch.randint(0, 2**31 - 1, (len(rows),)).tolist()
        out = engine.generate(rows, max_tokens=args.response_length, temperature=args.temperature,
                              stop_token_ids=self.stop_token_ids, seeds=seeds)
        device = query_ids.device
        responses = right_pad(out.token_ids, self.processing_class.pad_token_id).to(device)
        return responses, right_pad(out.logprobs, 0.0, dtype=torch.float32).to(device)

    def _vllm_engine(self) -> VLLMEngine:
        """This process's vLLM engine, built at the first rollout for the policy's architecture and dtype."""
        if self._engine is None:
            args, lm = self.args, self.model.lm
            positions = getattr(lm.config, "max_position_embeddings", None) or 4096
            kv_cache_gb = args.vllm_kv_cache_gb
            if kv_cache_gb is None and not torch.cuda.is_available():
                kv_cache_gb = 1.0  # vLLM's CPU backend otherwise reserves a share of all the machine's memory
            self._engine = VLLMEngine.for_model(
                lm, max_model_len=min(positions, (args.max_prompt_length or 4096) + args.response_length),
                memory_fraction=args.vllm_gpu_memory_utilization, kv_cache_gb=kv_cache_gb, seed=args.seed,
                enable_sleep_mode=args.vllm_sleep_between_rollouts)
        return self._engine

    def close(self) -> None:
        """Shut the vLLM engine down (generation_backend: vllm); a later rollout would start a new one."""
        if self._engine is not None:
            self._engine.close()
            self._engine, self._engine_holds = None, None

    def _release_engine(self) -> None:
        """With vllm_sleep_between_rollouts, give vLLM's GPU memory back to training until the next rollout."""
        if self._engine is not None and self.args.vllm_sleep_between_rollouts:
            self._engine.sleep()
            self._engine_holds = None  # its weights are gone: the next rollout pushes them again

    def _score_logprobs_and_values(self, rollout: Rollout, plan: UpdatePlan | None = None) -> None:
        """Reference log-probs, values and old log-probs: the sampler's, or (``rollout_logprobs`` resolved to
        'recompute') the training forward pass's at the sampling temperature.

        With the update's `plan`, the values of its first micro-batch come from the training forward pass the
        update needs anyway, run here with gradients; its outputs go into ``plan.first_outputs`` for `update`, and no
        pass without gradients computes those values.
        """
        shape, device = rollout.response_ids.shape, rollout.response_ids.device
        ref, values = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        old = torch.zeros(shape, device=device) if self._recompute_logprobs else rollout.sampler_logprobs
        skip = torch.zeros(len(rollout), dtype=torch.bool)
        first_step = plan.steps[0][0] if plan is not None else None  # the micro-batches of the first optimizer step
        train_rows = first_step[0] if first_step else None
        if train_rows is not None:
            skip[train_rows.cpu()] = True
        temperature = self.args.temperature
        with torch.no_grad(), eval_mode(self.model), self.accelerator.autocast():
            for chunk in torch.arange(len(rollout)).split(self.args.rollout_forward_batch_size):
                part = rollout.select(chunk)
                ids, mask, width = part.input_ids, part.attention_mask, part.response_ids.shape[1]
                if self._recompute_logprobs:
                    logits = self.model(ids, mask, width, part="policy")
                    old[chunk, :width] = logprobs_from_logits(logits, part.response_ids, temperature)
                    del logits
                ref_logits = self.model(ids, mask, width, part="reference")
                ref[chunk, :width] = logprobs_from_logits(ref_logits, part.response_ids, temperature)
                del ref_logits
                rows = chunk[~skip[chunk]]  # not the first micro-batch's: its training forward pass gives those
                if len(rows):
                    part = part if len(rows) == len(chunk) else rollout.select(rows)
                    width = part.response_ids.shape[1]
                    values[rows, :width] = self.model(part.input_ids, part.attention_mask, width, part="values")
        rollout.old_logprobs, rollout.ref_logprobs, rollout.values = old, ref, values
        if train_rows is None:
            return
        # Last of the policy model's passes, so that nothing runs it between this forward and its backward.
        part = rollout.select(train_rows)  # the plan's rows are on the rollout's device already
        with self._gradient_sync(len(first_step) == 1):  # DDP decides at the forward pass (see update)
            plan.first_outputs = self._training_forward(part)
        values[train_rows, : part.response_ids.shape[1]] = plan.first_outputs[1].detach()

    def _decode(self, rollout: Rollout) -> list[str]:
        """Response texts without the stop token and padding: what reward models and functions judge.

        Every other token is kept, special ones included: a policy that emits ``<|im_start|>`` or a stray EOS-like
        token in the middle of its answer is judged on that, not on a cleaned-up text it never produced.
        """
        keep = rollout.response_mask.bool() & ~torch.isin(
            rollout.response_ids, torch.tensor(self.stop_token_ids, device=rollout.response_ids.device))
        rows = [ids[k].tolist() for ids, k in zip(rollout.response_ids, keep)]
        return self.processing_class.batch_decode(rows, skip_special_tokens=False)

    # ------------------------------------------------------------------------------------------------ score

    def reward_components(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Each reward source's (B,) scores on CPU: the reward model raw and normalized, then each function."""
        out = {}
        if isinstance(self.reward_model, RewardEnsemble):
            # Members already normalized: their aggregate is the score, and their spread the over-optimization signal.
            members = self.reward_model.score_members_for(rollout.prompts, rollout.completions,
                                                          batch_size=self.rewards.batch_size)
            out["rm_raw"] = out["rm"] = self.reward_model.combine(members)
            out["rm_std"] = disagreement(members)
        elif self.reward_model is not None:
            raw = self.reward_model.score_texts_for(rollout.prompts, rollout.completions, normalize=False,
                                                    batch_size=self.rewards.batch_size)
            out["rm_raw"] = raw
            out["rm"] = (raw - self.reward_model.offset) / self.reward_model.scale
        completions = as_completions(rollout.prompts, rollout.completions)
        for func in self.reward_funcs:
            out[_func_name(func)] = call_reward_func(func, rollout.prompts, completions, rollout.columns)
        return out

    def score(self, rollout: Rollout, components: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Fill ``scores``, ``rewards`` and ``kl`` of the rollout; return the per-source scores (`components`:
        `reward_components` of this rollout, when already computed)."""
        components = self.reward_components(rollout) if components is None else components
        total = sum(w * components[s] for w, s in zip(self.reward_weights, self._sources()))
        rollout.reward_components = components
        self.assemble_rewards(rollout, total.to(rollout.response_ids.device))
        return components

    def _sources(self) -> list[str]:
        """Names of the weighted reward sources, in the order of ``reward_weights``."""
        return (["rm"] if self.reward_model is not None else []) + [_func_name(f) for f in self.reward_funcs]

    def assemble_rewards(self, rollout: Rollout, scores: torch.Tensor) -> None:
        """Per-token rewards from (B,) scores: missing-stop penalty, KL penalty, score on the last real token."""
        rollout.rewards, rollout.kl, rollout.scores = assemble_rewards(
            scores, rollout.stopped, rollout.old_logprobs, rollout.ref_logprobs, rollout.response_mask,
            kl_coef=self.kl_ctl.value, kl_estimator=self.args.kl_estimator,
            missing_eos_penalty=self.rewards.missing_eos_penalty, whiten=self.args.whiten_rewards)

    def compute_advantages(self, rollout: Rollout) -> None:
        """GAE over the per-token rewards, then advantages whitened over the real tokens of every process's rollout
        (as one process holding the whole batch would: per-process statistics would give each process its own
        scale and centre)."""
        advantages, rollout.returns = gae(rollout.rewards, rollout.values, rollout.response_mask,
                                          self.args.gamma, self.args.lam)
        total = (lambda t: self.accelerator.reduce(t, reduction="sum")) if self.accelerator.num_processes > 1 else None
        rollout.advantages = masked_whiten(advantages, rollout.response_mask, sum_over_processes=total)

    # ------------------------------------------------------------------------------------------------ update

    def _update_plan(self, rollout: Rollout) -> UpdatePlan:
        """The rows of each micro-batch of each optimizer step of each PPO epoch: ``plan.steps[epoch][step][micro]``.

        Each epoch shuffles the rows into mini-batches (one optimizer step each) and splits a mini-batch into
        micro-batches of ``per_device_train_batch_size`` rows, shortest rows first: each micro-batch is cut to its
        longest row (`Rollout.select`), so rows of like length together compute less padding. Which rows share a
        micro-batch does not change the step (`update` accumulates the mini-batch's token mean however it is split).

        Drawn before the rollout is scored: until the first optimizer step the policy is the one that sampled, so
        the first micro-batch's training forward pass also gives its rollout values (`_score_logprobs_and_values`).
        """
        args = self.args
        lengths = rollout.query_mask.sum(1) + rollout.response_mask.sum(1)
        epochs = []
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(len(rollout), device=rollout.response_ids.device)
            steps = []
            for mini_batch in order.split(args.mini_batch_size):
                if len(mini_batch) > args.per_device_train_batch_size:
                    mini_batch = mini_batch[lengths[mini_batch].argsort(stable=True)]
                steps.append(list(mini_batch.split(args.per_device_train_batch_size)))
            epochs.append(steps)
        return UpdatePlan(epochs)

    def update(self, rollout: Rollout, plan: UpdatePlan | None = None) -> dict[str, float]:
        """``num_ppo_epochs`` passes over shuffled mini-batches; one optimizer step per mini-batch, as `plan` (from
        `_update_plan`, drawn here if not given) lays them out."""
        args = self.args
        totals: dict[str, list[float]] = defaultdict(list)
        plan = plan if plan is not None else self._update_plan(rollout)
        for steps in plan.steps:
            for micro_batches in steps:
                mini_batch = torch.cat(micro_batches)
                # Each micro-batch's token-mean loss is weighted by its share of the mini-batch's tokens, so the
                # accumulated gradient is that of the token mean over the whole mini-batch, however it is split.
                # DDP then averages the processes' gradients, so each divides by the processes' mean token count:
                # the step is the token mean over all processes' mini-batches, as one process with all of them.
                tokens = self._mean_over_processes({"tokens": rollout.response_mask[mini_batch].sum()})["tokens"]
                for i, micro in enumerate(micro_batches):
                    part = rollout.select(micro)
                    with self._gradient_sync(i == len(micro_batches) - 1):
                        loss, metrics = self._ppo_loss(part, rollout, plan.take_first_outputs())
                        self.accelerator.backward(loss * part.response_mask.sum() / tokens)
                    for key, value in metrics.items():
                        totals[key].append(float(value))
                max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else math.inf
                grad_norm = self.accelerator.clip_grad_norm_(self.model.trainable, max_norm)
                totals["grad_norm"].append(float(grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {key: float(np.nanmean(values)) for key, values in totals.items()}

    def _gradient_sync(self, sync: bool):
        """Gradient accumulation: no all-reduce until the last micro-batch of a step. The context must hold both
        that micro-batch's forward pass (DDP decides there) and its backward pass (FSDP2 decides there)."""
        return nullcontext() if sync else self.accelerator.no_sync(self.model_wrapped)

    def _training_forward(self, part: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, values) of the response positions of `part`, with gradients: the update's forward pass."""
        return self.model_wrapped(part.input_ids, part.attention_mask, part.response_ids.shape[1])

    def _ppo_loss(self, part: Rollout, rollout: Rollout, outputs: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped PPO loss of micro-batch `part`; `outputs`: its training forward pass's, when already run."""
        mask = part.response_mask
        logits, values = outputs if outputs is not None else self._training_forward(part)
        logprobs = logprobs_from_logits(logits, part.response_ids, self.args.temperature)
        if not self._health_checked:
            self._health_check(logprobs.detach(), part, rollout)
        pg_loss, pg_metrics = policy_loss(logprobs, part.old_logprobs, part.advantages, mask, self.args.cliprange)
        vf_loss, vf_metrics = value_loss(values, part.values, part.returns, mask, self.args.cliprange_value)
        loss = pg_loss + self.args.vf_coef * vf_loss
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits.detach() / self.args.temperature), mask)
        metrics = {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), "loss/total": loss.detach(),
                   "policy/entropy": entropy, "policy/clipfrac": pg_metrics["clipfrac"],
                   "policy/approx_kl": pg_metrics["approx_kl"], "policy/ratio_mean": pg_metrics["ratio_mean"],
                   "policy/ratio_max": pg_metrics["ratio_max"], "value/clipfrac": vf_metrics["value_clipfrac"],
                   "value/explained_variance": vf_metrics["explained_variance"]}
        return loss, metrics

    def _health_check(self, logprobs: torch.Tensor, part: Rollout, rollout: Rollout) -> None:
        """Before the first optimizer step: ratio = 1, and (fresh run) policy = reference, within tolerance."""
        self._health_checked = True
        tolerance = self.args.health_check_tolerance
        ratio_gap = float(masked_mean((logprobs - part.old_logprobs).abs(), part.response_mask))
        if not ratio_gap <= tolerance:
            raise PPOHealthError(
                f"PPO health check: before any update the training forward pass gives log-probs that differ from the "
                f"rollout's by {ratio_gap:.3g} per token on average (tolerance {tolerance}), so the PPO ratio is not "
                "1 and clipping would act on noise. Usual causes: dropout still active in the model or adapter, "
                "a custom forward that treats padding or position ids differently in train and eval mode, or "
                "non-deterministic mixed-precision kernels (then raise health_check_tolerance).")
        if not self._fresh_start:
            return
        kl_gap = float(masked_mean((rollout.old_logprobs - rollout.ref_logprobs).abs(), rollout.response_mask))
        if not kl_gap <= tolerance:
            raise PPOHealthError(
                f"PPO health check: before any update the policy differs from the reference by {kl_gap:.3g} nats per "
                f"token on average (tolerance {tolerance}); a new LoRA adapter starts as the identity (B = 0), so the "
                "KL must start at 0. Usual causes: a policy adapter that is already trained (resume from its "
                "checkpoint instead), an adapter whose disable_adapter() does not restore the base, or "
                "modules_to_save that were changed before training.")

    # ------------------------------------------------------------------------------------------------ data

    def _batches_per_epoch(self) -> int:
        return len(self.train_dataset) // self.args.batch_size

    def _num_updates(self) -> int:
        args = self.args
        if args.max_steps > 0:
            return args.max_steps
        episodes = args.total_episodes or int(args.num_train_epochs * len(self.train_dataset))
        return max(1, episodes // args.batch_size)

    def _prompt_batch(self, step: int) -> dict[str, list]:
        """This process's prompts for update `step`: a pure function of (seed, step), so a resumed run continues
        with the very prompts the interrupted one would have used."""
        args = self.args
        epoch, index = divmod(step, self._batches_per_epoch())
        order = torch.randperm(len(self.train_dataset), generator=torch.Generator().manual_seed(args.seed + epoch))
        start = index * args.batch_size + args.process_index * args.local_batch_size
        return self.train_dataset[order[start : start + args.local_batch_size].tolist()]

    # ------------------------------------------------------------------------------------------------ logging

    def _rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        mask = rollout.response_mask.float()
        kl = (rollout.kl * mask).sum(1)
        non_score = -self.kl_ctl.value * kl
        metrics = {
            "objective/kl": kl.mean(), "objective/kl_coef": torch.tensor(self.kl_ctl.value),
            "objective/scores": rollout.scores.mean(), "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (rollout.scores + non_score).mean(),
            "objective/response_length": mask.sum(1).mean(), "objective/stop_rate": rollout.stopped.float().mean(),
        }
        for name, values in rollout.reward_components.items():
            metrics[f"reward/{name}"] = values.mean()
        if rollout.sampler_logprobs is not None and self._recompute_logprobs:
            # How far the sampler's log-probs are from the trainer's: the importance-sampling gap between them.
            gap = (rollout.sampler_logprobs - rollout.old_logprobs).abs() * mask
            metrics["rollout/sampler_logprob_gap"] = gap.sum() / mask.sum().clamp(min=1)
        return self._mean_over_processes(metrics)

    def _mean_over_processes(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(self.args.device) for v in metrics.values()])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="mean")
        return dict(zip(metrics, stacked.tolist()))

    def _log_samples(self, rollout: Rollout) -> None:
        count = min(self.args.log_completions, len(rollout))
        if count == 0 or not self.is_world_process_zero():
            return
        rows = [{"step": self.state.global_step, "prompt": rollout.prompts[i], "completion": rollout.completions[i],
                 "score": round(float(rollout.scores[i]), 4), "stopped": bool(rollout.stopped[i])} for i in range(count)]
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.args.output_dir) / COMPLETIONS_FILE, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        for row in rows:
            logger.info("step %d  score %+.3f  %r", row["step"], row["score"], row["completion"])

    def _warn_on_trends(self, metrics: dict[str, float], rollout: Rollout) -> None:
        """One warning each for two ways PPO fails quietly: drifting without learning, and collapsing."""
        self._trend.append((metrics["objective/scores"], metrics["objective/kl"], metrics["objective/response_length"]))
        recent = self._trend[-TREND_WINDOW:]
        if len(recent) == TREND_WINDOW and "flat" not in self._warned:
            half = TREND_WINDOW // 2
            score_gain = np.mean([s for s, _, _ in recent[half:]]) - np.mean([s for s, _, _ in recent[:half]])
            kl_gain = np.mean([k for _, k, _ in recent[half:]]) - np.mean([k for _, k, _ in recent[:half]])
            score_spread = float(rollout.scores.std()) if len(rollout) > 1 else 1.0
            if kl_gain > 1.0 and score_gain < 0.05 * max(score_spread, 1e-3):
                self._warned.add("flat")
                warnings.warn(f"PPO: over the last {TREND_WINDOW} updates the KL grew by {kl_gain:.2f} nats while the "
                              f"score changed by {score_gain:+.3f}: the policy is drifting without earning reward. "
                              "Lower learning_rate, raise kl_coef, or check the reward model.", RuntimeWarning,
                              stacklevel=2)
        distinct = len(set(rollout.completions)) / len(rollout)
        if "collapse" not in self._warned and (metrics["objective/response_length"] < 1.5 or
                                               (len(rollout) >= 8 and distinct < 0.2)):
            self._warned.add("collapse")
            warnings.warn(f"PPO: responses collapsed (mean length {metrics['objective/response_length']:.1f} tokens, "
                          f"{distinct:.0%} distinct): the policy found one answer the reward likes. Raise kl_coef, "
                          "lower learning_rate, or look at completions.jsonl for a reward-model exploit.", RuntimeWarning,
                          stacklevel=2)

    def _disagreement_rose(self, value: float) -> bool:
        """Whether the ensemble's disagreement on this update's rollouts passed the guard (and say so once)."""
        if self._disagreement_start is None:
            self._disagreement_start = value
        if not guard_fires(self._disagreement_start, value, self.args.disagreement_guard):
            return False
        warnings.warn(f"PPO: stopped at update {self.state.global_step}: the reward ensemble's disagreement on the "
                      f"rollouts rose to {value:.3f}, over {self.args.disagreement_guard}x its {self._disagreement_start:.3f} "
                      "at the first update (disagreement_guard). The policy is moving where the reward models were "
                      "not trained, where gold quality usually starts to fall; the checkpoint of this update is saved. "
                      "Raise kl_coef or use a conservative reward_aggregate to go further.", RuntimeWarning,
                      stacklevel=2)
        return True

    # ------------------------------------------------------------------------------------------------ evaluate

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample one response per held-out prompt (training temperature, fixed seed) and score it.

        Returns ``{prefix}_reward`` (the weighted training score, before the missing-stop penalty),
        ``{prefix}_reward/<source>`` for the reward model (``rm``, ``rm_raw``), each reward function and each
        evaluation-only function, ``{prefix}_kl`` (sum over tokens of log pi - log ref, the k1 estimate of
        KL(pi || ref) per response, averaged), ``{prefix}_stop_rate`` and ``{prefix}_response_length``.
        """
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        dataset = dataset.shard(self.args.world_size, self.args.process_index)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # evaluation never shifts the training random stream
            torch.manual_seed(self.args.seed)
            for start in range(0, len(dataset), self.args.local_batch_size):
                for name, values in self._evaluate_batch(dataset[start : start + self.args.local_batch_size]).items():
                    sums[name] = sums[name] + values.sum()
        means = self._mean_over_processes({name: total / len(dataset) for name, total in sums.items()})
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in means.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _evaluate_batch(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        rollout = self.rollout(batch)
        components = self.reward_components(rollout)
        completions = as_completions(rollout.prompts, rollout.completions)
        for func in self.eval_reward_funcs:
            components[_func_name(func)] = call_reward_func(func, rollout.prompts, completions, rollout.columns)
        out = {f"reward/{name}": values for name, values in components.items()}
        out["reward"] = sum(w * components[s] for w, s in zip(self.reward_weights, self._sources()))
        mask = rollout.response_mask.float()
        out["kl"] = ((rollout.old_logprobs - rollout.ref_logprobs) * mask).sum(1).cpu()
        out["stop_rate"] = rollout.stopped.float().cpu()
        out["response_length"] = mask.sum(1).cpu()
        return out

    # ------------------------------------------------------------------------------------------------ save

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor (both adapters, value head or full critic), whole and on CPU, by parameter name.

        Under FSDP2 each is gathered from its shards, a collective every process must join; only the trainable
        parameters are gathered, never the frozen base.
        """
        state = {}
        for name, param in self.model.named_trainable():
            tensor = param.detach()
            state[name] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).to("cpu", copy=True)
        return state

    def _save(self, output_dir: str | None = None, state_dict=None, with_critic: bool | None = None) -> None:
        """The policy adapter in PEFT's standard layout, the tokenizer, and with save_critic the critic in critic/.

        Every process must call it (the sharded weights are gathered first); the main process writes.
        """
        output_dir = output_dir or self.args.output_dir
        with_critic = self.args.save_critic if with_critic is None else with_critic
        model = self.accelerator.unwrap_model(self.model)
        state = self._trainable_state()
        critic_state = None
        if with_critic and model.critic is not None:  # a whole model: frozen tensors and buffers too
            critic_state = get_model_state_dict(model.critic, options=StateDictOptions(full_state_dict=True,
                                                                                        cpu_offload=True))
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        policy_state = _strip_prefix(state, "policy.")
        model.policy.save_pretrained(output_dir, selected_adapters=[POLICY], state_dict=policy_state)
        if with_critic:
            critic_dir = Path(output_dir) / CRITIC
            if model.critic is None:
                # PEFT writes a non-default adapter in a folder named after it: critic/.
                model.policy.save_pretrained(output_dir, selected_adapters=[CRITIC], state_dict=policy_state)
                save_file(_strip_prefix(state, "value_head."), str(critic_dir / "value_head.safetensors"))
            else:
                model.critic.save_pretrained(critic_dir, state_dict=critic_state)
        self.processing_class.save_pretrained(output_dir)

    def _save_checkpoint(self) -> None:
        """checkpoint-N: adapters, value head, optimizer, scheduler, KL controller, RNG, data position, state.

        Written into tmp-checkpoint-N and renamed when complete, so a kill or a full disk part-way never leaves a
        checkpoint-N that a resume would trip over.
        """
        final = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        # The optimizer state by parameter name, whole tensors: the same file whether it was sharded or not.
        optimizer_state = get_optimizer_state_dict(self.model, _inner_optimizer(self.optimizer),
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        needed = tensor_bytes(optimizer_state) + sum(p.numel() * p.element_size() for p in self.model.trainable)
        if self.args.should_save:
            shutil.rmtree(staging_dir(final), ignore_errors=True)  # left by a save that was killed
        self.accelerator.wait_for_everyone()
        with staged_checkpoint(final, needed, write=self.args.should_save) as ckpt:
            self._save(str(ckpt), with_critic=True)
            ckpt.mkdir(parents=True, exist_ok=True)
            torch.save(_rng_state(), ckpt / f"rng_state_{self.args.process_index}.pth")
            if self.args.should_save:
                torch.save(optimizer_state, ckpt / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), ckpt / "scheduler.pt")
                (ckpt / PPO_STATE).write_text(json.dumps(self._ppo_state(), indent=2))
                self.state.save_to_json(str(ckpt / "trainer_state.json"))  # last: what completeness checks read
            self.accelerator.wait_for_everyone()  # every process's RNG file is in before the rename
        if self.args.should_save:
            self._rotate_checkpoints()

    def _ppo_state(self) -> dict:
        epoch, index = divmod(self.state.global_step, self._batches_per_epoch())
        return {"kl_controller": self.kl_ctl.state_dict(), "data_epoch": epoch, "data_batch": index,
                "dataset_size": len(self.train_dataset), "batch_size": self.args.batch_size,
                "warned": sorted(self._warned), "trend": self._trend, "losses": self._losses,
                "disagreement_start": self._disagreement_start}

    def _load_weights(self, ckpt: str) -> None:
        """The adapters and value head (or full critic) of a checkpoint, into the model before it is prepared."""
        model = self.model
        set_peft_model_state_dict(model.policy, load_peft_weights(ckpt), adapter_name=POLICY)
        critic_dir = os.path.join(ckpt, CRITIC)
        if model.critic is None:
            set_peft_model_state_dict(model.policy, load_peft_weights(critic_dir), adapter_name=CRITIC)
            model.value_head.load_state_dict(load_file(os.path.join(critic_dir, "value_head.safetensors")))
        else:
            model.critic.load_state_dict(type(model.critic).from_pretrained(critic_dir).state_dict())

    def _load_training_state(self, ckpt: str) -> None:
        """Optimizer, scheduler, trainer state, KL controller, trends and RNG of a checkpoint (model prepared)."""
        optimizer_state = torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, _inner_optimizer(self.optimizer), optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=True))
        saved = TrainerState.load_from_json(os.path.join(ckpt, "trainer_state.json"))
        self.state.global_step, self.state.epoch, self.state.log_history = saved.global_step, saved.epoch, saved.log_history
        ppo_state = json.loads(Path(ckpt, PPO_STATE).read_text())
        if (ppo_state["dataset_size"], ppo_state["batch_size"]) != (len(self.train_dataset), self.args.batch_size):
            warnings.warn(f"resuming {ckpt} with another dataset size or batch size than it was saved with "
                          f"({ppo_state['dataset_size']}, {ppo_state['batch_size']}); the prompt order will differ")
        self.kl_ctl.load_state_dict(ppo_state["kl_controller"])
        self._warned, self._trend = set(ppo_state["warned"]), [tuple(t) for t in ppo_state["trend"]]
        self._losses = list(ppo_state.get("losses", []))  # absent in checkpoints saved before rlhf-kit recorded it
        self._disagreement_start = ppo_state.get("disagreement_start")
        _set_rng_state(torch.load(os.path.join(ckpt, f"rng_state_{self.args.process_index}.pth"), weights_only=True))
        logger.info("resumed from %s at update %d", ckpt, self.state.global_step)

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        checkpoints = sorted(Path(self.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in checkpoints[:-limit]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------------------------


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's AcceleratedOptimizer (prepared under FSDP), or the optimizer itself."""
    return getattr(optimizer, "optimizer", optimizer)


def _rng_state() -> dict:
    """Every random stream as plain numbers and tensors, which ``torch.load(weights_only=True)`` reads back: a
    checkpoint is loaded without unpickling arbitrary objects (a crafted pickle could run code)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(python_state), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
             "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.random.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.random.set_rng_state(state["cuda"])


def guard_fires(start: float, value: float, guard: float) -> bool:
    """Whether disagreement `value` has risen past `guard` times its first value `start` (a start of 0, members that
    agree exactly, fires on any disagreement at all)."""
    return value > guard * start if start > 0 else value > 0


def _func_name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _check_names(reward_funcs: list) -> None:
    # Each source's scores are logged and summed by name (reward/<name>), next to the reward model's rm / rm_raw.
    names = [_func_name(f) for f in reward_funcs]
    if len(set(names)) != len(names) or {"rm", "rm_raw", "rm_std"} & set(names):
        raise ValueError(f"reward functions need distinct names, other than 'rm' / 'rm_raw' / 'rm_std': got {names}")


def _stop_ids(tokenizer, stop_token: str, model) -> list[int]:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; call rlhf_kit.model.prepare_tokenizer (pad must differ "
                         "from EOS, or stop tokens could not be told apart from padding)")
    if stop_token == "eos":
        ids = stop_token_ids(tokenizer, model)  # the model's own EOS too: where inference stops, so does PPO
    else:
        token_id = tokenizer.convert_tokens_to_ids(stop_token)
        if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
            raise ValueError(f"stop_token {stop_token!r} is not one token of the tokenizer's vocabulary; give 'eos' or "
                             "a token string such as '<|im_end|>'")
        ids = [token_id]
    if not ids or tokenizer.pad_token_id in ids:
        raise ValueError(f"the pad token ({tokenizer.pad_token!r}) is also a stop token; PPO needs them distinct: "
                         "call rlhf_kit.model.prepare_tokenizer, which adds <|pad|>")
    return ids


def _prompt_encoder(tokenizer) -> Callable[[str | list], list[int]]:
    """Prompt -> token ids: the chat template with a generation prompt for messages, plain encoding for text."""

    def encode(prompt):
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"]
        if tokenizer.chat_template is None:
            raise ValueError("conversational prompts need a tokenizer with a chat template; use the SFT stage's "
                             "tokenizer (it has one) or plain-text prompts")
        return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]

    return encode


def _drop_long_prompts(dataset, encode, max_prompt_length: int | None):
    if "prompt" not in dataset.column_names:
        raise ValueError(f"PPO needs prompt-only data with a 'prompt' column; got columns {dataset.column_names}")
    if max_prompt_length is None:
        return dataset
    keep = [i for i, p in enumerate(dataset["prompt"]) if len(encode(p)) <= max_prompt_length]
    if len(keep) < len(dataset):
        warnings.warn(f"dropped {len(dataset) - len(keep)} of {len(dataset)} prompts longer than "
                      f"max_prompt_length={max_prompt_length} tokens", stacklevel=3)
    return dataset.select(keep)
