"""Using a model: generating from a policy and scoring it (`evaluation`, and `task_loading` for the task it names),
best-of-N sampling (`best_of_n`), responses to a whole prompt dataset with sample-and-select (`batch`, behind
`rlhf-kit generate`), the interactive chat (`chat`), generation that calls tools (`tools`; the shipped
`calculator`)."""
