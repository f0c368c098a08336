"""Generation from any stage's output: the one path every inference command takes (evaluation, best-of-N, chat,
`rlhf-kit generate`), so a prompt is rendered, sampled, stopped and decoded the same way everywhere.

    policy = load_policy("outputs/tiny/sft")
    gens = generate(policy, ["Review the coffee."], sampling=Sampling(n=8, temperature=1.0))
    gens.grouped()[0]  # the 8 responses to the first prompt

A prompt is a string, a list of chat messages, or a `Conversation` (messages plus retrieved documents). By default
it is rendered with the model's own chat template (a system message and few-shot examples become chat turns); with
`Prompting(raw=True)` it is a document the model continues, for base models: no chat template, the examples written
out before it as text. `n` samples per prompt are
drawn in one batched `generate` call (`num_return_sequences`), with left padding and the KV cache; a sequence ends at
the model's stop tokens (`model.stop_token_ids`) or at a stop string, which is cut off the response.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from rlhf_kit.data.loading import DataError, load_data
from rlhf_kit.errors import UserError
from rlhf_kit.model import (ModelArguments, is_adapter_dir, load_model, load_tokenizer, merged_cache_path,
                            prepare_tokenizer, stop_token_ids)
from rlhf_kit.vllm_engine import VLLMEngine, check_backend, engine_model_dir, require_vllm


@dataclass
class Policy:
    name: str
    model: torch.nn.Module
    tokenizer: object
    merged_copy: Path | None = None  # where an adapter's merged full model was written (it stays there, cached)
    engine: VLLMEngine | None = None  # generation_backend vllm: this engine samples, `model` stays on the CPU

    def close(self) -> None:
        """Stop the vLLM engine, if any (it holds its own copy of the weights and a KV cache)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def load_policy(path: str, name: str | None = None, backend: str = "hf") -> Policy:
    """Any stage's output: a full model, or a LoRA adapter (merged into its base once and cached on disk, under
    $RLHF_KIT_CACHE or $HF_HOME: `merged_copy` says where).

    A base model gets the same chat template SFT gives it, so base and SFT answer the very same prompts. With GPUs the
    model is placed on them (`device_map="auto"`: spread over several when it does not fit on one); else on the CPU.
    With `backend="vllm"` a vLLM engine loads the (merged) model and does the sampling; the transformers model
    stays on the CPU for what is read from it (its config, its stop tokens).
    """
    if check_backend(backend) == "vllm":
        require_vllm()  # before a model loads
    tokenizer = load_tokenizer(path)
    prepare_tokenizer(tokenizer)
    placement = "auto" if torch.cuda.is_available() and backend == "hf" else None
    model = load_model(ModelArguments(model_name_or_path=path), tokenizer, device_map=placement).eval()
    merged = merged_cache_path(path) if is_adapter_dir(path) else None
    policy = Policy(name or Path(path).name, model, tokenizer, merged_copy=merged)
    return with_engine(policy, path) if backend == "vllm" else policy


def with_engine(policy: Policy, path: str) -> Policy:
    """`policy` sampling through a vLLM engine that loads `path` (an adapter: the merged copy `load_model` caches),
    in the policy model's dtype. On a CPU its KV cache is 1 GB (vLLM's CPU backend would otherwise reserve a share of
    the machine's memory)."""
    policy.engine = VLLMEngine(engine_model_dir(path), dtype=str(policy.model.dtype).removeprefix("torch."),
                               kv_cache_gb=None if torch.cuda.is_available() else 1.0)
    return policy


def merged_copy_note(policy: Policy) -> str | None:
    """One line saying where an adapter's merged copy went and how big it is (16 GB at 8B in bf16), or None.

    The copy is kept on purpose: the next stage and the next `chat` / `eval` of the same adapter start from it
    instead of merging again. But nobody expects `chat` to write a full model to disk, so the commands say so.
    """
    if policy.merged_copy is None or not policy.merged_copy.is_dir():
        return None
    size = sum(f.stat().st_size for f in policy.merged_copy.rglob("*") if f.is_file())
    return (f"{policy.name}: the adapter was merged into its base for generation; the merged model ({size / 1e9:.2f} "
            f"GB) is cached at {policy.merged_copy} (set RLHF_KIT_CACHE to move it; delete it to free the disk)")


@dataclass
class Sampling:
    """How responses are drawn. temperature 0 is greedy decoding (then n must be 1)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut (plain softmax sampling, as PPO samples)
    n: int = 1  # samples per prompt, drawn together with num_return_sequences
    seed: int = 0
    batch_size: int = 32  # sequences per generate() call: batch_size // n prompts at a time
    stop: Sequence[str] = ()  # strings that end a response (besides the stop tokens); cut off the response
    # Run each prompt through the model once and give its KV cache to its n samples, instead of computing the
    # prompt n times (what num_return_sequences does). The random draws are the default's, so are the samples up to
    # float rounding of the prompt computed in a smaller batch (equal in the tests). Opt-in all the same: the
    # default path's outputs stay bit for bit. Pays with n > 1 and long prompts (few-shot): 3.1-3.5x over a
    # plain loop at n=8 with 8 examples on CPU, where batching alone gives 1.1x (benchmarks/generate_speed.py).
    prefill_once: bool = False

    def __post_init__(self):
        if self.n < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n, batch_size and max_new_tokens must be >= 1, got {self.n}, {self.batch_size}, "
                             f"{self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"n={self.n} greedy samples would all be the same: give a temperature > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("a stop string cannot be empty")


@dataclass
class Prompting:
    """What is put around each prompt before the model sees it.

    system: a system message (chat) or a first line (raw).
    template: the user's text is `template.format(prompt=...)`: "You are an expert reviewer. {prompt}".
    few_shot: example (prompt, response) pairs put before the prompt: chat turns, or text in raw mode.
    raw: no chat template; the prompt is a document for a base model to continue.
    """

    system: str | None = None
    template: str | None = None
    few_shot: Sequence[tuple[str, str]] = ()
    raw: bool = False
    # Tools the model may call: JSON schemas or plain Python functions (transformers' `get_json_schema` reads their
    # type hints and docstrings), listed by the chat template (`apply_chat_template(tools=...)`).
    tools: Sequence[dict | Callable] = ()

    def __post_init__(self):
        if self.template is not None:
            check_template(self.template)
        if self.raw and self.tools:
            raise ValueError("tools need a chat template to be listed in and called through; raw prompting has none")

    def fill(self, text: str) -> str:
        """The user's text as the template puts it."""
        return self.template.format(prompt=text) if self.template is not None else text

    def request(self, prompt) -> list[dict[str, str]]:
        """`prompt` (a string, chat messages or a Conversation) as chat messages, the template applied to the last
        one: the request as the model sees it (a Conversation's documents aside: `render` adds them)."""
        if isinstance(prompt, str):
            return [{"role": "user", "content": self.fill(prompt)}]
        messages = list(prompt.messages if isinstance(prompt, Conversation) else prompt)
        if self.template is None:
            return messages
        return [*messages[:-1], {**messages[-1], "content": self.fill(messages[-1]["content"])}]


@dataclass
class Conversation:
    """A prompt as chat messages, with documents the model should answer from (retrieved passages: their text, and
    optionally a title and where they came from). A tool-calling exchange is messages too: assistant turns with
    `tool_calls` and `tool` turns with the results, in TRL's format.

    Documents go where the chat template wants them: templates that render `documents=` themselves get them so;
    for all others (rlhf-kit's ChatML included) they become a system message, `documents_message`, which is also
    how training data for retrieval-augmented answers writes them, so training and inference see the same text."""

    messages: list[dict]
    documents: Sequence[dict] = field(default_factory=list)


def documents_message(texts: Sequence[str]) -> str:
    """The passages as the system message that gives them to a chat template without a documents slot."""
    return "Documents:\n" + "\n".join(f"[{i}] {text}" for i, text in enumerate(texts, 1))


def renders_documents(tokenizer) -> bool:
    """Whether the chat template lays out `documents=` itself (Command R's, Granite's do), judged by its source."""
    template = tokenizer.chat_template
    sources = template.values() if isinstance(template, dict) else [template or ""]
    return any("documents" in source for source in sources)


def with_documents(messages: list[dict], documents: Sequence[dict]) -> list[dict]:
    """`messages` with the documents' text in the system message (appended to the first one, or a new first one)."""
    block = documents_message([d["text"] for d in documents])
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def check_template(template: str) -> None:
    """A prompt template has exactly one field, `{prompt}` (literal braces doubled), else ValueError."""
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"prompt template {template!r} is not a valid template ({e}); write literal braces as "
                         "{{ and }}") from None
    if fields != {"prompt"}:
        raise ValueError(f"prompt template {template!r} must contain {{prompt}} and no other field (found "
                         f"{sorted(fields) or 'none'})")


def load_few_shot(path: str) -> list[tuple[str, str]]:
    """Few-shot examples from an SFT-format file (prompt/completion rows, or one-exchange `messages`), validated as
    training data is (file, row and field named on a bad row): [(prompt, response), ...]."""
    if not Path(path).exists():
        raise UserError(f"few-shot file {path} does not exist")
    try:
        data = load_data(str(path), kind="sft")
    except DataError as e:
        raise UserError(f"few-shot examples: {e}") from None
    if data is None or len(data) == 0:
        raise UserError(f"few-shot file {path} has no examples")
    examples = []
    for i, row in enumerate(data):
        if "messages" in row:
            turns = [m for m in row["messages"] if m["role"] in ("user", "assistant")]
            if [m["role"] for m in turns] != ["user", "assistant"]:
                raise UserError(f"{path}, row {i + 1}: a few-shot example is one user message and one assistant "
                                 f"answer; this row has roles {[m['role'] for m in row['messages']]}")
            examples.append((turns[0]["content"], turns[1]["content"]))
        else:
            examples.append((user_text(row["prompt"]), _text_of_answer(row["completion"])))
    return examples


def _text_of_answer(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def user_text(prompt) -> str:
    """The user text of a plain prompt, or of a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Conversation):
        prompt = prompt.messages
    return next((m["content"] for m in reversed(list(prompt)) if m["role"] == "user"), "")


def render(tokenizer, prompt, prompting: Prompting | None = None) -> list[int]:
    """The token ids the model is given for `prompt` (a string or chat messages), ready for the response."""
    p = prompting or Prompting()
    if p.raw:
        lines = [p.system] if p.system else []
        if isinstance(prompt, Conversation) and prompt.documents:  # a document to continue: the passages head it
            lines.append(documents_message([d["text"] for d in prompt.documents]) + "\n")
        lines += [f"{p.fill(q)}\n{a}\n" for q, a in p.few_shot]
        text = "\n".join(lines + [f"{p.fill(user_text(prompt))}\n"])
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    messages = p.request(prompt)
    shots = [m for q, a in p.few_shot for m in ({"role": "user", "content": p.fill(q)},
                                                 {"role": "assistant", "content": a})]
    has_system = bool(messages) and messages[0]["role"] == "system"
    head = messages[:1] if has_system else ([{"role": "system", "content": p.system}] if p.system else [])
    messages = head + shots + messages[1 if has_system else 0:]
    extra = {"tools": list(p.tools)} if p.tools else {}  # `tools=[]` would still list "no tools" in some templates
    documents = prompt.documents if isinstance(prompt, Conversation) else ()
    if documents and renders_documents(tokenizer):
        extra["documents"] = [{k: d[k] for k in ("title", "text") if k in d} for d in documents]
    elif documents:
        messages = with_documents(messages, documents)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         **extra)["input_ids"]


@dataclass
class Generations:
    """`n` responses per prompt, flat and in prompt order: response i answers prompts[i // n]."""

    prompts: list
    responses: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # the stop token kept (a stop string is not: it is cut off)
    stopped: list[bool]  # whether the response ended at a stop token or stop string
    n: int = 1

    def grouped(self) -> list[list[str]]:
        return [self.responses[i : i + self.n] for i in range(0, len(self.responses), self.n)]


def _cut_at_stop_string(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@torch.no_grad()
def generate(policy: Policy, prompts: list, *, sampling: Sampling | None = None, prompting: Prompting | None = None,
             logits_processor=None, streamer=None, progress: bool = True) -> Generations:
    """`sampling.n` responses to each prompt. `logits_processor`: a list of transformers LogitsProcessors, or a
    callable returning a fresh list per generate() call (constrained decoding keeps per-sequence state). `streamer`:
    a transformers streamer, for one prompt and n=1 (chat)."""
    s = sampling or Sampling()
    tok, model = policy.tokenizer, policy.model
    stops = set(stop_token_ids(tok, model))
    out = Generations(prompts=list(prompts), responses=[], prompt_ids=[], response_ids=[], stopped=[], n=s.n)
    if policy.engine is not None:
        _generate_with_engine(policy, out, s, prompting, stops, logits_processor, streamer)
        return out
    torch.manual_seed(s.seed)
    chunk = max(1, s.batch_size // s.n)
    label = f"generating ({policy.name})"
    for start in tqdm(range(0, len(prompts), chunk), desc=label, disable=not progress or len(prompts) <= chunk):
        ids = [render(tok, p, prompting) for p in prompts[start : start + chunk]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids]).to(model.device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]).to(model.device)
        samples = {"num_return_sequences": s.n}
        if s.prefill_once and s.n > 1:  # one sample per prompt: nothing to share, one forward call less
            input_ids, attention, samples = _prefill_once(model, input_ids, attention, s.n)
        processors = logits_processor() if callable(logits_processor) else logits_processor
        gen = model.generate(input_ids=input_ids, attention_mask=attention, **samples,
                             max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0,
                             temperature=s.temperature or None, top_k=s.top_k if s.temperature > 0 else None,
                             top_p=s.top_p if s.temperature > 0 else None,
                             eos_token_id=sorted(stops), pad_token_id=tok.pad_token_id,
                             **({"stop_strings": list(s.stop), "tokenizer": tok} if s.stop else {}),
                             **({"logits_processor": processors} if processors else {}),
                             **({"streamer": streamer} if streamer is not None else {}))
        for row_index, row in enumerate(gen[:, width:].tolist()):
            _add_response(out, ids[row_index // s.n], row, stops, tok, s.stop)
    return out


def _add_response(out: Generations, prompt_ids: list[int], row: list[int], stops: set[int], tok,
                  stop_strings: Sequence[str]) -> None:
    """One sampled row, cut after its first stop token (padding after it dropped) and at a stop string."""
    cut = next((i + 1 for i, t in enumerate(row) if t in stops), None)
    response = row[:cut] if cut else row
    text = tok.decode(response, skip_special_tokens=True)
    stopped = cut is not None
    if stop_strings:
        text, hit = _cut_at_stop_string(text, stop_strings)
        stopped = stopped or hit
    out.prompt_ids.append(prompt_ids)
    out.response_ids.append(response)
    out.stopped.append(stopped)
    out.responses.append(text.strip())


def _generate_with_engine(policy: Policy, out: Generations, s: Sampling, prompting, stops: set[int],
                          logits_processor, streamer) -> None:
    """`generate` on the policy's vLLM engine: the same prompts, stop tokens and sampling settings.

    Each prompt's samples are seeded from `s.seed` and the prompt's index, so they do not depend on the batch; they
    are not the HF path's samples (another random stream). A stop string is cut off the text afterwards (vLLM here
    has no tokenizer to find it with), so the response's token ids may run past it.
    """
    if logits_processor is not None or streamer is not None:
        raise UserError("constrained output (--regex, --json_schema, --choices) and streaming (chat) run on the "
                        "transformers backend only; drop --generation_backend vllm for them")
    ids = [render(policy.tokenizer, p, prompting) for p in out.prompts]
    # Children of a request get seed + their index (vLLM): spacing prompts n apart keeps every sample's seed apart.
    seeds = [s.seed * 1_000_003 + i * s.n for i in range(len(ids))]
    result = policy.engine.generate(ids, max_tokens=s.max_new_tokens, temperature=s.temperature, n=s.n,
                                    top_p=s.top_p, top_k=s.top_k, stop_token_ids=sorted(stops), seeds=seeds)
    for i, row in enumerate(result.token_ids):
        _add_response(out, ids[i // s.n], row, stops, policy.tokenizer, s.stop)


def _prefill_once(model, input_ids, attention, n: int):
    """The prompts (B, T), left-padded, run through the model once; their KV cache repeated for n samples each.

    Returns the inputs repeated to (B * n, T) in num_return_sequences' order (prompt-major) and the generate()
    arguments that replace num_return_sequences: the filled cache. The last prompt token stays out of the cache:
    generate() starts from one new token.
    """
    cache = DynamicCache(config=model.config)
    if input_ids.shape[1] > 1:
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt starts at position 0
        # Only the cache is wanted: logits over every prompt position would be (B, T, vocab), gigabytes at 128k vocab.
        head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1],
              cache=cache, use_cache=True, **head)
        cache.batch_repeat_interleave(n)
    return input_ids.repeat_interleave(n, 0), attention.repeat_interleave(n, 0), {"cache": cache}
