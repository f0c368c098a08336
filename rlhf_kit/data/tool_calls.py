"""Tool-calling rows in TRL's format: what the loader checks beyond plain conversations.

    {"tools": [{"type": "function", "function": {"name": "add", "description": "...",
                "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}],
     "messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "tool_calls": [{"type": "function", "id": "c1",
                                                        "function": {"name": "add", "arguments": {"a": 1}}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "1"},
                  {"role": "assistant", "content": "..."}]}

`tools` is a list of JSON schemas as transformers' `get_json_schema` writes them (or a JSON string of one: TRL's
SFTTrainer reads both, and a string keeps Arrow from merging every row's schemas into one struct). A call's
`arguments` is an object or a JSON string of one. Every call must name a declared tool (when the row declares any)
and match its parameters, and each assistant turn with `tool_calls` is followed by one `tool` message per call: a
row that would teach the model a call its tools cannot take fails here, naming its field, not during training.
"""

from __future__ import annotations

import json

from rlhf_kit.data.errors import RowError, describe

# JSON Schema's types, as Python checks them; bool is an int in Python, but not a JSON integer or number.
_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
_CALL_EXAMPLE = "{'type': 'function', 'function': {'name': ..., 'arguments': {...}}}"
_SCHEMA_EXAMPLE = ('{"type": "function", "function": {"name": ..., "description": ..., "parameters": '
                   '{"type": "object", "properties": {...}, "required": [...]}}}')


def parse_tools(value, field: str = "tools") -> list[dict] | None:
    """The row's tool schemas (a JSON string parsed), checked; None when the row declares none (null or [])."""
    value = _parsed(value, field, "a list of tool schemas or a JSON string of one")
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of tool schemas {_SCHEMA_EXAMPLE}, got {describe(value)}")
    names = set()
    for i, tool in enumerate(value):
        name = _tool_name(tool, f"{field}[{i}]")
        if name in names:
            raise RowError(f"{field}[{i}].function.name", f"tool {name!r} is declared twice")
        names.add(name)
    return value


def _tool_name(tool, field: str) -> str:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise RowError(field, f"expected a function schema {_SCHEMA_EXAMPLE} (transformers' get_json_schema writes "
                       f"one from a typed, documented Python function), got {describe(tool)}")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RowError(f"{field}.function.name", f"expected the tool's name, a non-empty string, got {describe(name)}")
    parameters = function.get("parameters")
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise RowError(f"{field}.function.parameters", "expected a JSON schema of the arguments object, "
                       "{'type': 'object', 'properties': {...}, 'required': [...]} (an empty 'properties' for a tool "
                       f"without arguments), got {describe(parameters)}")
    properties = parameters.get("properties")
    if properties is not None and not isinstance(properties, dict):
        raise RowError(f"{field}.function.parameters.properties", "expected an object mapping each argument to its "
                       f"schema, got {describe(properties)}")
    return name


def tool_parameters(tools: list[dict] | None) -> dict[str, dict] | None:
    """{tool name: its parameters schema} of checked `tools`; None when the row declares none (calls go unchecked)."""
    if tools is None:
        return None
    return {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}


def check_tool_calls(calls, field: str, declared: dict[str, dict] | None) -> list[dict]:
    """Check an assistant message's `tool_calls` (`field`) against the row's `declared` tools; return the calls."""
    if not isinstance(calls, list) or not calls:
        raise RowError(field, f"expected a non-empty list of calls {_CALL_EXAMPLE}, got {describe(calls)}")
    for i, call in enumerate(calls):
        where = f"{field}[{i}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise RowError(where, f"expected a call {_CALL_EXAMPLE}, got {describe(call)}")
        if call.get("type", "function") not in ("function", None):
            raise RowError(f"{where}.type", f"expected 'function', got {describe(call['type'])}")
        name = call["function"].get("name")
        if not isinstance(name, str) or not name.strip():
            raise RowError(f"{where}.function.name", f"expected the called tool's name, got {describe(name)}")
        if declared is not None and name not in declared:
            raise RowError(f"{where}.function.name", f"calls {name!r}, which the row's 'tools' do not declare "
                           f"(declared: {', '.join(map(repr, declared))}); declare it or fix the name")
        arguments = _arguments(call["function"].get("arguments"), f"{where}.function.arguments")
        if declared is not None:
            _match_schema(arguments, declared[name], f"{where}.function.arguments", name)
    return calls


def _parsed(value, field: str, expected: str):
    """A JSON string parsed (other values as they are); RowError saying where the JSON breaks."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise RowError(field, f"expected {expected}, got invalid JSON ({error.msg} at character {error.pos}) in "
                       f"{describe(value)}") from None


def _arguments(value, field: str) -> dict:
    value = _parsed(value, field, "a JSON object of arguments")
    if not isinstance(value, dict):
        raise RowError(field, "expected an object of arguments (or a JSON string of one; {} for none), "
                       f"got {describe(value)}")
    return value


def _match_schema(arguments: dict, parameters: dict, field: str, tool: str) -> None:
    # Arrow gives every schema in a column the keys any schema has, null where unset: None is "not given".
    properties = parameters.get("properties") or {}
    for name in parameters.get("required") or []:
        if name not in arguments:
            raise RowError(field, f"{tool!r} requires the argument {name!r}, which the call does not give")
    for name, value in arguments.items():
        if name not in properties:
            if parameters.get("additionalProperties"):
                continue
            raise RowError(f"{field}.{name}", f"{tool!r} takes no argument {name!r} (its parameters: "
                           f"{', '.join(map(repr, properties)) or 'none'})")
        _match_type(value, properties[name] or {}, f"{field}.{name}", tool)


def _match_type(value, schema: dict, field: str, tool: str) -> None:
    wanted = schema.get("type")
    types = [wanted] if isinstance(wanted, str) else list(wanted or [])
    known = [t for t in types if t in _JSON_TYPES]
    if known and not any(_JSON_TYPES[t](value) for t in known):
        raise RowError(field, f"{tool!r} declares this argument as {' or '.join(known)}, got {describe(value)}")
    if schema.get("enum") is not None and value not in schema["enum"]:
        raise RowError(field, f"{tool!r} allows only {schema['enum']} here, got {describe(value)}")


def check_tool_results(messages: list[dict], i: int, field: str) -> int:
    """Check that the calls of assistant turn `i` are each answered by one `tool` message right after it, matching
    their ids when the row gives ids; return the position of the first message after those results."""
    calls = messages[i]["tool_calls"]
    ids = [call.get("id") for call in calls]
    names = {call["function"]["name"] for call in calls}
    answered = set()
    for k in range(len(calls)):
        j = i + 1 + k
        if j >= len(messages) or messages[j]["role"] != "tool":
            got = f"got '{messages[j]['role']}'" if j < len(messages) else "the conversation ends"
            raise RowError(f"{field}[{j}]" if j < len(messages) else field,
                           f"expected a 'tool' message with the result of call {k} of {field}[{i}].tool_calls (one "
                           f"per call: {len(calls)}), {got}")
        result = messages[j]
        call_id = result.get("tool_call_id")
        if call_id is not None and any(ids):
            if call_id not in ids:
                raise RowError(f"{field}[{j}].tool_call_id", f"expected the id of one of the calls of {field}[{i}] "
                               f"({', '.join(repr(x) for x in ids if x is not None)}), got {describe(call_id)}")
            if call_id in answered:
                raise RowError(f"{field}[{j}].tool_call_id", f"call {call_id!r} is answered twice")
            answered.add(call_id)
        if result.get("name") is not None and result["name"] not in names:
            raise RowError(f"{field}[{j}].name", f"expected the name of a tool called in {field}[{i}] "
                           f"({', '.join(map(repr, sorted(names)))}), got {describe(result['name'])}")
    after = i + 1 + len(calls)
    if after < len(messages) and messages[after]["role"] == "tool":
        raise RowError(f"{field}[{after}].role", f"a 'tool' message with no call to answer: {field}[{i}] makes "
                       f"{len(calls)} call(s), each answered by one 'tool' message")
    return after
