"""The shipped calculator tool (`--tools rlhf_kit.inference.calculator`): arithmetic for a model that cannot add.

The expression is parsed with Python's `ast` and only numbers and arithmetic are evaluated; there is no `eval`, so
names, calls, attributes and strings are refused, and so are powers and results too large to be arithmetic a model
asked for (`2**10**10` would hang the worker for minutes and fill memory).

The result restates what was computed, `expression = value`: a reply can then quote it, and a small model learns
to copy the value from right after the "=" (it copies a number after the same words far sooner than one after a turn
marker alone; the shop task's tiny model did not learn the latter at all in its training budget).

    >>> calculator("3*12+2*4")
    '3*12+2*4 = 44'
    >>> calculator("6/2"), calculator("1/3"), calculator(" -(2.5*4) "), calculator("7 // 2 + 7 % 2")
    ('6/2 = 3', '1/3 = 0.3333333333', '-(2.5*4) = -10', '7 // 2 + 7 % 2 = 4')
"""

from __future__ import annotations

import ast
import operator

ALLOWED = "numbers, + - * / // % **, unary + and -, and parentheses"
MAX_EXPONENT = 1000
MAX_DIGITS = 1000  # an integer result, or an operand, with more digits is refused
_BITS = int(MAX_DIGITS * 3.33)  # log2(10) bits per digit
SIGNIFICANT = 10  # digits a non-whole result is rounded to

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return it with its value.

    Args:
        expression: The arithmetic expression to evaluate, such as 3*12+2*4.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an arithmetic expression; allowed: {ALLOWED}") from None
    return f"{expression.strip()} = {_format(_evaluate(tree.body))}"


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool is not a number here
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and right > 0 and left.bit_length() * right > _BITS:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")  # refused before it is computed
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
        if isinstance(value, complex):  # (-8) ** 0.5
            raise ValueError("the result is not a real number")
        if isinstance(value, int) and value.bit_length() > _BITS:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return value
    raise ValueError(f"{ast.unparse(node)!r} is not allowed in a calculator expression; allowed: {ALLOWED}")


def _format(value: int | float) -> str:
    """Integers as they are; a whole float as an integer ("6/2" -> "3"); others to SIGNIFICANT significant digits."""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("the result is not a finite number")
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return f"{value:.{SIGNIFICANT}g}"
    return str(value)
