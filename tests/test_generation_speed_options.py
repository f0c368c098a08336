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


def test_prefill_once_draws_n_distinct_valid_samples_per_prompt(tiny_sft, single_thread):
    policy = load_policy(tiny_sft)
    sampling = Sampling(n=4, max_new_tokens=12, batch_size=8, prefill_once=True)  # 2 prompts per call: 2 calls
    gens = generate(policy, PROMPTS, sampling=sampling, prompting=FEW_SHOT, progress=False)
    assert [len(group) for group in gens.grouped()] == [4, 4, 4]
    assert all(0 < len(ids) <= 12 for ids in gens.response_ids)
    assert any(len(set(group)) > 1 for group in gens.grouped())  # sampled, not 4 copies of one answer
    assert sum(gens.stopped) >= 6  # the trained model ends most answers with its stop token
    again = generate(policy, PROMPTS, sampling=sampling, prompting=FEW_SHOT, progress=False)
    assert again.responses == gens.responses  # the seed fixes the samples
