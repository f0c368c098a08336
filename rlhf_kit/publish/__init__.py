"""Publishing a stage's output: export (adapter, merged, GGUF), the lineage model card and the Hub push. Imports
flow one way: hub -> export -> model_card -> runs."""
