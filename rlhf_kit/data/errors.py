"""What a refused source or row says: `DataError` names the source, `RowError` the field of a row, and `describe`
shows the bad value. Shared by the loader and the checks of tool-calling rows (rlhf_kit/data/tool_calls.py)."""

from __future__ import annotations

from rlhf_kit.errors import UserError


class DataError(UserError):
    """A source or a row that cannot be used; the message names the source, row and field."""


class RowError(DataError):
    """A row that breaks its format; `load_data` adds the source and row number to the message."""

    def __init__(self, field: str, expected: str):
        super().__init__(f"field '{field}': {expected}")
        self.field = field
        self.expected = expected

    def __reduce__(self):  # keep it picklable for multiprocessing (the default reduce passes only the message)
        return RowError, (self.field, self.expected)


def describe(value) -> str:
    """A bad value as an error message shows it: its type and a short repr, or what is missing about it."""
    if value is None:
        return "null (a missing value)"
    if isinstance(value, str):
        if not value:
            return "an empty string"
        if not value.strip():
            return f"a whitespace-only string {value!r}"
    if isinstance(value, list) and not value:
        return "an empty list"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"
