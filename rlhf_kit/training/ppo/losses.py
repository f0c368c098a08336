"""Pure tensor math of PPO for language models: masking, KL, rewards, GAE, clipped losses.

Shape conventions used everywhere in this module:

- ``B`` is the batch (one row per prompt+response), ``T`` the response length, ``V`` the vocabulary.
- ``mask (B, T)`` is 1 on real response tokens and 0 on padding. It may be bool, int or float, but it is
  read as binary. Functions that touch padded positions say what they leave there (normally 0).
- ``logprobs (B, T)`` are log-probabilities under the policy being trained, ``old_logprobs`` under the
  policy that sampled the rollout, ``ref_logprobs`` under the frozen reference model.

Every function is pure: no module state, no in-place edits of its inputs. Losses return
``(loss, metrics)`` where ``metrics`` holds detached tensors, so logging them costs no device sync until
the caller calls ``.item()``.

References: Schulman et al. 2017 (PPO, https://arxiv.org/abs/1707.06347), Schulman et al. 2015 (GAE,
https://arxiv.org/abs/1506.02438), Ziegler et al. 2019 (adaptive KL,
https://arxiv.org/abs/1909.08593), Schulman 2020 "Approximating KL divergence"
(http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_estimate",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "missing_stop_penalty",
    "policy_loss",
    "token_rewards",
    "value_loss",
]

KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_same_shape(**tensors: Tensor) -> None:
    # A (B, T) tensor next to a (B, 1) or (T,) one broadcasts silently and gives a wrong loss; the usual
    # cause is an off-by-one between logits and labels, so name every shape in the error.
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"expected tensors of one shape, got {listed}; align them before calling")


# ---------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    Args:
        x (B, T): values; padded positions may hold anything, including inf or nan.
        mask (B, T): 1 on positions to average, 0 elsewhere.
        dim: reduce over this dim (or dims); ``None`` reduces over everything to a scalar.

    Returns:
        The mean, shaped like ``x.sum(dim)``. An empty selection gives nan (0 / 0), as ``torch.mean`` of
        an empty tensor does; this function never syncs the device to check.
    """
    _check_same_shape(x=x, mask=mask)
    keep = mask.bool()
    # torch.where rather than x * mask: a nan or inf on padding times 0 is still nan.
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = keep.to(x.dtype)
    if dim is None:
        return total.sum() / count.sum()
    return total.sum(dim) / count.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all positions where ``mask`` is 1 (one scalar for the whole batch).

    Args:
        x (B, T): values.
        mask (B, T): 1 on positions to include.
        unbiased: divide by ``n - 1`` (Bessel's correction) rather than ``n``.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: if the mask selects fewer than 2 positions (``unbiased=True``) or none
            (``unbiased=False``). Checking costs one device sync; this is called once per rollout.
    """
    n = int(mask.bool().sum().item())
    needed = 2 if unbiased else 1
    if n < needed:
        raise ValueError(
            f"masked_var needs at least {needed} unmasked position(s), the mask has {n}; "
            "use a larger batch or pass unbiased=False"
        )
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    if unbiased:
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  sum_over_processes: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Normalize ``x`` to unit variance using the statistics of its unmasked positions only.

    ``(x - mean) / sqrt(var + eps)``, where ``mean`` and the unbiased ``var`` are taken over positions with
    ``mask == 1`` across the whole batch. With ``shift_mean=False`` the mean is added back afterwards, so
    the result keeps the original mean and only the spread around it is rescaled. That is what the
    ``whiten_rewards`` option does (it is ``masked_whiten(rewards, mask, shift_mean=False)``): the sign of
    the average reward survives, unlike advantage whitening (``shift_mean=True``), which centres on 0.

    Masked-out positions are 0 in the result, whatever they held before, so padding never carries a
    stray value into GAE or a loss.

    Args:
        x (B, T): values to whiten (advantages or rewards).
        mask (B, T): 1 on real tokens.
        shift_mean: centre the result on 0 (True) or keep the original mean (False).
        eps: added to the variance so a constant input does not divide by zero.
        sum_over_processes: when each process holds part of the batch, a function that sums a tensor over all
            processes (an all-reduce); the statistics are then those of the whole batch, the same as one process
            holding all of it. ``None``: this process's batch is the whole batch.

    Returns:
        (B, T) whitened values, 0 on padding.

    Raises:
        ValueError: if fewer than 2 positions are unmasked (see :func:`masked_var`).
    """
    if sum_over_processes is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    else:
        _check_same_shape(x=x, mask=mask)
        keep = mask.bool()
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        total, count = sum_over_processes(torch.stack([torch.where(keep, x, zero).sum(), keep.to(x.dtype).sum()]))
        n = int(count.item())
        if n < 2:
            raise ValueError(f"masked_whiten needs at least 2 unmasked positions over all processes, the masks have "
                             f"{n}; use a larger batch")
        mean = total / count
        var = sum_over_processes(torch.where(keep, (x - mean) ** 2, zero).sum()) / count * (n / (n - 1))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over unmasked positions.

    1 means the value head predicts the returns perfectly, 0 means it does no better than their mean,
    below 0 means worse than the mean. Population variances are used (the ``n / (n - 1)`` factors cancel).

    Args:
        values (B, T): value predictions.
        returns (B, T): regression targets.
        mask (B, T): 1 on real tokens.

    Returns:
        A scalar tensor; nan when the returns are constant (the ratio is undefined).
    """
    _check_same_shape(values=values, returns=returns, mask=mask)
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    nan = torch.full((), float("nan"), dtype=var_returns.dtype, device=var_returns.device)
    return torch.where(var_returns > 0, 1 - var_residual / var_returns, nan)


# ---------------------------------------------------------------------------------------------------------
# KL and rewards
# ---------------------------------------------------------------------------------------------------------


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    With ``d = logprobs - ref_logprobs`` (the log-ratio policy / reference at the sampled token):

    - ``"k1"``: ``d``. Unbiased (its expectation under the policy is exactly the KL) but high-variance,
      and negative on individual tokens, so a per-token penalty can turn into a bonus.
    - ``"k2"``: ``0.5 * d**2``. Never negative and low-variance, but biased: its expectation matches the
      KL only to second order, i.e. when policy and reference are close.
    - ``"k3"``: ``exp(-d) - 1 + d``. Both unbiased (``E[exp(-d)] = 1`` under the policy) and never negative
      (``exp(u) >= 1 + u``), with lower variance than k1 when the two are close. It grows like
      ``exp(-d)`` when the reference is much likelier than the policy on a token, so it can be large
      (and overflows float32 past ``-d > 88``).

    Args:
        logprobs (B, T): log-probabilities of the sampled tokens under the policy.
        ref_logprobs (B, T): the same tokens under the reference model.
        kind: one of ``"k1"``, ``"k2"``, ``"k3"``.

    Returns:
        (B, T) per-token estimates, unmasked: padded positions hold whatever the inputs give there.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # expm1 keeps precision when d is near 0, where exp(-d) - 1 would cancel.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token in each row.

    Args:
        mask (B, T): 1 on real response tokens. Rows may be right-padded or not padded at all.

    Returns:
        (B,) long tensor of positions in ``[0, T)``.

    Raises:
        ValueError: if a row has no real token (an empty response has no position to put its score on;
            drop such rows or keep at least the stop token in the mask). Checking costs one device sync.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of the mask have no real token; drop them or keep the stop token")
    return last


def token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty on every real token plus the sequence score on the last one.

    ``rewards[b, t] = -kl_coef * kl[b, t]`` on real tokens, and ``scores[b]`` is added at
    ``t = last_token_index(mask)[b]``, the last real response token (normally the stop token). It goes
    there and not one slot later: the slot after the stop token is padding (or past the end of the
    tensor), where GAE ignores rewards, so the score would be lost or land on a token the policy never
    chose. Padded positions are 0 in both outputs.

    Args:
        scores (B,): one scalar per sequence, from the reward model or a reward function.
        logprobs (B, T): policy log-probabilities of the sampled tokens (detached).
        ref_logprobs (B, T): reference log-probabilities of the same tokens.
        mask (B, T): 1 on real response tokens.
        kl_coef: the KL penalty coefficient beta (from a KL controller's ``.value``).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``, see :func:`kl_estimate`.

    Returns:
        rewards (B, T) and kl (B, T), the per-token KL estimate, both 0 on padding.

    Example: scores ``[2.0]``, logprobs ``[[-1.0, -2.0, 0.0]]``, ref ``[[-1.5, -1.0, 0.0]]``, mask
    ``[[1, 1, 0]]``, kl_coef 0.1 gives kl ``[[0.5, -1.0, 0.0]]`` and rewards
    ``[[-0.05, 0.1 + 2.0, 0.0]]``.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != (mask.shape[0],):
        raise ValueError(f"scores must be (B,) = ({mask.shape[0]},), got {tuple(scores.shape)}")
    keep = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(keep, kl_estimate(logprobs, ref_logprobs, kl_estimator), zero)
    last = last_token_index(mask)
    # One-hot of the last real token, (B, T); adding scores through it keeps the function free of
    # in-place writes.
    at_last = torch.zeros_like(kl).scatter(1, last[:, None], 1.0)
    rewards = -kl_coef * kl + at_last * scores.to(kl.dtype)[:, None]
    return rewards, kl


def missing_stop_penalty(scores: Tensor, stopped: Tensor, missing_eos_penalty: float | None) -> Tensor:
    """Lower the score of responses that never emitted the stop token.

    Follows TRL's ``missing_eos_penalty``: ``missing_eos_penalty`` is SUBTRACTED from the score of every
    response with ``stopped == False`` (it does not replace the score), so the reward model's judgement
    still orders truncated responses among themselves. Pass a positive number to penalize; ``None``
    returns the scores unchanged.

    Args:
        scores (B,): sequence scores.
        stopped (B,) bool: whether each response contains the stop (EOS) token.
        missing_eos_penalty: amount to subtract, or None to disable.

    Returns:
        (B,) new scores; the input is not modified.
    """
    _check_same_shape(scores=scores, stopped=stopped)
    if missing_eos_penalty is None:
        return scores
    return scores - missing_eos_penalty * (~stopped.bool()).to(scores.dtype)


# ---------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation, computed backwards over the response.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V_{t+1} = A_{t+1} = 0`` after the last real token (the episode ends there, nothing to bootstrap).
    Rewards and values on padded positions are ignored, whatever they hold.

    Args:
        rewards (B, T): per-token rewards (see :func:`token_rewards`).
        values (B, T): value-head predictions from the rollout.
        mask (B, T): 1 on real tokens, one contiguous run per row (right- or left-padded).
        gamma: discount.
        lam: GAE lambda; 1 gives Monte-Carlo returns, 0 gives one-step TD.

    Returns:
        advantages (B, T) and returns (B, T) = advantages + values, both 0 on padding.

    Raises:
        ValueError: if a row's mask has a hole (1, 0, 1): the "next token" would be ambiguous.

    Example (gamma = lam = 1, so the advantage is reward-to-go minus value): rewards ``[1, 0, 2]``,
    values ``[0.5, 1, 1.5]`` give reward-to-go ``[3, 2, 2]``, advantages ``[2.5, 1, 0.5]`` and returns
    ``[3, 2, 2]``.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    keep = mask.bool()
    runs = keep[:, 0].long() + (keep[:, 1:] & ~keep[:, :-1]).sum(dim=1)
    holed = (runs > 1).nonzero().flatten().tolist()
    if holed:
        raise ValueError(f"rows {holed} of the mask have gaps; gae needs one contiguous run of real tokens")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(keep, rewards.to(values.dtype), zero)
    v = torch.where(keep, values, zero)
    # With padding zeroed, V_{t+1} = 0 after the last real token comes for free on right-padded rows;
    # the where() below also zeroes the positions before the first token of left-padded rows.
    next_value = torch.zeros_like(v[:, 0])
    running = torch.zeros_like(v[:, 0])
    reversed_advantages = []
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = torch.where(keep[:, t], delta + gamma * lam * running, zero)
        reversed_advantages.append(running)
        next_value = v[:, t]
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = torch.where(keep, advantages + v, zero)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, averaged over real tokens.

    With ``ratio = exp(logprobs - old_logprobs)``, PPO maximizes ``min(ratio * A, clip(ratio) * A)``
    where ``clip`` bounds the ratio to ``[1 - clip_range, 1 + clip_range]``; as a loss to minimize that is
    ``max(-ratio * A, -clip(ratio) * A)``. The clipped branch wins (and the token's gradient is 0) when
    the ratio has already moved past the clip range in the direction the advantage pushes it:
    ``ratio > 1 + c`` with ``A > 0``, or ``ratio < 1 - c`` with ``A < 0``.

    Args:
        logprobs (B, T): log-probabilities under the policy being trained (with grad).
        old_logprobs (B, T): log-probabilities under the rollout policy (detached).
        advantages (B, T): advantages (detached, usually whitened).
        mask (B, T): 1 on real tokens.
        clip_range: epsilon, e.g. 0.2.

    Returns:
        loss (scalar) and metrics (detached scalars):
        ``clipfrac`` fraction of real tokens where the clipped branch is active;
        ``approx_kl`` masked mean of ``0.5 * (logprobs - old_logprobs)**2`` (k2);
        ``approx_kl_k3`` masked mean of ``(ratio - 1) - log(ratio)`` (k3, unbiased for KL(old || new));
        ``ratio_mean`` and ``ratio_max`` over real tokens.

    Example (clip_range 0.2, all four tokens real): ratios ``[1.5, 0.5, 0.5, 1.5]`` and advantages
    ``[1, 1, -1, -1]`` give per-token losses ``max(-1.5, -1.2) = -1.2``, ``max(-0.5, -0.8) = -0.5``,
    ``max(0.5, 0.8) = 0.8``, ``max(1.5, 1.2) = 1.5``: loss ``0.6 / 4 = 0.15``, clipfrac ``2 / 4 = 0.5``.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    with torch.no_grad():
        minus_inf = torch.full((), float("-inf"), dtype=ratio.dtype, device=ratio.device)
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "approx_kl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask.bool(), ratio, minus_inf).max(),
        }
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, ``0.5 * masked_mean(max((v - R)**2, (v_clip - R)**2))``.

    ``v_clip = clamp(v, old_values - c, old_values + c)``: the prediction may move at most ``c`` from the
    rollout's value before the pessimistic (larger) error takes over, mirroring the policy clip.

    Args:
        values (B, T): value predictions of the model being trained (with grad).
        old_values (B, T): value predictions from the rollout (detached).
        returns (B, T): GAE returns (detached).
        mask (B, T): 1 on real tokens.
        clip_range_value: c, in the units of the value head.

    Returns:
        loss (scalar) and metrics (detached scalars): ``value_clipfrac``, the fraction of real tokens
        where the clipped error is strictly the larger one, and ``explained_variance`` of ``values``
        against ``returns``.

    Example (c = 0.2): old ``[0, 0]``, values ``[0.5, 0.1]``, returns ``[1, 1]``. Token 1 clips to 0.2,
    errors ``0.25`` vs ``0.64``, takes 0.64 (clipped); token 2 is inside the range, both errors 0.81.
    Loss ``0.5 * (0.64 + 0.81) / 2 = 0.3625``, value_clipfrac ``0.5``.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    with torch.no_grad():
        metrics = {
            "value_clipfrac": masked_mean((clipped_error > error).to(error.dtype), mask),
            "explained_variance": explained_variance(values.detach(), returns, mask),
        }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# From logits
# ---------------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``.

    The temperature must be the one used when sampling. The tokens came from
    ``softmax(logits / temperature)``; that is the behaviour policy whose ratio, KL and advantages PPO
    computes. Scoring at another temperature makes ``old_logprobs`` describe a policy that did not
    generate the data: the ratio is not 1 on the first minibatch, clipfrac is non-zero before any update,
    and the KL to the reference is measured for the wrong distribution.

    Works one row at a time in float32: ``logit[label] - logsumexp(logits)``, so the peak extra memory
    (without grad) is one ``(T, V)`` float32 row, not a full ``(B, T, V)`` log-softmax.

    Args:
        logits (B, T, V): logits aligned with ``labels`` (logits at t predict the token at t).
        labels (B, T): token ids in ``[0, V)``; put any valid id (e.g. pad) on padded positions and mask
            the result afterwards.
        temperature: > 0, the sampling temperature.

    Returns:
        (B, T) float32 log-probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; greedy decoding has no log-probs")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits (B, T, V) {tuple(logits.shape)} do not match labels (B, T) {tuple(labels.shape)}; "
            "shift logits[:, :-1] against labels[:, 1:] before calling"
        )
    rows = []
    for row_logits, row_labels in zip(logits, labels):  # (T, V), (T,)
        scaled = row_logits.float() / temperature
        picked = scaled.gather(-1, row_labels[:, None]).squeeze(-1)  # (T,)
        rows.append(picked - torch.logsumexp(scaled, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` at every position, in nats.

    ``H = -sum p log p`` with ``log p = log_softmax(logits)`` (which subtracts logsumexp, so large logits
    do not overflow). Logits of ``-inf`` (banned tokens) contribute 0 rather than ``0 * -inf = nan``.
    Computed one row at a time in float32, like :func:`logprobs_from_logits`.

    Args:
        logits (B, T, V): unnormalized logits.

    Returns:
        (B, T) float32 entropies.
    """
    rows = []
    for row_logits in logits:  # (T, V)
        logp = torch.log_softmax(row_logits.float(), dim=-1)
        p = logp.exp()
        # Zero log p where p == 0 before multiplying: a where() after the product would still send
        # nan gradients back through 0 * -inf.
        safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        rows.append(-(p * safe_logp).sum(dim=-1))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta. ``update`` does nothing; it exists so trainers need no branch."""

    def __init__(self, value: float):
        if value < 0:
            raise ValueError(f"kl coefficient must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float | str]:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        if state.get("type") != "fixed":
            raise ValueError(f"state is for a {state.get('type')!r} KL controller, not 'fixed'")
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient that tracks a target KL (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593).

    After each rollout: ``err = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + err * n_steps / horizon``. KL above the target raises beta, below lowers it, by at most
    20% per ``horizon`` samples.

    Args:
        init_kl_coef: starting beta, > 0 (a zero coefficient could never move).
        target: the KL per sequence to aim for, > 0, in the units ``current_kl`` is reported in.
        horizon: samples over which a full-size correction is applied, > 0.

    Example: init 0.1, target 6, horizon 10000. A rollout of 256 samples with KL 12 gives
    ``err = clip(1, -0.2, 0.2) = 0.2`` and ``value = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"init_kl_coef, target and horizon must all be > 0, got {init_kl_coef}, {target}, {horizon}; "
                "use FixedKLController for a constant (or zero) coefficient"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Adjust ``value`` after a rollout of ``n_steps`` samples whose mean KL was ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | str]:
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        """Restore ``value`` from a checkpoint; ``target`` and ``horizon`` stay as configured."""
        if state.get("type") != "adaptive":
            raise ValueError(f"state is for a {state.get('type')!r} KL controller, not 'adaptive'")
        if (float(state["target"]), float(state["horizon"])) != (self.target, self.horizon):
            warnings.warn(
                f"resuming an adaptive KL controller saved with target={state['target']}, "
                f"horizon={state['horizon']} under target={self.target}, horizon={self.horizon}; "
                "keeping the configured ones",
                stacklevel=2,
            )
        self.value = float(state["value"])
