"""The expression language of `filter.where` and `derive.expr`, safe by construction.

Users write Python-looking expressions such as
`amount * 1.2 > 100 and lower(country) in ['fr', 'de']`. They are parsed with
`ast` and rebuilt as a closed tree of the nodes below; anything not on the
whitelist is rejected with the part that offended. `check` then types the tree
against the frame's columns, so a wrong column or a type mistake gives the same
error on both engines, and each engine compiles the typed tree (to Arrow compute
for pandas, to a Column for Spark). Nothing is ever evaluated by Python: no
name, attribute or call can reach the interpreter.

The semantics are SQL's, identical on both engines: a null operand makes
arithmetic and comparisons null; and/or/not use three-valued logic; a filter
keeps the rows where its condition is true (not null); `x / 0` and `x % 0` are
null; `/` always gives a float; `%` takes the sign of the dividend; `+` of two
strings concatenates; `round` rounds halves away from zero.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, replace

NUMBER, STRING, BOOL, DATETIME, NULL, OTHER = (
    "number",
    "string",
    "bool",
    "datetime",
    "null",  # a column holding only nulls: it goes with any kind
    "other",  # structs, lists, binary: passed through, not computed on
)
UNTYPED = "?"

MAX_LENGTH = 10_000
MAX_DEPTH = 64
INT64 = 2**63

Value = bool | int | float | str

# name -> (fewest arguments, most arguments or None, what it does)
FUNCTIONS: dict[str, tuple[int, int | None, str]] = {
    "lower": (1, 1, "lower(text): lower case"),
    "upper": (1, 1, "upper(text): upper case"),
    "trim": (1, 1, "trim(text): without leading and trailing spaces"),
    "length": (1, 1, "length(text): number of characters"),
    "concat": (1, None, "concat(text, ...): the texts joined"),
    "abs": (1, 1, "abs(number)"),
    "floor": (1, 1, "floor(number): the integer below"),
    "ceil": (1, 1, "ceil(number): the integer above"),
    "round": (1, 2, "round(number, digits=0): halves away from zero"),
    "coalesce": (1, None, "coalesce(a, b, ...): the first that is not null"),
    "is_null": (1, 1, "is_null(x): true where x is null (also `x is None`)"),
    "if_else": (
        3,
        3,
        "if_else(condition, then, else): `else` where the condition is false or null",
    ),
    "col": (1, 1, "col('a name'): a column whose name is not an identifier"),
}

_ARITHMETIC = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Mod: "%"}
_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_OTHER_OPERATORS = {
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.MatMult: "@",
}
_FORBIDDEN = {
    ast.Attribute: ("attribute access", ""),
    ast.Subscript: ("indexing", ""),
    ast.Lambda: ("lambda", ""),
    ast.ListComp: ("a comprehension", ""),
    ast.SetComp: ("a comprehension", ""),
    ast.DictComp: ("a comprehension", ""),
    ast.GeneratorExp: ("a comprehension", ""),
    ast.IfExp: ("a conditional expression", "use if_else(condition, then, else)"),
    ast.NamedExpr: ("assignment", ""),
    ast.Await: ("await", ""),
    ast.Yield: ("yield", ""),
    ast.YieldFrom: ("yield", ""),
    ast.JoinedStr: ("an f-string", "use concat()"),
    ast.Starred: ("unpacking", ""),
    ast.Dict: ("a dict", ""),
    ast.Set: ("a set outside `in`", ""),
    ast.List: ("a list outside `in`", ""),
    ast.Tuple: ("a tuple outside `in`", ""),
    ast.Slice: ("a slice", ""),
}


class ExpressionError(ValueError):
    """An expression that cannot be accepted; the message quotes the offending part."""


@dataclass(frozen=True, kw_only=True)
class Expr:
    text: str  # this part's source, quoted in messages
    kind: str = UNTYPED


@dataclass(frozen=True, kw_only=True)
class Column(Expr):
    name: str


@dataclass(frozen=True, kw_only=True)
class Literal(Expr):
    value: Value


@dataclass(frozen=True, kw_only=True)
class Negate(Expr):
    operand: Expr


@dataclass(frozen=True, kw_only=True)
class Arithmetic(Expr):
    op: str  # + - * / %
    left: Expr
    right: Expr


@dataclass(frozen=True, kw_only=True)
class Compare(Expr):
    op: str  # == != < <= > >=
    left: Expr
    right: Expr


@dataclass(frozen=True, kw_only=True)
class Logical(Expr):
    op: str  # and, or
    operands: tuple[Expr, ...]


@dataclass(frozen=True, kw_only=True)
class Not(Expr):
    operand: Expr


@dataclass(frozen=True, kw_only=True)
class IsIn(Expr):
    operand: Expr
    values: tuple[Value, ...]


@dataclass(frozen=True, kw_only=True)
class IsNull(Expr):
    operand: Expr
    negated: bool = False


@dataclass(frozen=True, kw_only=True)
class Call(Expr):
    name: str
    args: tuple[Expr, ...]


def parse(text: str) -> Expr:
    """The untyped tree of `text`, or ExpressionError naming what is not allowed."""
    source = text.strip()
    if not source:
        raise ExpressionError("the expression is empty")
    if len(source) > MAX_LENGTH:
        raise ExpressionError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"not a valid expression: {exc.msg} (column {exc.offset})") from None
    except (RecursionError, MemoryError):
        raise ExpressionError("the expression is nested too deeply") from None
    return _Parser(source).node(tree.body)


def check(expr: Expr, kinds: Mapping[str, str]) -> Expr:
    """`expr` with every node's kind set, given the frame's column kinds.

    Raises ExpressionError for unknown columns and for operations the kinds do
    not allow ("'+' needs two numbers or two strings..."), so both engines
    refuse the same expressions with the same words.
    """
    return _Checker(kinds).visit(expr)


def describe_functions() -> str:
    return ", ".join(sorted(FUNCTIONS))


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.depth = 0

    def part(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source, node) or self.source

    def reject(self, node: ast.AST, what: str, hint: str = "") -> ExpressionError:
        advice = f" ({hint})" if hint else ""
        return ExpressionError(f"{what} is not allowed: '{self.part(node)}'{advice}")

    def node(self, node: ast.expr) -> Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"the expression is nested deeper than {MAX_DEPTH} levels")
        try:
            return self._node(node)
        finally:
            self.depth -= 1

    def _node(self, node: ast.expr) -> Expr:
        text = self.part(node)
        match node:
            case ast.Constant(value=value):
                return Literal(text=text, value=self.literal(node, value))
            case ast.Name(id=name):
                if name.startswith("__"):
                    raise self.reject(node, "a name starting with '__'")
                return Column(text=text, name=name)
            case ast.UnaryOp(op=ast.USub(), operand=operand):
                inner = self.node(operand)
                if isinstance(inner, Literal) and _is_number(inner.value):
                    return Literal(text=text, value=-inner.value)
                return Negate(text=text, operand=inner)
            case ast.UnaryOp(op=ast.UAdd(), operand=operand):
                inner = self.node(operand)
                if isinstance(inner, Literal) and _is_number(inner.value):
                    return replace(inner, text=text)
                raise self.reject(node, "unary '+' (other than on a number)")
            case ast.UnaryOp(op=ast.Not(), operand=operand):
                return Not(text=text, operand=self.node(operand))
            case ast.UnaryOp(op=ast.Invert()):
                raise self.reject(node, "'~'", "use not")
            case ast.BinOp(op=op, left=left, right=right):
                symbol = _ARITHMETIC.get(type(op))
                if symbol is None:
                    name = _OTHER_OPERATORS.get(type(op), type(op).__name__)
                    raise self.reject(node, f"operator '{name}'", "allowed: + - * / %")
                return Arithmetic(
                    text=text, op=symbol, left=self.node(left), right=self.node(right)
                )
            case ast.BoolOp(op=op, values=values):
                name = "and" if isinstance(op, ast.And) else "or"
                return Logical(text=text, op=name, operands=tuple(self.node(v) for v in values))
            case ast.Compare():
                return self.compare(node)
            case ast.Call():
                return self.call(node)
        what, hint = _FORBIDDEN.get(type(node), (type(node).__name__, ""))
        raise self.reject(node, what, hint)

    def literal(self, node: ast.AST, value: object) -> Value:
        if value is None:
            raise ExpressionError(
                f"None is only allowed as `x is None` or `x is not None`: '{self.part(node)}'"
            )
        if isinstance(value, bool | str | float):
            return value
        if isinstance(value, int):
            if not -INT64 <= value < INT64:
                raise ExpressionError(f"the number {value} does not fit in 64 bits")
            return value
        raise self.reject(node, f"a {type(value).__name__} literal")

    def compare(self, node: ast.Compare) -> Expr:
        text = self.part(node)
        parts: list[Expr] = []
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn):
                test: Expr = IsIn(text=text, operand=self.node(left), values=self.values(right))
                if isinstance(op, ast.NotIn):
                    test = Not(text=text, operand=test)
            elif isinstance(op, ast.Is | ast.IsNot):
                if not (isinstance(right, ast.Constant) and right.value is None):
                    raise self.reject(node, "'is' with anything but None")
                test = IsNull(text=text, operand=self.node(left), negated=isinstance(op, ast.IsNot))
            else:
                symbol = _COMPARE[type(op)]
                test = Compare(text=text, op=symbol, left=self.node(left), right=self.node(right))
            parts.append(test)
            left = right
        if len(parts) == 1:
            return parts[0]
        return Logical(text=text, op="and", operands=tuple(parts))

    def values(self, node: ast.expr) -> tuple[Value, ...]:
        if not isinstance(node, ast.List | ast.Tuple | ast.Set):
            raise ExpressionError(
                f"`in` needs a list of literal values, like x in [1, 2]: '{self.part(node)}'"
            )
        if not node.elts:
            raise ExpressionError("`in` needs at least one value: '[]'")
        values = []
        for element in node.elts:
            item = self.node(element)
            if not isinstance(item, Literal):
                raise ExpressionError(
                    f"`in` lists hold literal values only: '{self.part(element)}'"
                )
            values.append(item.value)
        return tuple(values)

    def call(self, node: ast.Call) -> Expr:
        text = self.part(node)
        if not isinstance(node.func, ast.Name):
            self.node(node.func)  # names what is wrong in it: attribute access, lambda...
            raise self.reject(node, "calling anything but a function by name")
        name = node.func.id
        if name not in FUNCTIONS:
            raise ExpressionError(
                f"unknown function '{name}' in '{text}' (functions: {describe_functions()})"
            )
        if node.keywords:
            raise self.reject(node, f"keyword arguments to {name}()")
        fewest, most, usage = FUNCTIONS[name]
        count = len(node.args)
        if count < fewest or (most is not None and count > most):
            raise ExpressionError(f"{usage} - got {count} argument(s) in '{text}'")
        if name == "col":
            (argument,) = node.args
            if not (isinstance(argument, ast.Constant) and isinstance(argument.value, str)):
                raise ExpressionError(f"col() takes a column name in quotes: '{text}'")
            return Column(text=text, name=argument.value)
        args = tuple(self.node(a) for a in node.args)
        if name == "is_null":
            return IsNull(text=text, operand=args[0])
        if name == "round" and len(args) == 2:
            digits = args[1]
            if not (
                isinstance(digits, Literal)
                and isinstance(digits.value, int)
                and not isinstance(digits.value, bool)
                and -30 <= digits.value <= 30
            ):
                raise ExpressionError(
                    f"round()'s digits must be a whole number between -30 and 30: '{text}'"
                )
        return Call(text=text, name=name, args=args)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _literal_kind(value: Value) -> str:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, str):
        return STRING
    return NUMBER


def _unify(*kinds: str) -> str | None:
    """The one kind these values share (nulls go with anything), or None."""
    known = {k for k in kinds if k != NULL}
    if not known:
        return NULL
    if len(known) == 1:
        return known.pop()
    return None


class _Checker:
    def __init__(self, kinds: Mapping[str, str]) -> None:
        self.kinds = kinds

    def visit(self, expr: Expr) -> Expr:
        match expr:
            case Column(name=name):
                if name not in self.kinds:
                    listed = ", ".join(self.kinds) or "none"
                    raise ExpressionError(f"unknown column '{name}' (columns: {listed})")
                return replace(expr, kind=self.kinds[name])
            case Literal(value=value):
                return replace(expr, kind=_literal_kind(value))
            case Negate(operand=operand):
                inner = self.expect(self.visit(operand), (NUMBER,), "'-'", expr)
                return replace(expr, operand=inner, kind=NUMBER)
            case Arithmetic(op=op, left=left, right=right):
                return self.arithmetic(expr, op, self.visit(left), self.visit(right))
            case Compare(op=op, left=left, right=right):
                a, b = self.visit(left), self.visit(right)
                allowed = (
                    (NUMBER, STRING, BOOL, DATETIME)
                    if op in ("==", "!=")
                    else (
                        NUMBER,
                        STRING,
                        DATETIME,
                    )
                )
                shared = _unify(a.kind, b.kind)
                if shared is None or (shared != NULL and shared not in allowed):
                    raise ExpressionError(
                        f"cannot compare {a.kind} with {b.kind} using '{op}' in '{expr.text}'"
                    )
                return replace(expr, left=a, right=b, kind=BOOL)
            case Logical(op=op, operands=operands):
                typed = tuple(
                    self.expect(self.visit(o), (BOOL,), f"'{op}'", expr) for o in operands
                )
                return replace(expr, operands=typed, kind=BOOL)
            case Not(operand=operand):
                inner = self.expect(self.visit(operand), (BOOL,), "'not'", expr)
                return replace(expr, operand=inner, kind=BOOL)
            case IsIn(operand=operand, values=values):
                inner = self.visit(operand)
                shared = _unify(inner.kind, *(_literal_kind(v) for v in values))
                if shared is None or shared not in (NUMBER, STRING, BOOL, NULL):
                    listed = sorted({_literal_kind(v) for v in values})
                    raise ExpressionError(
                        f"`in` compares {inner.kind} with {' and '.join(listed)} values "
                        f"in '{expr.text}'"
                    )
                return replace(expr, operand=inner, kind=BOOL)
            case IsNull(operand=operand):
                return replace(expr, operand=self.visit(operand), kind=BOOL)
            case Call():
                return self.call(expr)
        raise ExpressionError(f"cannot type '{expr.text}'")  # pragma: no cover - closed set

    def expect(self, typed: Expr, kinds: tuple[str, ...], what: str, whole: Expr) -> Expr:
        if typed.kind not in (*kinds, NULL):
            wanted = " or ".join(kinds)
            raise ExpressionError(
                f"{what} needs {wanted}; '{typed.text}' is {typed.kind} in '{whole.text}'"
            )
        return typed

    def arithmetic(self, expr: Arithmetic, op: str, a: Expr, b: Expr) -> Expr:
        if op == "+":
            shared = _unify(a.kind, b.kind)
            if shared not in (NUMBER, STRING, NULL):
                raise ExpressionError(
                    f"'+' needs two numbers or two strings; got {a.kind} and {b.kind} "
                    f"in '{expr.text}'"
                )
            kind = NUMBER if shared == NULL else shared
        else:
            for side in (a, b):
                self.expect(side, (NUMBER,), f"'{op}'", expr)
            kind = NUMBER
        return replace(expr, left=a, right=b, kind=kind)

    def call(self, expr: Call) -> Expr:
        args = tuple(self.visit(a) for a in expr.args)
        name = expr.name
        what = f"{name}()"
        if name in ("lower", "upper", "trim", "concat"):
            args = tuple(self.expect(a, (STRING,), what, expr) for a in args)
            kind = STRING
        elif name == "length":
            args = tuple(self.expect(a, (STRING,), what, expr) for a in args)
            kind = NUMBER
        elif name in ("abs", "floor", "ceil", "round"):
            args = tuple(self.expect(a, (NUMBER,), what, expr) for a in args)
            kind = NUMBER
        elif name == "coalesce":
            shared = _unify(*(a.kind for a in args))
            if shared is None or shared == OTHER:
                kinds = ", ".join(a.kind for a in args)
                raise ExpressionError(
                    f"coalesce() needs arguments of one kind; got {kinds} in '{expr.text}'"
                )
            kind = shared
        elif name == "if_else":
            condition = self.expect(args[0], (BOOL,), "if_else()'s condition", expr)
            shared = _unify(args[1].kind, args[2].kind)
            if shared is None or shared == OTHER:
                raise ExpressionError(
                    f"if_else() needs `then` and `else` of one kind; got {args[1].kind} and "
                    f"{args[2].kind} in '{expr.text}'"
                )
            args = (condition, args[1], args[2])
            kind = shared
        else:  # pragma: no cover - the parser admits only the functions above
            raise ExpressionError(f"unknown function '{name}'")
        return replace(expr, args=args, kind=kind)
