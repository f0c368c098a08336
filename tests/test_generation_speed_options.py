"""Sampling's opt-in speed options give the outputs the default path gives (benchmarks/generate_speed.py times them)."""

from rlhf_kit.inference.generation import Prompting, Sampling, generate, load_policy

# Prompts of different lengths, so the batch is left-padded, behind two few-shot examples (a long shared context).
PROMPTS = ["Review the tea.", "What do you think of the laptop?", "Write a review of the museum and its garden."]
FEW_SHOT = Prompting(few_shot=[("Review the car.", "The car is excellent."),
                               ("Review the watch.", "The watch is horrible and new.")])


def test_prefill_once_samples_follow_the_same_distribution_as_the_default(tiny_sft, single_thread):
    """top_k=1 makes sampling deterministic: every one of the n samples drawn from the shared prompt cache must be
    the default path's greedy answer, token for token (positions and padding of the cached prompt right)."""
    policy = load_policy(tiny_sft)
    greedy = generate(policy, PROMPTS, sampling=Sampling(temperature=0, max_new_tokens=12), prompting=FEW_SHOT,
                      progress=False)
    shared = generate(policy, PROMPTS, sampling=Sampling(n=3, top_k=1, max_new_tokens=12, prefill_once=True),
                      prompting=FEW_SHOT, progress=False)
    assert shared.response_ids == [ids for ids in greedy.response_ids for _ in range(3)]
    assert shared.responses == [text for text in greedy.responses for _ in range(3)]
    assert shared.prompt_ids == [ids for ids in greedy.prompt_ids for _ in range(3)]


def test_prefill_once_draws_the_default_paths_samples(tiny_sft, single_thread):
    """Sampled, n=4, two prompts per generate() call: the same random draws as num_return_sequences, so the same
    samples as the default path (the prompt's logits differ at most by float rounding)."""
    policy = load_policy(tiny_sft)
    options = dict(n=4, max_new_tokens=12, batch_size=8)
    default = generate(policy, PROMPTS, sampling=Sampling(**options), prompting=FEW_SHOT, progress=False)
    shared = generate(policy, PROMPTS, sampling=Sampling(**options, prefill_once=True), prompting=FEW_SHOT,
                      progress=False)
    assert [len(group) for group in shared.grouped()] == [4, 4, 4]
    assert any(len(set(group)) > 1 for group in shared.grouped())  # sampled, not 4 copies of one answer
    assert shared.response_ids == default.response_ids
    assert shared.stopped == default.stopped and shared.prompt_ids == default.prompt_ids
