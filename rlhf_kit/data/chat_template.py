"""Assistant-only loss with a model's own chat template: which tokens of a rendered conversation are the assistant's.

TRL finds them through `{% generation %}` markers in the template, and swaps in a marked copy of the templates it
knows (Qwen 2.5/3, Gemma, Llama 3.0, Phi, ...). Many real templates have neither: Llama 3.1-3.3, Mistral, a plain
ChatML. For every template without markers the kit renders the conversation turn by turn (TRL's copy is used only
for templates that rewrite past turns). The text an assistant turn adds after the prompt that asks for it
(`add_generation_prompt=True`) is the assistant's content and its end-of-turn token; the tokens that start inside
that span are trained, every other token is masked. Whitespace the template writes after the end-of-turn token
(ChatML's newline) is the template's, not the model's to learn.

Tool-calling rows (TRL's format: a `tools` column, assistant turns with `tool_calls`, `tool` turns) render with the
row's tools (`apply_chat_template(..., tools=...)`) in every turn's prefix; an assistant turn's tool calls are part of
its span (the model learns to call), the tool results and the tools listing are not. `check_tool_support` refuses
such rows, before a model loads, for a template that would drop the tools, the calls or the results.

The renderer checks what it relies on, per conversation: each turn's rendering must be a prefix of the next one's.
A template that rewrites earlier turns (one that drops the reasoning of past answers, say) fails with an error that
says how to supply a template with generation markers instead.
"""

from __future__ import annotations

import jinja2
from trl.chat_template_utils import get_training_chat_template, has_generation_markers, supports_tool_calling

from rlhf_kit.data.tool_calls import parse_tools
from rlhf_kit.errors import UserError

# How SFT finds the assistant's tokens (see `assistant_mask_source`).
MARKERS, TRL_TEMPLATE, RENDERED = "markers", "trl", "rendered"


class TemplateError(UserError):
    """A chat template that cannot say which tokens are the assistant's; the message says what to do."""


def _template(tokenizer) -> str | None:
    template = tokenizer.chat_template
    return template.get("default") if isinstance(template, dict) else template


def assistant_mask_source(tokenizer) -> str:
    """How assistant-only loss will find the assistant's tokens with this tokenizer, decided before a model loads.

    ``"markers"``: the template has `{% generation %}` markers (TRL masks with them). ``"rendered"``: the template
    renders a probe conversation turn by turn as a prefix of the whole (most do), so `tokenize_conversation` masks
    exactly each assistant turn's content and end-of-turn token. Preferred over TRL's marked copies of known
    templates, which also train the template's newlines around a turn (Qwen 2.5's, for one). ``"trl"``: TRL has a
    marked training copy of this template, which it swaps in (templates that rewrite past turns, like Qwen 3's).
    """
    template = _template(tokenizer)
    if template is None:
        raise TemplateError("assistant_only_loss needs a chat template, and the tokenizer has none: set "
                            "chat_template_path, or assistant_only_loss: false.")
    if has_generation_markers(template):
        return MARKERS
    problem = None
    if tokenizer.is_fast:
        try:
            assistant_spans(tokenizer, _PROBE)
            return RENDERED
        except Exception as e:  # a template may also raise on the probe (one that refuses a system turn, say)
            problem = str(e)
    else:
        problem = (f"a slow {type(tokenizer).__name__} gives no character offsets to find them by (load the model's "
                   "fast tokenizer, tokenizer.json)")
    try:
        if get_training_chat_template(tokenizer) is not None:
            return TRL_TEMPLATE
    except ValueError:  # TRL 1.16 raises for a template it has no training copy of
        pass
    raise TemplateError(f"assistant_only_loss cannot find the assistant's tokens with this chat template: {problem}, "
                        f"and TRL has no training copy of it. {_REMEDY}")


_REMEDY = ("Give a template with {% generation %} markers around each assistant turn (chat_template_path), or set "
           "assistant_only_loss: false to train on whole conversations.")


# Two exchanges without a system turn (some templates refuse one): enough to see whether past turns are rewritten.
_PROBE = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hello."},
          {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Again."}]


def assistant_spans(tokenizer, messages: list[dict],
                    tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it: content (and tool calls) +
    end-of-turn. `tools`: the conversation's tool schemas, rendered by the template wherever it puts them."""

    def render(turns, prompt=False):
        return tokenizer.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=prompt)

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        asked = render(messages[:i], prompt=True) if i else ""
        answered = render(messages[: i + 1])
        if not (answered.startswith(asked) and text.startswith(answered)):
            raise TemplateError(f"the chat template renders assistant turn {i} differently once later turns follow "
                                "(it is not prefix-preserving)")
        end = len(answered.rstrip())
        if end <= len(asked):
            raise TemplateError(f"assistant turn {i} renders to no text of its own after the generation prompt.")
        spans.append((len(asked), end))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> dict[str, list[int]]:
    """`input_ids` of the rendered conversation (as `apply_chat_template` tokenizes it) and `assistant_masks`: 1 for
    each token that starts inside an assistant span, the columns TRL's SFTTrainer builds labels from."""
    text, spans = assistant_spans(tokenizer, messages, tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= first < end for start, end in spans)) for first, _ in encoded["offset_mapping"]]
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}


def tokenize_for_assistant_loss(dataset, tokenizer, source: str):
    """A `messages` dataset as `input_ids` + `assistant_masks`, for templates TRL cannot mask (`"rendered"`).
    A conversation the template cannot split fails with its source and row (numbered from 1)."""

    def convert(row, index):
        try:
            # Arrow gives every message the keys any message has, None where unset; a template that asks
            # `'tool_calls' in message` (Llama 3.1's) would take every turn for a call
            messages = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
            return tokenize_conversation(tokenizer, messages, parse_tools(row.get("tools")))
        except TemplateError as e:
            raise TemplateError(f"{source}, row {index + 1}: {e}. {_REMEDY}") from None
        except jinja2.TemplateError as e:  # the template's own raise_exception (Llama 3.1: one tool call per turn)
            raise TemplateError(f"{source}, row {index + 1}: the chat template refuses this conversation: "
                                f"{e}") from None

    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names,
                       desc="Masking assistant turns")


_TOOL_PROBE = {"type": "function", "function": {"name": "probe_tool_f3a1", "description": "A probe.", "parameters": {
    "type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}}


def uses_tools(dataset) -> bool:
    """Whether a conversational dataset holds tool-calling rows: a `tools` column, a call or a tool turn."""
    if "tools" in dataset.column_names:
        return True
    columns = [c for c in ("messages", "prompt", "completion") if c in dataset.column_names]
    return any(isinstance(turns, list) and any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                                               for m in turns)
               for column in columns for turns in dataset[column])


def check_tool_support(tokenizer, dataset, source: str) -> None:
    """Refuse tool-calling data, before a model loads, for a chat template that would train on it without its tools:
    one that drops the calls or the tool results (TRL's `supports_tool_calling`), or never lists the tools."""
    if not uses_tools(dataset):
        return
    listed = False
    try:
        listed = "probe_tool_f3a1" in tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=[_TOOL_PROBE], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template may raise on anything it does not expect; it then cannot take tools
        pass
    if not (listed and supports_tool_calling(tokenizer)):
        raise TemplateError(f"{source} holds tool calls, and this tokenizer's chat template does not render "
                            f"{'tool calls and tool results' if listed else 'the tools'}, so the model would learn "
                            "calls it cannot see. Use a model whose template takes tools (Llama 3.x, Qwen 2.5/3, ...), "
                            "or a base model (the kit gives it a ChatML with tools), or set chat_template_path.")
