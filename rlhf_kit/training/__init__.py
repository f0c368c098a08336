"""The training stages' settings and shared machinery: one module per stage's settings (`sft`, `reward_model`,
`dpo`, `grpo` (GRPO and RLOO), `pretraining`), batch sizes and sharding across processes (`distributed`), and
rlhf-kit's own PPO (`ppo/`). The recipes in `recipes/` put these together; nothing here imports a recipe."""
