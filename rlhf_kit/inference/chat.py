"""An interactive terminal chat with any stage's output: streaming, its chat template, its stop tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from transformers import TextStreamer

from rlhf_kit.inference.constraints import Constraint
from rlhf_kit.inference.generation import Conversation, Sampling, generate, load_policy, merged_copy_note
from rlhf_kit.inference.retrieval import Retriever

HELP = "Type a message. /reset starts a new conversation, /exit (or Ctrl-D) quits."


def chat(model_path: str, *, lines: Iterable[str], write: Callable[[str], None], max_new_tokens: int = 128,
         temperature: float = 0.7, system: str | None = None, seed: int = 0,
         constraint: Constraint | None = None, retriever: Retriever | None = None,
         top_k: int = 3) -> list[dict[str, str]]:
    """Answer each line of `lines` in one running conversation; returns the conversation. With a `constraint`
    (`Constraint.from_options`) every reply matches it, or says it was cut short by max_new_tokens. With a
    `retriever`, each message's `top_k` passages are put before it (the earlier turns' passages are not kept: each
    reply is written from the passages found for its own message), and their titles and sources are shown."""
    policy = load_policy(model_path)
    processors = constraint.logits_processor(policy) if constraint is not None else None
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    note = merged_copy_note(policy)
    write(f"rlhf-kit chat: {model_path}\n" + (f"({note})\n" if note else "") + f"{HELP}\n")
    for turn, line in enumerate(lines):
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if system else []
            write("(new conversation)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        streamer = TextStreamer(policy.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda chunk, stream_end=False: write(chunk + ("\n" if stream_end else ""))
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + turn)
        prompt = history
        if retriever is not None:
            passages = retriever.search([text], top_k)[0]
            write("(retrieved: " + ("; ".join(f"{p.title or p.source} [{p.id}] {p.score:.2f}" for p in passages)
                                    or "nothing matches") + ")\n")
            prompt = Conversation(history, [{"title": p.title, "text": p.text} for p in passages])
        gens = generate(policy, [prompt], sampling=sampling, logits_processor=processors, streamer=streamer,
                        progress=False)
        reply = gens.responses[0]
        if constraint is not None and not constraint.complete(policy, gens.response_ids)[0]:
            write(f"(cut short at max_new_tokens={max_new_tokens}: the reply does not match the {constraint.kind} "
                  "constraint)\n")
        history.append({"role": "assistant", "content": reply})
    return history
