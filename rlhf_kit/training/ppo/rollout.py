"""A rollout: prompts, sampled responses, and everything PPO computes about them before the update.

Token layout used by every online stage: one row per sample, ``[left-padded prompt (P)][response (T)]``.
Left padding puts the last prompt token at column P-1 in every row, so the logits that predict the response are the
columns ``P-1 .. P+T-2`` of each row, for the whole batch at once. The response is right-padded: after the first
stop token everything is ``pad_token_id`` and masked out.

The functions here are pure (no model): token bookkeeping and the reward assembly step
(`assemble_rewards`), so score placement and the missing-stop penalty can be tested on sequences built by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from rlhf_kit.training.ppo.losses import masked_whiten, missing_stop_penalty, token_rewards


@dataclass
class Rollout:
    """One batch of B samples. Tensors are (B, ...) on one device; ``None`` until the step that fills them runs."""

    prompts: list                     # B prompts as given (strings or message lists)
    columns: dict[str, list]          # extra dataset columns, B values each (handed to reward functions)
    query_ids: Tensor                 # (B, P) left-padded prompt tokens
    query_mask: Tensor                # (B, P) 1 on real prompt tokens
    response_ids: Tensor              # (B, T) right-padded response tokens, pad after the first stop token
    response_mask: Tensor             # (B, T) 1 on real response tokens, the stop token included
    stopped: Tensor                   # (B,) bool: the response contains the stop token
    completions: list[str] = field(default_factory=list)  # B decoded responses, stop token removed
    old_logprobs: Tensor | None = None   # (B, T) log-probs of the sampling policy (rollout_logprobs: sampler's or
                                         # the training forward's)
    sampler_logprobs: Tensor | None = None  # (B, T) the same as the sampler (HF generate, vLLM) computed them
    ref_logprobs: Tensor | None = None   # (B, T) log-probs of the reference (adapter disabled)
    values: Tensor | None = None         # (B, T) critic values of the state before each response token
    reward_components: dict[str, Tensor] = field(default_factory=dict)  # (B,) CPU scores of each reward source
    scores: Tensor | None = None         # (B,) weighted reward, after the missing-stop penalty
    rewards: Tensor | None = None        # (B, T) per-token rewards: -beta * KL, plus the score on the last token
    kl: Tensor | None = None             # (B, T) per-token KL estimate, 0 on padding
    advantages: Tensor | None = None     # (B, T) whitened GAE advantages
    returns: Tensor | None = None        # (B, T) value targets

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # (B, P + T)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)  # (B, P + T)

    def select(self, index: Tensor) -> Rollout:
        """Rows `index`, with the padding columns that no selected row uses cut off (less compute per micro-batch)."""
        rows = index.tolist()
        query_mask = self.query_mask[index]
        response_mask = self.response_mask[index]
        first = int(query_mask.any(0).long().argmax())  # left padding: leading columns all pad in these rows
        width = int(response_mask.any(0).sum())  # right padding: trailing columns all pad in these rows
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("query_ids", "query_mask"):
                value = value[index][:, first:]
            elif isinstance(value, Tensor):
                value = value[index][:, :width] if value.dim() == 2 else value[index]
            elif isinstance(value, dict):
                value = {k: v[index.to(v.device)] if isinstance(v, Tensor) else [v[i] for i in rows]
                         for k, v in value.items()}
            elif isinstance(value, list) and value:
                value = [value[i] for i in rows]
            out[f.name] = value
        return Rollout(**out)


@dataclass
class UpdatePlan:
    """How one PPO update walks a rollout: the rows of each micro-batch, ``steps[epoch][step][micro]`` (one
    optimizer step per mini-batch), and the first micro-batch's training forward outputs (logits, values) when the
    rollout already ran that pass. The update takes those outputs over (`take_first_outputs`), so that once it has
    used them nothing else keeps them, and their memory, alive."""

    steps: list[list[list[Tensor]]]
    first_outputs: tuple[Tensor, Tensor] | None = None

    def take_first_outputs(self) -> tuple[Tensor, Tensor] | None:
        outputs, self.first_outputs = self.first_outputs, None
        return outputs


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> ``ids (B, P)`` left-padded with `pad_token_id`, and ``mask (B, P)``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: Sequence[Sequence], pad_value, dtype=torch.long) -> Tensor:
    """Lists of unequal length -> ``(B, T)`` with `pad_value` after each list's end."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), pad_value, dtype=dtype)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.as_tensor(list(seq), dtype=dtype)
    return out


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, as `generate` counts them for left-padded prompts (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def truncate_at_stop(response_ids: Tensor, stop_token_ids: Sequence[int], pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep each response up to and including its first stop token; pad the rest.

    Args:
        response_ids (B, T): sampled tokens; `generate` already pads finished rows, this makes it explicit.
        stop_token_ids: the ids that end a response.
        pad_token_id: written after the stop token (must differ from every stop id, or stops could not be told apart
            from padding).

    Returns:
        ids (B, T), mask (B, T) with 1 up to and including the first stop token (all 1 when there is none), and
        stopped (B,) bool.
    """
    if pad_token_id in stop_token_ids:
        raise ValueError(f"pad_token_id {pad_token_id} is also a stop token; give the tokenizer a distinct pad token "
                         "(rlhf_kit.model.prepare_tokenizer does)")
    is_stop = torch.isin(response_ids, torch.as_tensor(list(stop_token_ids), device=response_ids.device))
    # Number of stop tokens strictly before each position: 0 means "still inside the response".
    before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (before == 0).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask, is_stop.any(dim=1)


def assemble_rewards(
    scores: Tensor,
    stopped: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    kl_estimator: str,
    missing_eos_penalty: float | None,
    whiten: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-token reward PPO optimizes, from sequence scores and log-probs.

    The missing-stop penalty is subtracted from the scores of responses without a stop token; each score then
    lands on the last real response token (the stop token, or the last token of a truncated response), never one
    slot after it; every real token carries ``-kl_coef * kl``. With `whiten` the rewards are rescaled to unit
    variance over real tokens, their mean kept.

    Args:
        scores (B,): weighted reward per sample.
        stopped (B,) bool: whether each response emitted the stop token.
        logprobs (B, T), ref_logprobs (B, T): policy and reference log-probs of the sampled tokens.
        mask (B, T): 1 on real response tokens.

    Returns:
        rewards (B, T), kl (B, T) (both 0 on padding) and the penalized scores (B,).
    """
    penalized = missing_stop_penalty(scores, stopped, missing_eos_penalty)
    rewards, kl = token_rewards(penalized, logprobs, ref_logprobs, mask, kl_coef, kl_estimator)
    if whiten:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    return rewards, kl, penalized
