"""Tools a model may call: plain Python functions, loaded from a module and run for the model, never crashing it.

    tools = load_tools(["rlhf_kit.inference.calculator", "my_tools.py"])
    with ToolRunner(tools, timeout=5.0) as run:
        # "3*12+2*4 = 44"
        run({"type": "function", "function": {"name": "calculator", "arguments": {"expression": "3*12+2*4"}}})

A tool module is a .py file or an importable module; its tools are the public functions defined in it (imported
ones are not), or its `TOOLS` list when it has one. Each needs a type hint on every argument and a docstring with an
`Args:` section: transformers' `get_json_schema` turns them into the JSON schema the chat template lists, and a tool
it cannot describe is refused when loaded, not when the model first calls it.

A call is run in a worker process (forked: the tools are already loaded there), so a tool that hangs is stopped at the
timeout (a thread cannot be killed), and nothing goes through a shell. Whatever goes wrong (an unknown tool, arguments
that do not fit, an exception, a timeout) comes back as an "Error: ..." string for the model to read, as a tool's
result does. This module sits below `inference` and `training`: `rlhf-kit generate`/`chat` and the GRPO recipe load
the same tools.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType

from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

from rlhf_kit.errors import UserError


def load_tools(specs: str | Sequence[str]) -> list[Callable]:
    """The tools of each module in `specs` (a .py file path or an importable module name), in order; UserError on a
    module that cannot be loaded, has no tools, or has a tool transformers cannot describe, or on two tools with one
    name."""
    tools: list[Callable] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        module = _import(spec)
        found = getattr(module, "TOOLS", None)
        if found is None:
            found = [obj for name, obj in vars(module).items()
                     if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("_")]
        if not found:
            raise UserError(f"tools {spec}: no tools found; define public functions there (with type hints and a "
                            "docstring) or list them in TOOLS")
        for tool in found:
            tool_schema(tool, spec)
        tools += found
    names = [tool.__name__ for tool in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"tools: two tools are named {', '.join(twice)}; the model calls tools by name, so each "
                        "name must be unique across the tool modules")
    return tools


def tool_schema(tool: Callable, spec: str = "") -> dict:
    """The JSON schema of `tool` as chat templates list it, `{"type": "function", "function": {...}}`."""
    where = f"{spec}: " if spec else ""
    if not callable(tool):
        raise UserError(f"tools {where}{tool!r} is not a function")
    try:
        return get_json_schema(tool)
    except (DocstringParsingException, TypeHintParsingException) as e:
        raise UserError(f"tools {where}tool {getattr(tool, '__name__', tool)!r} cannot be described to the model: "
                        f"{e}. A tool needs a type hint on every argument and a docstring with an Args: section "
                        "that describes each argument") from None


def _import(spec: str) -> ModuleType:
    if spec.endswith(".py") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"tools {spec}: no such file")
        # A name of its own per file: two `tools.py` from different directories must not replace each other.
        name = f"rlhf_kit_tools_{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(f"tools {spec}: the module fails to load: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as e:
        raise UserError(f"tools {spec}: neither a .py file nor an importable module ({e})") from None


def call_name(call: Mapping) -> str:
    """The tool a call names, in TRL's format `{"type": "function", "function": {"name", "arguments"}}` or flat."""
    return str(call.get("function", call).get("name", ""))


def run_tool_call(call: Mapping, tools: Sequence[Callable], timeout: float = 5.0) -> str:
    """One call run in a fresh worker process: its result as a string, or an "Error: ..." string; never raises."""
    with ToolRunner(tools, timeout) as run:
        return run(call)


class ToolRunner:
    """Runs tool calls in one worker process, replaced after a call that times out (see the module docstring).

    Use it as a context manager (the worker is stopped at the end) and call it with a tool call."""

    def __init__(self, tools: Sequence[Callable], timeout: float = 5.0):
        if timeout <= 0:
            raise UserError(f"tool timeout must be > 0 seconds, got {timeout}")
        self.tools = {tool.__name__: tool for tool in tools}
        self.timeout = timeout
        self._worker = self._connection = None

    def __enter__(self) -> ToolRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._worker is not None:
            self._connection.close()
            self._worker.kill()
            self._worker.join()
            self._worker = self._connection = None

    def __call__(self, call: Mapping) -> str:
        """The call's result as a string, or an "Error: ..." string."""
        return self.run(call)[1]

    def run(self, call: Mapping) -> tuple[bool, str]:
        """(whether the tool returned, its result or the error string)."""
        name = call_name(call)
        arguments = call.get("function", call).get("arguments", {})
        if isinstance(arguments, str):  # some formats carry the arguments as JSON text
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                return False, f"Error: the arguments of {name} are not valid JSON ({e})"
        problem = _check(name, arguments, self.tools)
        if problem:
            return False, problem
        if self._worker is None:
            self._start()
        self._connection.send((name, arguments))
        if not self._connection.poll(self.timeout):
            self.close()  # the hanging call dies with its worker; the next call gets a fresh one
            return False, f"Error: {name} did not finish within {self.timeout:g} seconds and was stopped"
        try:
            return self._connection.recv()
        except EOFError:  # the worker died (os._exit, a crash in C code)
            self.close()
            return False, f"Error: {name} crashed its worker process"

    def _start(self) -> None:
        # fork: the child has the tools already (a tool from a .py file cannot be pickled over to a spawned one).
        context = multiprocessing.get_context("fork")
        self._connection, child = context.Pipe()
        self._worker = context.Process(target=_serve, args=(child, self.tools), daemon=True)
        self._worker.start()
        child.close()


class ToolError(RuntimeError):
    """A guarded tool's call failed (see `guarded`); the message is what the model is told."""


def guarded(runner: ToolRunner) -> list[Callable]:
    """`runner`'s tools as functions that run their calls in its worker, for callers that call tools directly
    (TRL's GRPOTrainer): the same names, signatures and docstrings (so the same schemas), a hanging call stopped
    at the timeout. A failed call raises ToolError with the error string, which TRL counts as a failure and shows
    the model as `{"error": ...}`."""

    def wrap(tool: Callable) -> Callable:
        @functools.wraps(tool)
        def call(**arguments):
            ok, text = runner.run({"name": tool.__name__, "arguments": arguments})
            if not ok:
                raise ToolError(text)
            return text

        return call

    return [wrap(tool) for tool in runner.tools.values()]


def _check(name: str, arguments, tools: Mapping[str, Callable]) -> str | None:
    """An "Error: ..." string when the call cannot be made (no such tool, arguments that do not bind), else None."""
    if name not in tools:
        return f"Error: there is no tool {name!r}; the tools are {', '.join(sorted(tools)) or 'none'}"
    if not isinstance(arguments, Mapping):
        return f"Error: the arguments of {name} must be a JSON object, got {json.dumps(arguments)[:60]}"
    try:
        inspect.signature(tools[name]).bind(**arguments)
    except TypeError as e:
        return f"Error: bad arguments for {name}: {e}"
    return None


def _serve(connection, tools: Mapping[str, Callable]) -> None:
    """The worker's loop: (name, arguments) in, the result or error string out."""
    while True:
        try:
            name, arguments = connection.recv()
        except EOFError:
            return
        try:
            result = tools[name](**arguments)
            answer = True, result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        except Exception as e:  # the model reads what went wrong and may try again
            answer = False, f"Error: {name} raised {type(e).__name__}: {e}"
        connection.send(answer)
