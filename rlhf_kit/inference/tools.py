"""Generation with tools: the model calls a tool, the tool runs, its result goes back into the conversation, and the
model goes on, up to `max_tool_rounds` times.

    tools = load_tools("rlhf_kit.inference.calculator")
    gens = generate_with_tools(policy, ["What do 3 lamps at 12 and 2 mugs at 4 cost?"], tools=tools)
    gens.responses[0], gens.tool_calls[0]  # "The total is 3*12+2*4 = 44.", 1
    gens.transcripts[0]  # [assistant calling, tool "3*12+2*4 = 44", assistant "The total is 3*12+2*4 = 44."]

The tools are listed through the chat template (`Prompting.tools`, their JSON schemas), and a response is parsed
with the response template of that chat template (`rlhf_kit.model.response_template_for`: Qwen's tool format for
rlhf-kit's ChatML, TRL's templates for Llama 3.1/3.2 and Qwen 2.5/3); a model whose template nobody knows is refused
before anything is generated. Each of the n samples of a prompt is its own trajectory: after every round, the samples
whose response calls tools get that assistant turn (`tool_calls` in TRL's format) and one `tool` message per call
(the result, or "Error: ..." for an unknown tool, bad arguments, an exception or a timeout: `rlhf_kit.tools`) added
to their conversation, and only those are generated again, in one batch, round r with seed `seed + r`. The final
response is the last assistant turn's text, decoded as plain generation decodes it.

A response whose tool call cannot be parsed (a `<tool_call>` holding invalid JSON, or cut off by max_new_tokens) is
taken as the final answer, as TRL's GRPOTrainer takes it: nothing is run, and the row shows the malformed call as the
model wrote it. So does a response that still calls tools after the last round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rlhf_kit.errors import UserError
from rlhf_kit.inference.generation import Conversation, Generations, Policy, Prompting, Sampling, generate
from rlhf_kit.model import require_response_template
from rlhf_kit.tools import ToolRunner, call_name, load_tools, tool_schema


@dataclass
class ToolUse:
    """The tools of a run (`--tools`, `--max_tool_rounds`, `--tool_timeout`); `load` imports and checks them, so a
    bad tool module fails before a model loads."""

    modules: Sequence[str] = ()  # .py files or importable modules (`rlhf_kit.tools.load_tools`)
    max_rounds: int = 3
    timeout: float = 5.0

    def load(self, prompting: Prompting) -> list[Callable]:
        if self.max_rounds < 0 or self.timeout <= 0:
            raise UserError(f"max_tool_rounds must be >= 0 and tool_timeout > 0, got {self.max_rounds} and "
                            f"{self.timeout}")
        if self.modules and prompting.raw:
            raise UserError("tools are listed and called through the chat template; raw prompting has none: drop "
                            "--raw or --tools")
        return load_tools(list(self.modules)) if self.modules else []

    def settings(self, tools: list[Callable]) -> dict[str, Any]:
        """What the run records: the modules, the rounds, the timeout and the tools' schemas (a changed signature
        or docstring changes what the model is shown)."""
        return {"modules": list(self.modules), "max_rounds": self.max_rounds, "timeout": self.timeout,
                "schemas": [tool_schema(t) for t in tools]}


@dataclass
class ToolGenerations(Generations):
    """`Generations` of the final responses (their `prompt_ids` the whole conversation before the final turn), and
    per sample the messages added after the prompt, its tool calls and the tokens generated over all rounds."""

    transcripts: list[list[dict[str, Any]]] = field(default_factory=list)
    tool_calls: list[int] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)


def parse_reply(tokenizer, template: dict, response_ids: list[int], prompt_ids: list[int],
                schemas: list[dict]) -> dict[str, Any]:
    """The response as an assistant message, `tool_calls` included when it makes well-formed calls; a response
    that cannot be parsed is plain content (see the module docstring)."""
    try:
        message = tokenizer.parse_response(response_ids, schema=template, prefix=prompt_ids, tools=schemas)
    except Exception:  # transformers raises several types on malformed JSON or a cut-off call
        return {"role": "assistant", "content": tokenizer.decode(response_ids, skip_special_tokens=True).strip()}
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict) and call_name(c)]
    reply = {"role": "assistant", "content": message.get("content") or ""}
    if calls:
        reply["tool_calls"] = [{"type": "function", "function": c.get("function", c)} for c in calls]
    return reply


def generate_with_tools(policy: Policy, prompts: list, *, tools: list, sampling: Sampling | None = None,
                        prompting: Prompting | None = None, max_tool_rounds: int = 3, timeout: float = 5.0,
                        logits_processor=None, progress: bool = True) -> ToolGenerations:
    """`sampling.n` responses to each prompt, with up to `max_tool_rounds` rounds of tool calls each (see the module
    docstring). `tools`: plain functions (`rlhf_kit.tools.load_tools`); `logits_processor` as `generate` takes it."""
    if max_tool_rounds < 0:
        raise UserError(f"max_tool_rounds must be >= 0, got {max_tool_rounds}")
    s, p = sampling or Sampling(), prompting or Prompting()
    tok = policy.tokenizer
    template = require_response_template(tok)
    schemas = [tool_schema(t) for t in tools]
    listed = replace(p, tools=schemas)
    gens = generate(policy, prompts, sampling=s, prompting=listed, logits_processor=logits_processor,
                    progress=progress)
    out = ToolGenerations(prompts=list(prompts), responses=list(gens.responses), prompt_ids=list(gens.prompt_ids),
                          response_ids=list(gens.response_ids), stopped=list(gens.stopped), n=s.n,
                          transcripts=[[] for _ in gens.responses], tool_calls=[0] * len(gens.responses),
                          generated_tokens=[len(ids) for ids in gens.response_ids])
    # The template was applied to the user's text already: a continuation renders the messages as they are.
    followup = replace(listed, template=None)
    active = list(range(len(gens.responses)))
    with ToolRunner(tools, timeout) as run:
        for rounds in range(max_tool_rounds + 1):
            calling = []
            for i in active:
                reply = parse_reply(tok, template, out.response_ids[i], out.prompt_ids[i], schemas)
                if "tool_calls" in reply and rounds < max_tool_rounds:
                    out.transcripts[i].append(reply)
                    for call in reply["tool_calls"]:
                        out.transcripts[i].append({"role": "tool", "name": call_name(call), "content": run(call)})
                    out.tool_calls[i] += len(reply["tool_calls"])
                    calling.append(i)
                else:
                    out.transcripts[i].append({"role": "assistant", "content": out.responses[i]})
            if not calling:
                break
            conversations = [_continued(prompts[i // s.n], out.transcripts[i], p) for i in calling]
            more = generate(policy, conversations, sampling=replace(s, n=1, seed=s.seed + rounds + 1),
                            prompting=followup, logits_processor=logits_processor, progress=False)
            for j, i in enumerate(calling):
                out.responses[i], out.stopped[i] = more.responses[j], more.stopped[j]
                out.prompt_ids[i], out.response_ids[i] = more.prompt_ids[j], more.response_ids[j]
                out.generated_tokens[i] += len(more.response_ids[j])
            active = calling
    return out


def _continued(prompt, transcript: list[dict], prompting: Prompting) -> Conversation:
    """The prompt's messages (its template applied) followed by the transcript so far, its documents kept."""
    documents = prompt.documents if isinstance(prompt, Conversation) else ()
    return Conversation([*prompting.request(prompt), *transcript], documents)
