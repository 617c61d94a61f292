"""YAML text into documents, read as untrusted input: data or a located error, nothing else.

Manifests come from users and from git repositories. PyYAML's safe loader already
refuses the tags that would run code (`!!python/object`); what it lacks is added here.
Its composer recurses, so nesting is bounded. Aliases are shared, not copied, but
whatever walks the data later repeats them, so a few lines of nested aliases (a
"billion laughs") would stand for billions of nodes: what aliases repeat is bounded,
and an alias inside the node it names (a cycle) is refused. A scalar whose tag says
what its text is not (`!!int x`, the date 2020-13-45) is an error at its spot, not a
crash in a constructor. Keys written twice in one mapping are found on the nodes as
written, before merge keys (`<<`) add the keys they bring, which may be overridden.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

# Deeper than any manifest nests (an AISemble's deepest field is 9 levels down), and far
# short of Python's recursion limit, which the composer's recursion would reach.
MAX_DEPTH = 100
# Nodes that aliases may repeat in one document, counted as if every alias were copied
# out: generous for shared blocks of settings, far short of what exhausts memory.
MAX_ALIASED_NODES = 10_000

_LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")


class YamlError(Exception):
    """The text is not YAML that reads as data; `document` is the one where reading stopped."""

    def __init__(
        self, message: str, document: int, line: int | None = None, column: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.document = document
        self.line = line
        self.column = column


@dataclass(frozen=True)
class DuplicateKey:
    """A key written twice in one mapping: PyYAML would keep the second silently."""

    path: str
    key: str
    line: int


@dataclass(frozen=True)
class Parsed:
    """One document: its root node (for positions), its data, and its repeated keys."""

    index: int
    node: yaml.Node
    data: Any
    duplicates: list[DuplicateKey] = field(default_factory=list)


def documents(text: str) -> Iterator[Parsed]:
    """The documents of `text`, in order; raises YamlError at the first that does not read
    (after yielding those before it). Empty documents are skipped."""
    index = 0
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line, column = _place(text, exc.position)
        raise YamlError(_reader_message(exc), 1, line, column) from None
    try:
        while True:
            try:
                if not loader.check_node():
                    return
                index += 1
                node = loader.get_node()
                duplicates = duplicate_keys(node)
                data = loader.construct_document(node)
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
                raise YamlError(str(exc.problem or exc), index or 1, line, column) from None
            except yaml.YAMLError as exc:
                raise YamlError(str(exc), index or 1) from None
            yield Parsed(index, node, data, duplicates)
    finally:
        loader.dispose()


def duplicate_keys(root: yaml.Node) -> list[DuplicateKey]:
    """Keys repeated within a mapping, each node visited once however often aliases name it."""
    found: list[DuplicateKey] = []
    seen: set[int] = set()

    def visit(node: yaml.Node, path: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else None
                child = f"{path}.{name}" if path else str(name)
                if name is not None and name in keys:
                    found.append(DuplicateKey(child, name, key.start_mark.line + 1))
                if name is not None:
                    keys.add(name)
                visit(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                visit(item, f"{path}[{i}]")

    visit(root, "")
    return found


class _Loader(yaml.SafeLoader):
    """The safe loader, bounded in nesting and in what aliases repeat."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id of a composed node -> nodes it stands for
        self._repeated = 0

    def compose_document(self) -> Any:
        self._sizes, self._repeated = {}, 0
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                self._count_alias(event, target)
            return super().compose_node(parent, index)  # an unknown alias: its own error
        if self._depth >= MAX_DEPTH:
            raise ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
            )
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in children)
        return node

    def _count_alias(self, event: yaml.AliasEvent, target: yaml.Node) -> None:
        size = self._sizes.get(id(target))
        if size is None:  # still being composed: the alias is inside its own anchor
            raise ComposerError(
                None,
                None,
                f"alias *{event.anchor} is inside the node it refers to (a cycle)",
                event.start_mark,
            )
        self._repeated += size
        if self._repeated > MAX_ALIASED_NODES:
            raise ComposerError(
                None,
                None,
                f"aliases repeat more than {MAX_ALIASED_NODES} nodes in this document "
                "(nested aliases multiply); write the repeated parts out",
                event.start_mark,
            )

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as exc:
            # A scalar whose text is not what its tag (given or resolved) says.
            raise ConstructorError(None, None, _unreadable(node, exc), node.start_mark) from None


def _unreadable(node: yaml.Node, exc: Exception) -> str:
    kind = str(node.tag).rsplit(":", 1)[-1]
    value = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
    shown = repr(value if len(value) <= 40 else value[:40] + "...")
    reason = ""  # the constructors' own words mostly repeat the value; a date's do not
    if kind == "timestamp" and isinstance(exc, ValueError):
        reason = str(exc)
    elif kind == "int" and "digits" in str(exc):
        reason = f"more than {sys.get_int_max_str_digits()} digits"
    return f"{shown} is not a valid {kind}" + (f" ({reason})" if reason else "")


def _reader_message(exc: yaml.reader.ReaderError) -> str:
    code = exc.character if isinstance(exc.character, int) else ord(exc.character)
    return f"character U+{code:04X} is not allowed in YAML (write it escaped in double quotes)"


def _place(text: str, position: int) -> tuple[int, int]:
    """1-based line and column of a character offset, counting breaks as YAML does."""
    before = text[:position]
    breaks = list(_LINE_BREAK.finditer(before))
    start = breaks[-1].end() if breaks else 0
    return len(breaks) + 1, position - start + 1


__all__ = ["MAX_ALIASED_NODES", "MAX_DEPTH", "DuplicateKey", "Parsed", "YamlError", "documents"]
