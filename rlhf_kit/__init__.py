"""rlhf-kit: pretraining, SFT, reward modeling and PPO for LLaMA-style models on the Hugging Face stack."""

from rlhf_kit import hub_kernels

__version__ = "0.1.0"

# Before transformers is imported anywhere in the process: bitsandbytes, which transformers imports, would otherwise
# reach the Hub for a compiled kernel (see hub_kernels.py).
hub_kernels.install()
