"""Tests of rlhf_kit.training.ppo.losses: each function against a hand computation or a naive Python loop.

Expected values marked "by hand" are derived in the test's docstring, so a failure can be checked on
paper without trusting either implementation.
"""

import math
import warnings

import pytest
import torch

from rlhf_kit.training.ppo.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    missing_stop_penalty,
    policy_loss,
    token_rewards,
    value_loss,
)

# Two right-padded rows of lengths 3 and 5, and one full row, used across tests.
MASK = torch.tensor(
    [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
)
LENGTHS = [3, 5, 2]


def _with_padding_garbage(x, mask, value=1e6):
    """Copy of x with every padded position overwritten; results must not change."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


def _close(actual, expected, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
        rtol=tol,
    )


# ---------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------


def test_masked_mean_by_hand():
    """Real values 1, 2, 3 | 4, 5 | : global mean 15 / 5 = 3; per-row means 2 and 4.5."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    _close(masked_mean(x, mask), 3.0)
    _close(masked_mean(x, mask, dim=1), [2.0, 4.5])
    _close(masked_mean(x, mask.bool()), 3.0)  # bool masks work the same


def test_masked_mean_matches_loop_and_ignores_padding():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    values = [x[b, t].item() for b in range(3) for t in range(LENGTHS[b])]
    _close(masked_mean(x, MASK), sum(values) / len(values))
    _close(masked_mean(_with_padding_garbage(x, MASK), MASK), masked_mean(x, MASK))
    row_means = [sum(x[b, : LENGTHS[b]].tolist()) / LENGTHS[b] for b in range(3)]
    _close(masked_mean(x, MASK, dim=1), row_means)


def test_masked_mean_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 1))


def test_masked_var_by_hand():
    """Real 2, 4, 6 (mean 4, squared deviations 4, 0, 4 sum to 8): unbiased 8 / 2 = 4, biased 8 / 3."""
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    _close(masked_var(x, mask), 4.0)
    _close(masked_var(x, mask, unbiased=False), 8.0 / 3.0)


def test_masked_var_needs_enough_positions():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.ones(1, 3), torch.tensor([[1, 0, 0]]))
    with pytest.raises(ValueError, match="at least 1"):
        masked_var(torch.ones(1, 3), torch.zeros(1, 3), unbiased=False)


def test_masked_whiten_by_hand():
    """Real 2, 4, 6: mean 4, unbiased var 4, std 2, so whitened -1, 0, 1; padding becomes 0.

    With shift_mean=False the mean is added back: 3, 4, 5.
    """
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    _close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-5)
    _close(masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]], tol=1e-5)


def test_masked_whiten_uses_only_real_positions():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    out = masked_whiten(x, MASK)
    _close(masked_mean(out, MASK), 0.0, tol=1e-5)
    _close(masked_var(out, MASK), 1.0, tol=1e-5)
    assert (out[~MASK.bool()] == 0).all()
    _close(masked_whiten(_with_padding_garbage(x, MASK), MASK), out)
    kept = masked_whiten(x, MASK, shift_mean=False)
    _close(masked_mean(kept, MASK), masked_mean(x, MASK), tol=1e-5)


def test_masked_whiten_over_processes_equals_whitening_the_whole_batch():
    """Two "processes" hold rows 0 and 1-2 (different token counts). With a sum over both, each half whitens with
    the statistics of all three rows, as one process holding them all would; without it, with its own."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    halves = [slice(0, 1), slice(1, 3)]
    partial_sums = []

    def sum_over_processes(value):  # the other half's contribution, computed by hand: what all_reduce returns
        partial_sums.append(value)
        other = [h for h in halves if h != current][0]
        if value.dim() == 1:
            keep = MASK[other].bool()
            return value + torch.stack([torch.where(keep, x[other], 0.0).sum(), keep.float().sum()])
        full = masked_mean(x, MASK)
        return value + torch.where(MASK[other].bool(), (x[other] - full) ** 2, 0.0).sum()

    whole = masked_whiten(x, MASK)
    for current in halves:
        _close(masked_whiten(x[current], MASK[current], sum_over_processes=sum_over_processes), whole[current],
               tol=1e-5)
        assert not torch.allclose(masked_whiten(x[current], MASK[current]), whole[current], atol=1e-3)
    assert len(partial_sums) == 4  # two sums (mean and count, then the variance) per process


def test_explained_variance_by_hand():
    """returns 1, 2, 3 (population var 2/3); values 1, 2, 2 leave residuals 0, 0, 1 (var 1/3 - 1/9 = 2/9).

    1 - (2/9) / (2/3) = 2/3. Perfect values give 1; the constant mean gives 0.
    """
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    _close(explained_variance(torch.tensor([[1.0, 2.0, 2.0, 9.0]]), returns, mask), 2.0 / 3.0)
    _close(explained_variance(returns, returns, mask), 1.0)
    _close(explained_variance(torch.full((1, 4), 2.0), returns, mask), 0.0)
    assert torch.isnan(explained_variance(returns, torch.ones(1, 4), mask))


# ---------------------------------------------------------------------------------------------------------
# KL and rewards
# ---------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    """d = logp - logr = 0.5 and -1: k1 = d; k2 = d^2 / 2 = 0.125, 0.5; k3 = exp(-d) - 1 + d."""
    logp = torch.tensor([[-1.0, -2.0]])
    logr = torch.tensor([[-1.5, -1.0]])
    _close(kl_estimate(logp, logr, "k1"), [[0.5, -1.0]])
    _close(kl_estimate(logp, logr, "k2"), [[0.125, 0.5]])
    _close(kl_estimate(logp, logr, "k3"), [[math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0]])
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, logr, "k4")


def test_kl_estimators_on_samples_from_a_known_categorical():
    """Tokens drawn from the policy p: k1 and k3 average to the exact KL(p || q); k2 and k3 are >= 0."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((p * (p / q).log()).sum())  # about 0.194 nats
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=generator)[None, :]
    logp, logq = p.log()[tokens], q.log()[tokens]
    for kind in ("k1", "k3"):
        assert abs(kl_estimate(logp, logq, kind).mean().item() - exact) < 0.01, kind
    assert (kl_estimate(logp, logq, "k3") >= 0).all()
    assert (kl_estimate(logp, logq, "k2") >= 0).all()
    assert (kl_estimate(logp, logq, "k1") < 0).any()  # the unbiased k1 is negative on some tokens


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 2, 0]
    assert last_token_index(MASK).tolist() == [n - 1 for n in LENGTHS]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def test_token_rewards_by_hand():
    """Docstring example: kl = [0.5, -1], rewards = -0.1 * kl with score 2 added at the last real token.

    rewards = [-0.05, 0.1 + 2.0, 0]; the padded slot stays 0 (not the score).
    """
    rewards, kl = token_rewards(
        scores=torch.tensor([2.0]),
        logprobs=torch.tensor([[-1.0, -2.0, 0.0]]),
        ref_logprobs=torch.tensor([[-1.5, -1.0, -7.0]]),
        mask=torch.tensor([[1, 1, 0]]),
        kl_coef=0.1,
    )
    _close(kl, [[0.5, -1.0, 0.0]])
    _close(rewards, [[-0.05, 2.1, 0.0]])


def test_token_rewards_score_placement_on_rows_of_different_lengths():
    generator = torch.Generator().manual_seed(2)
    logp, logr = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl = token_rewards(scores, logp, logr, MASK, kl_coef=0.05, kl_estimator="k3")
    for b, length in enumerate(LENGTHS):
        for t in range(5):
            expected_kl = math.exp(logr[b, t] - logp[b, t]) - 1 - (logr[b, t] - logp[b, t]) if t < length else 0.0
            expected = -0.05 * expected_kl + (scores[b].item() if t == length - 1 else 0.0)
            _close(kl[b, t], expected_kl, tol=1e-5)
            _close(rewards[b, t], expected, tol=1e-5)
    again = token_rewards(scores, _with_padding_garbage(logp, MASK), logr, MASK, 0.05, "k3")
    _close(again[0], rewards)
    _close(again[1], kl)


def test_token_rewards_rejects_bad_scores_shape():
    with pytest.raises(ValueError, match="scores must be"):
        token_rewards(torch.zeros(3, 1), torch.zeros(3, 5), torch.zeros(3, 5), MASK, 0.1)


def test_missing_stop_penalty_subtracts_from_rows_without_stop():
    scores = torch.tensor([1.0, -0.5, 2.0, 0.0])
    stopped = torch.tensor([True, False, True, False])
    _close(missing_stop_penalty(scores, stopped, 1.0), [1.0, -1.5, 2.0, -1.0])
    _close(missing_stop_penalty(scores, stopped, None), scores)
    _close(scores, [1.0, -0.5, 2.0, 0.0])  # input untouched


def test_missing_stop_penalty_from_constructed_rows():
    """Rows of token ids with EOS = 2: only rows containing a 2 count as stopped."""
    eos = 2
    responses = torch.tensor([[5, 6, 2, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    stopped = (responses == eos).any(dim=1)
    out = missing_stop_penalty(torch.tensor([0.3, 0.3, 0.3]), stopped, missing_eos_penalty=0.5)
    _close(out, [0.3, -0.2, 0.3])


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------


def _gae_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE per row with Python floats, bootstrapping 0 after the last real token."""
    batch, width = len(lengths), len(rewards[0])
    advantages = [[0.0] * width for _ in range(batch)]
    returns = [[0.0] * width for _ in range(batch)]
    for b in range(batch):
        running = 0.0
        for t in reversed(range(lengths[b])):
            next_value = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            advantages[b][t] = running
            returns[b][t] = running + values[b][t]
    return advantages, returns


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    """Docstring example: rewards 1, 0, 2 have reward-to-go 3, 2, 2; minus values 0.5, 1, 1.5 gives
    advantages 2.5, 1, 0.5 and returns 3, 2, 2. The padded slot stays 0."""
    advantages, returns = gae(
        rewards=torch.tensor([[1.0, 0.0, 2.0, 5.0]]),
        values=torch.tensor([[0.5, 1.0, 1.5, 5.0]]),
        mask=torch.tensor([[1, 1, 1, 0]]),
        gamma=1.0,
        lam=1.0,
    )
    _close(advantages, [[2.5, 1.0, 0.5, 0.0]])
    _close(returns, [[3.0, 2.0, 2.0, 0.0]])


def test_gae_lam_zero_is_one_step_td_by_hand():
    """gamma 0.5, lam 0: A_t = r_t + 0.5 V_{t+1} - V_t. Rewards 1, 2 and values 4, 2:
    A_0 = 1 + 1 - 4 = -2, A_1 = 2 + 0 - 2 = 0 (nothing to bootstrap after the last token)."""
    advantages, returns = gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 2.0]]), torch.ones(1, 2), 0.5, 0.0)
    _close(advantages, [[-2.0, 0.0]])
    _close(returns, [[2.0, 2.0]])


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_loop_on_right_padded_rows(gamma, lam):
    generator = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    advantages, returns = gae(rewards, values, MASK, gamma, lam)
    expected_adv, expected_ret = _gae_loop(rewards.tolist(), values.tolist(), LENGTHS, gamma, lam)
    _close(advantages, expected_adv, tol=1e-5)
    _close(returns, expected_ret, tol=1e-5)
    # Rewards and values on padding are ignored.
    garbage = gae(_with_padding_garbage(rewards, MASK), _with_padding_garbage(values, MASK, -3e5), MASK, gamma, lam)
    _close(garbage[0], advantages)
    _close(garbage[1], returns)


def test_gae_left_padded_row_equals_its_right_padded_twin():
    rewards = torch.tensor([[1.0, -0.5, 2.0, 0.0], [0.0, 1.0, -0.5, 2.0]])
    values = torch.tensor([[0.3, 0.2, 0.1, 0.0], [9.0, 0.3, 0.2, 0.1]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, 0.9, 0.95)
    _close(advantages[1, 1:], advantages[0, :3])
    _close(returns[1, 1:], returns[0, :3])
    assert advantages[1, 0] == 0 and returns[1, 0] == 0


def test_gae_rejects_mask_with_holes():
    with pytest.raises(ValueError, match="gaps"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 1, 0], [1, 0, 1]]), 1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def test_policy_loss_by_hand():
    """Docstring example, clip 0.2: ratios 1.5, 0.5, 0.5, 1.5 with advantages 1, 1, -1, -1.

    Per-token losses -1.2 (clipped), -0.5, 0.8 (clipped), 1.5: mean 0.15, clipfrac 0.5. A fifth, padded
    token with a huge ratio must not count.
    """
    old = torch.zeros(1, 5)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5), 5.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, metrics = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    _close(loss, 0.15)
    _close(metrics["clipfrac"], 0.5)
    _close(metrics["ratio_mean"], 1.0)
    _close(metrics["ratio_max"], 1.5)
    log_ratios = [math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)]
    _close(metrics["approx_kl"], sum(0.5 * d * d for d in log_ratios) / 4)
    _close(metrics["approx_kl_k3"], sum(math.exp(d) - 1 - d for d in log_ratios) / 4)
    # Clipped tokens (0 and 2) and padding get no gradient; the unclipped ones get -A * ratio / 4.
    loss.backward()
    _close(logprobs.grad, [[0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0]])
    assert all(not v.requires_grad for v in metrics.values())


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    generator = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(3, 5, generator=generator)
    advantages = torch.randn(3, 5, generator=generator)
    loss, metrics = policy_loss(logprobs, logprobs.clone(), advantages, MASK, clip_range=0.2)
    _close(loss, -masked_mean(advantages, MASK))
    _close(metrics["clipfrac"], 0.0)
    _close(metrics["approx_kl"], 0.0)
    _close(metrics["ratio_mean"], 1.0)
    _close(metrics["ratio_max"], 1.0)


@pytest.mark.parametrize(
    "ratio, advantage, clipped",
    [
        (1.3, 1.0, True),  # pushed up past 1 + c by a positive advantage: clip
        (0.7, 1.0, False),  # below 1 - c, a positive advantage still pulls it back: no clip
        (0.7, -1.0, True),  # pushed down past 1 - c by a negative advantage: clip
        (1.3, -1.0, False),  # above 1 + c, a negative advantage pulls it back: no clip
        (1.1, 1.0, False),  # inside the range: never clipped
        (0.9, -1.0, False),
    ],
)
def test_policy_loss_clipping_cases(ratio, advantage, clipped):
    logprobs = torch.tensor([[math.log(ratio)]])
    loss, metrics = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), 0.2)
    bounded = min(max(ratio, 0.8), 1.2)
    _close(loss, max(-advantage * ratio, -advantage * bounded))
    _close(metrics["clipfrac"], 1.0 if clipped else 0.0)


def test_policy_loss_matches_loop_and_ignores_padding():
    generator = torch.Generator().manual_seed(5)
    logprobs, old = -torch.rand(3, 5, generator=generator), -torch.rand(3, 5, generator=generator)
    advantages = torch.randn(3, 5, generator=generator)
    loss, metrics = policy_loss(logprobs, old, advantages, MASK, 0.1)
    terms, clips = [], []
    for b, length in enumerate(LENGTHS):
        for t in range(length):
            r, a = math.exp(logprobs[b, t] - old[b, t]), advantages[b, t].item()
            terms.append(max(-r * a, -min(max(r, 0.9), 1.1) * a))
            clips.append(float(-min(max(r, 0.9), 1.1) * a > -r * a))
    _close(loss, sum(terms) / len(terms), tol=1e-5)
    _close(metrics["clipfrac"], sum(clips) / len(clips))
    padded = policy_loss(_with_padding_garbage(logprobs, MASK, 50.0), old, advantages, MASK, 0.1)
    _close(padded[0], loss)
    for key in metrics:
        _close(padded[1][key], metrics[key])


def test_value_loss_by_hand():
    """Docstring example, c 0.2: old 0, 0; values 0.5, 0.1; returns 1, 1.

    Token 1: max(0.25, (0.2 - 1)^2 = 0.64) = 0.64 clipped. Token 2: both 0.81. 0.5 * 1.45 / 2 = 0.3625.
    A third case, value 0.5 and return 0.3: unclipped 0.04 beats clipped 0.01, so no clip.
    """
    loss, metrics = value_loss(
        values=torch.tensor([[0.5, 0.1, 7.0]]),
        old_values=torch.zeros(1, 3),
        returns=torch.tensor([[1.0, 1.0, -7.0]]),
        mask=torch.tensor([[1, 1, 0]]),
        clip_range_value=0.2,
    )
    _close(loss, 0.3625)
    _close(metrics["value_clipfrac"], 0.5)
    loss, metrics = value_loss(torch.tensor([[0.5]]), torch.zeros(1, 1), torch.tensor([[0.3]]), torch.ones(1, 1), 0.2)
    _close(loss, 0.5 * 0.04)
    _close(metrics["value_clipfrac"], 0.0)


def test_value_loss_matches_loop_and_ignores_padding():
    generator = torch.Generator().manual_seed(6)
    values, old, returns = (torch.randn(3, 5, generator=generator) for _ in range(3))
    values.requires_grad_(True)
    loss, metrics = value_loss(values, old, returns, MASK, 0.3)
    terms = []
    for b, length in enumerate(LENGTHS):
        for t in range(length):
            v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            terms.append(max((v - r) ** 2, (min(max(v, o - 0.3), o + 0.3) - r) ** 2))
    _close(loss, 0.5 * sum(terms) / len(terms), tol=1e-5)
    _close(metrics["explained_variance"], explained_variance(values.detach(), returns, MASK))
    padded = value_loss(_with_padding_garbage(values.detach(), MASK), old, returns, MASK, 0.3)
    _close(padded[0], loss)


# ---------------------------------------------------------------------------------------------------------
# From logits
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_logprobs_from_logits_matches_categorical(temperature):
    generator = torch.Generator().manual_seed(7)
    logits = 5 * torch.randn(2, 4, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 4), generator=generator)
    expected = torch.distributions.Categorical(logits=logits / temperature).log_prob(labels)
    _close(logprobs_from_logits(logits, labels, temperature), expected, tol=1e-5)


def test_logprobs_from_logits_by_hand_and_errors():
    """Logits 0, log 3 are probabilities 1/4, 3/4; at temperature 0.5 the logits double: 1/10, 9/10."""
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    _close(logprobs_from_logits(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    _close(logprobs_from_logits(logits, torch.tensor([[0]]), temperature=0.5), [[math.log(0.1)]])
    assert logprobs_from_logits(logits.bfloat16(), torch.tensor([[1]])).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, torch.tensor([[0]]), temperature=0.0)
    with pytest.raises(ValueError, match="shift"):
        logprobs_from_logits(logits, torch.tensor([[0, 1]]))


def test_entropy_from_logits():
    """Uniform over 4 tokens has entropy log 4; large and -inf logits stay finite."""
    generator = torch.Generator().manual_seed(8)
    logits = 3 * torch.randn(2, 3, 7, generator=generator)
    _close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy(), tol=1e-5)
    _close(entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4.0)]])
    huge = torch.tensor([[[1e4, 1e4, -1e4]]])
    _close(entropy_from_logits(huge), [[math.log(2.0)]])
    banned = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    entropy = entropy_from_logits(banned)
    _close(entropy, [[math.log(2.0)]])
    entropy.sum().backward()
    assert torch.isfinite(banned.grad).all()


# ---------------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------------


def test_fixed_kl_controller():
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=512)
    assert controller.value == 0.05
    restored = FixedKLController(0.3)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05


def test_adaptive_kl_controller_by_hand():
    """init 0.1, target 6, horizon 10000, 256 samples. KL 12: error clip(1) = 0.2, value 0.1 * 1.00512.
    KL 3: error clip(-0.5) = -0.2, value * 0.99488. KL 7: error 1/6, value * (1 + 256 / 60000)."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    controller.update(current_kl=12.0, n_steps=256)
    _close(controller.value, 0.100512, tol=1e-12)
    controller.update(current_kl=torch.tensor(3.0), n_steps=256)
    _close(controller.value, 0.100512 * 0.99488, tol=1e-12)
    before = controller.value
    controller.update(current_kl=7.0, n_steps=256)
    _close(controller.value, before * (1 + 256 / 60_000), tol=1e-12)


def test_adaptive_kl_controller_moves_toward_target():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    for _ in range(5):
        before = controller.value
        controller.update(8.0, n_steps=64)
        assert controller.value > before
    for _ in range(5):
        before = controller.value
        controller.update(2.0, n_steps=64)
        assert controller.value < before
    before = controller.value
    controller.update(6.0, n_steps=64)
    assert controller.value == before


def test_adaptive_kl_controller_state_dict_round_trip():
    controller = AdaptiveKLController(0.2, target=4.0, horizon=5_000)
    for kl in (9.0, 1.0, 5.0):
        controller.update(kl, n_steps=128)
    restored = AdaptiveKLController(0.2, target=4.0, horizon=5_000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    # Resumed and uninterrupted controllers stay identical afterwards.
    controller.update(7.0, n_steps=128)
    restored.update(7.0, n_steps=128)
    assert restored.value == controller.value


def test_kl_controller_state_errors():
    with pytest.raises(ValueError, match="'adaptive'"):
        AdaptiveKLController(0.1, 6.0, 100).load_state_dict(FixedKLController(0.1).state_dict())
    with pytest.raises(ValueError, match="'fixed'"):
        FixedKLController(0.1).load_state_dict(AdaptiveKLController(0.1, 6.0, 100).state_dict())
    with pytest.raises(ValueError, match="FixedKLController"):
        AdaptiveKLController(0.0, 6.0, 100)
    other = AdaptiveKLController(0.1, target=3.0, horizon=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AdaptiveKLController(0.5, 6.0, 100).load_state_dict(other.state_dict())
    assert len(caught) == 1 and "target" in str(caught[0].message)
