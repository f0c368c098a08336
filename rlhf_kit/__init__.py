"""rlhf-kit: pretraining, SFT, reward modeling and PPO for LLaMA-style models on the Hugging Face stack."""

__version__ = "0.1.0"
