"""rlhf-kit: pretraining, SFT, reward modeling and PPO for LLaMA-style models on the Hugging Face stack."""

import warnings

from rlhf_kit import hub_kernels

__version__ = "0.1.0"

# Before transformers is imported anywhere in the process: bitsandbytes, which transformers imports, would otherwise
# reach the Hub for a compiled kernel (see hub_kernels.py).
hub_kernels.install()

# PEFT 0.21 (on every adapter it wraps) and TRL 1.16 (around generation) read `is_gradient_checkpointing`, an alias
# transformers 5.25 deprecated: every LoRA stage printed a FutureWarning the user can do nothing about. Only that
# message, raised from transformers' own module, is hidden; drop this once PEFT and TRL read the new name.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module="transformers.modeling_utils")
