"""Templates and conditions in workflow files.

A template is text with expressions in double braces: `"Summarise: {{ steps.transcript.text }}"`.
A condition (`when:`) is one expression: `len(steps.notes.passages) > 0`. Expressions are a small
subset of Python, read with `ast` and evaluated here, never with `eval`:

- references rooted at `inputs` or `steps`: `inputs.topic`, `steps.look.labels[0].label`;
- a field of a list of records is that field of each: `steps.notes.passages.text` is a list of texts;
- literals, comparisons (`== != < <= > >= in`, `not in`), `and`, `or`, `not`, unary minus;
- the functions `len(x)`, `join(items, sep=" ")`, `lower(text)`, `upper(text)`.

A template that is one expression and nothing else keeps its value's type (a number stays a
number); otherwise values are written into the text, lists and records as JSON.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from models.errors import SignalgraphError

ROOTS = ("inputs", "steps")
_TEMPLATE = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}", re.DOTALL)  # no braces inside
_COMPARE = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}


def _join(items: Any, sep: str = " ") -> str:
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"join needs a list, not {_kind(items)}")
    return str(sep).join(item if isinstance(item, str) else json.dumps(item) for item in items)


def _text(name: str, method: str):
    def apply(value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{name} needs text, not {_kind(value)}")
        return getattr(value, method)()

    return apply


FUNCTIONS = {"len": len, "join": _join, "lower": _text("lower", "lower"), "upper": _text("upper", "upper")}


class ExpressionError(ValueError):
    """An expression that cannot be read (syntax, a construct or name that is not allowed)."""


class EvaluationError(SignalgraphError):
    """An expression that could be read but not evaluated on this run's values."""


class SkippedStepError(EvaluationError):
    """A field of a step that was skipped (its `when` was false), so it has no value."""


# --- reading ------------------------------------------------------------------------------------


def parse(source: str) -> ast.Expression:
    """The checked syntax tree of one expression; `ExpressionError` says what is not allowed."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"{source.strip()!r} is not a valid expression ({exc.msg})") from None
    _check(tree.body)
    return tree


def _check(node: ast.AST) -> None:
    match node:
        case ast.Constant():
            return
        case ast.Attribute(value=ast.Name(id=root)) if root in ROOTS:
            return
        case ast.Attribute():
            _check(node.value)
        case ast.Subscript():
            _check(node.value)
            index = node.slice
            if isinstance(index, ast.UnaryOp) and isinstance(index.op, ast.USub):
                index = index.operand
            if not (isinstance(index, ast.Constant) and isinstance(index.value, (int, str))):
                raise ExpressionError(f"an index must be a number or a quoted name, not {ast.unparse(node.slice)!r}")
        case ast.Name(id=root) if root in ROOTS:
            raise ExpressionError(f"write {root}.NAME, not {root} alone")
        case ast.Name():
            raise ExpressionError(f"unknown name {node.id!r} (expressions refer to inputs.NAME and steps.NAME)")
        case ast.Call(func=ast.Name(id=name)) if name in FUNCTIONS and not node.keywords:
            for argument in node.args:
                _check(argument)
        case ast.Call():
            raise ExpressionError(f"{ast.unparse(node)!r}: only {', '.join(FUNCTIONS)} can be called "
                                  "(with positional arguments)")
        case ast.Compare():
            for part in (node.left, *node.comparators):
                _check(part)
            for op in node.ops:
                if type(op) not in _COMPARE:
                    raise ExpressionError(f"the comparison {type(op).__name__} is not allowed")
        case ast.BoolOp():
            for value in node.values:
                _check(value)
        case ast.UnaryOp(op=ast.Not() | ast.USub()):
            _check(node.operand)
        case ast.List() | ast.Tuple():
            for item in node.elts:
                _check(item)
        case _:
            raise ExpressionError(f"{ast.unparse(node)!r} is not allowed in an expression "
                                  "(references, literals, comparisons, and/or/not, len/join/lower/upper)")


def references(tree: ast.AST) -> list[tuple[str, str]]:
    """The (root, name) pairs an expression refers to: ("inputs", "topic"), ("steps", "look")."""
    return [(node.value.id, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ROOTS]


def template_expressions(text: str) -> list[ast.Expression]:
    """The parsed expressions of a template, in order; `ExpressionError` for an unclosed brace too."""
    trees = [parse(match.group(1)) for match in _TEMPLATE.finditer(text)]
    rest = _TEMPLATE.sub("", text)
    if "{{" in rest or "}}" in rest:
        raise ExpressionError(f"{text!r} has an unmatched '{{{{' or '}}}}'")
    return trees


def condition(text: str) -> ast.Expression:
    """A `when:` expression; it may also be written as a template, `{{ ... }}`."""
    stripped = text.strip()
    match = _TEMPLATE.fullmatch(stripped)
    return parse(match.group(1) if match else stripped)


# --- evaluating ---------------------------------------------------------------------------------


def evaluate(tree: ast.Expression, scope: dict[str, dict]) -> Any:
    """The value of a parsed expression; `scope` maps inputs and steps to their values
    (a skipped step's value is None)."""
    try:
        return _value(tree.body, scope)
    except EvaluationError:
        raise
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{ast.unparse(tree.body)!r}: {exc}") from None


def _value(node: ast.AST, scope: dict[str, dict]) -> Any:
    match node:
        case ast.Constant():
            return node.value
        case ast.Attribute(value=ast.Name(id=root)) if root in ROOTS:
            values = scope[root]
            if node.attr not in values:  # the spec's checks keep this for runs of older files
                raise EvaluationError(f"{root}.{node.attr} has no value in this run")
            return values[node.attr]
        case ast.Attribute():
            return _field(_present(node.value, scope), node.attr, node)
        case ast.Subscript():
            index = node.slice
            key = -index.operand.value if isinstance(index, ast.UnaryOp) else index.value
            return _item(_present(node.value, scope), key, node)
        case ast.Call():
            return FUNCTIONS[node.func.id](*(_value(a, scope) for a in node.args))
        case ast.Compare():
            left = _value(node.left, scope)
            for op, right_node in zip(node.ops, node.comparators):
                right = _value(right_node, scope)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        case ast.BoolOp():
            result = None
            for value in node.values:
                result = _value(value, scope)
                if isinstance(node.op, ast.And) != bool(result):
                    return result
            return result
        case ast.UnaryOp():
            operand = _value(node.operand, scope)
            return (not operand) if isinstance(node.op, ast.Not) else -operand
        case ast.List() | ast.Tuple():
            return [_value(item, scope) for item in node.elts]
    raise EvaluationError(f"{ast.unparse(node)!r} cannot be evaluated")


def _present(node: ast.AST, scope: dict[str, dict]) -> Any:
    """The value of `node`, which must not be None: its field or item is asked for next."""
    value = _value(node, scope)
    if value is None:
        where = ast.unparse(node)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "steps":
            raise SkippedStepError(f"step {node.attr!r} was skipped, so {where} has no fields")
        raise EvaluationError(f"{where} is null, so it has no fields")
    return value


def _field(value: Any, name: str, node: ast.Attribute) -> Any:
    if isinstance(value, list):  # the field of each record
        return [_field(item, name, node) for item in value]
    if not isinstance(value, dict):
        raise EvaluationError(f"{ast.unparse(node.value)} is {_kind(value)}, which has no field {name!r}")
    if name not in value:
        raise EvaluationError(f"{ast.unparse(node.value)} has no field {name!r} "
                              f"(it has: {', '.join(map(str, value)) or 'nothing'})")
    return value[name]


def _item(value: Any, key: int | str, node: ast.Subscript) -> Any:
    where = ast.unparse(node.value)
    if isinstance(key, str):
        return _field(value, key, ast.Attribute(value=node.value, attr=key))
    if not isinstance(value, (list, str)):
        raise EvaluationError(f"{where} is {_kind(value)}, which cannot be indexed with [{key}]")
    if not -len(value) <= key < len(value):
        items = f"{len(value)} item{'s' if len(value) != 1 else ''}"
        raise EvaluationError(f"{where} has {items}, so [{key}] is out of range")
    return value[key]


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "text",
            list: "a list", dict: "a record"}.get(type(value), type(value).__name__)


def render(value: Any, scope: dict[str, dict]) -> Any:
    """`value` (text, or lists and records of them) with every template filled in."""
    if isinstance(value, dict):
        return {key: render(item, scope) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, scope) for item in value]
    if not isinstance(value, str) or "{{" not in value:
        return value
    whole = _TEMPLATE.fullmatch(value.strip())
    if whole:
        return evaluate(parse(whole.group(1)), scope)
    return _TEMPLATE.sub(lambda match: _as_text(evaluate(parse(match.group(1)), scope)), value)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value) if isinstance(value, (int, float)) else json.dumps(value, ensure_ascii=False)
