"""An interactive terminal chat with any stage's output: streaming, its chat template, its stop tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers import TextStreamer

from rlhf_kit.inference.evaluation import load_policy, merged_copy_note
from rlhf_kit.model import stop_token_ids

HELP = "Type a message. /reset starts a new conversation, /exit (or Ctrl-D) quits."


def chat(model_path: str, *, lines: Iterable[str], write: Callable[[str], None], max_new_tokens: int = 128,
         temperature: float = 0.7, system: str | None = None) -> list[dict[str, str]]:
    """Answer each line of `lines` in one running conversation; returns the conversation."""
    policy = load_policy(model_path)
    tok, model = policy.tokenizer, policy.model
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    note = merged_copy_note(policy)
    write(f"rlhf-kit chat: {model_path}\n" + (f"({note})\n" if note else "") + f"{HELP}\n")
    for line in lines:
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
        ids = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda chunk, stream_end=False: write(chunk + ("\n" if stream_end else ""))
        with torch.no_grad():
            out = model.generate(**ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 temperature=temperature or None, eos_token_id=stop_token_ids(tok, model),
                                 pad_token_id=tok.pad_token_id, streamer=streamer)
        reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
    return history
