"""Data in: loading and checking datasets in every format the stages read, chat templates and the assistant-token
mask, and length statistics. Depends only on `rlhf_kit.config`."""
