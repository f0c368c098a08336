"""Using a model: generating from a policy and scoring it (`evaluation`), best-of-N sampling (`best_of_n`) and the
interactive chat (`chat`)."""
