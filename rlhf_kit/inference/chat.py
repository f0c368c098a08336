"""An interactive terminal chat with any stage's output: streaming, its chat template, its stop tokens."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence

from transformers import TextStreamer

from rlhf_kit.inference.constraints import Constraint
from rlhf_kit.inference.generation import Conversation, Prompting, Sampling, generate, load_policy, merged_copy_note
from rlhf_kit.inference.retrieval import Retriever
from rlhf_kit.inference.tools import ToolUse, generate_with_tools
from rlhf_kit.model import require_response_template

HELP = "Type a message. /reset starts a new conversation, /exit (or Ctrl-D) quits."


def chat(model_path: str, *, lines: Iterable[str], write: Callable[[str], None], max_new_tokens: int = 128,
         temperature: float = 0.7, system: str | None = None, seed: int = 0,
         constraint: Constraint | None = None, retriever: Retriever | None = None, top_k: int = 3,
         tools: Sequence[str] = (), max_tool_rounds: int = 3, tool_timeout: float = 5.0) -> list[dict]:
    """Answer each line of `lines` in one running conversation; returns the conversation. With a `constraint`
    (`Constraint.from_options`) every reply matches it, or says it was cut short by max_new_tokens. With a
    `retriever`, each message's `top_k` passages are put before it (the earlier turns' passages are not kept: each
    reply is written from the passages found for its own message), and their titles and sources are shown. With
    `tools` (tool modules) the model may call them, up to `max_tool_rounds` times a turn: each call and its result
    is shown and kept in the conversation, and the reply comes whole at the end instead of streaming."""
    tool_use = ToolUse(tuple(tools), max_tool_rounds, tool_timeout)
    functions = tool_use.load(Prompting())  # a bad tool module fails before the model loads
    policy = load_policy(model_path)
    if functions:
        require_response_template(policy.tokenizer)
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
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + turn)
        prompt = history
        if retriever is not None:
            passages = retriever.search([text], top_k)[0]
            write("(retrieved: " + ("; ".join(f"{p.title or p.source} [{p.id}] {p.score:.2f}" for p in passages)
                                    or "nothing matches") + ")\n")
            prompt = Conversation(history, [{"title": p.title, "text": p.text} for p in passages])
        if functions:
            gens = generate_with_tools(policy, [prompt], tools=functions, sampling=sampling,
                                       max_tool_rounds=max_tool_rounds, timeout=tool_timeout,
                                       logits_processor=processors, progress=False)
            for message in gens.transcripts[0]:
                for call in message.get("tool_calls", []):
                    function = call["function"]
                    write(f"[{function['name']}({json.dumps(function['arguments'], ensure_ascii=False)})]\n")
                if message["role"] == "tool":
                    write(f"[-> {message['content']}]\n")
            write(gens.responses[0] + "\n")
            history += gens.transcripts[0]
            continue
        streamer = TextStreamer(policy.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda chunk, stream_end=False: write(chunk + ("\n" if stream_end else ""))
        gens = generate(policy, [prompt], sampling=sampling, logits_processor=processors, streamer=streamer,
                        progress=False)
        reply = gens.responses[0]
        if constraint is not None and not constraint.complete(policy, gens.response_ids)[0]:
            write(f"(cut short at max_new_tokens={max_new_tokens}: the reply does not match the {constraint.kind} "
                  "constraint)\n")
        history.append({"role": "assistant", "content": reply})
    return history
