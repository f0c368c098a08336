"""rlhf-kit's PPO (TRL 1.x has none): the math as pure functions (`losses`), the rollout's token bookkeeping
(`rollout`), policy, reference and critic on one base model (`model`), the settings (`config`) and the trainer."""
