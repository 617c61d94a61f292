"""Read AISemble resources from YAML with errors that point at the exact spot.

Files hold one or more YAML documents, the format `kubectl apply -f` and
`podman kube play` take. `kind: Secret` (v1) documents are validated and handed
over as `SecretDocument`s (for podman's secret store, never ours). Documents of
other kinds (Pod, Deployment, ...) are skipped and reported, so one file can
serve both tools. Every problem in the input is collected and reported at once,
naming the file, the document, the field path and the line, so a user fixes
everything in one go; a caller applies nothing unless the whole input is valid.
The text becomes YAML nodes and data in `parsing`, which bounds what untrusted YAML
may cost; here the data becomes resources.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from aisemble import parsing
from aisemble.model import (
    API_VERSION,
    GROUP,
    KIND,
    SUSPEND_ANNOTATION,
    AISemble,
    SpecError,
    StackKey,
)
from aisemble.model.checks import HostPort, host_bindings, host_ports_clash, spec_problems
from aisemble.model.secret import Secret

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located as precisely as the input allows."""

    source: str
    message: str
    document: int | None = None
    resource: str | None = None
    path: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = [self.source]
        if self.document is not None:
            doc = f"document {self.document}"
            if self.resource:
                doc += f" ({self.resource})"
            where.append(doc)
        if self.path:
            where.append(self.path)
        text = ": ".join(where)
        if self.line is not None:
            text += f" (line {self.line}" + (f", column {self.column})" if self.column else ")")
        return f"{text}: {self.message}"


class ManifestError(Exception):
    """The input is invalid; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Document:
    """A valid AISemble found in the input, with where it came from."""

    source: str
    index: int
    line: int
    resource: AISemble
    node: Any = field(default=None, compare=False, repr=False)  # its YAML, for positions

    @property
    def key(self) -> StackKey:
        return self.resource.key

    def line_of(self, path: str) -> int | None:
        """The line of a field (`spec.expose[0].hostPort`), if the document came as YAML."""
        return _line_of(self.node, _parse_path(path))


@dataclass(frozen=True)
class Skipped:
    """A document of a kind AI-semble does not manage."""

    source: str
    index: int
    kind: str
    name: str
    why: str = f"not an {KIND}"

    def __str__(self) -> str:
        return (
            f"{self.source}: document {self.index}: skipped {self.kind} {self.name!r} ({self.why})"
        )


@dataclass(frozen=True)
class SecretDocument:
    """A valid `kind: Secret` found in the input (its values stay out of every message)."""

    source: str
    index: int
    line: int
    secret: Secret

    def skipped(self, why: str) -> Skipped:
        return Skipped(self.source, self.index, "Secret", self.secret.name, why)


@dataclass
class Manifests:
    documents: list[Document] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    secrets: list[SecretDocument] = field(default_factory=list)

    def keys(self) -> list[StackKey]:
        return [d.key for d in self.documents]


def load_paths(paths: Iterable[str | Path], recursive: bool = False) -> Manifests:
    """Load every YAML file named (directories: their *.yaml/*.yml files, sorted)."""
    files: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if str(raw) == "-":
            files.append(path)
        elif path.is_dir():
            files.extend(yaml_files(path, recursive))
        elif path.exists():
            files.append(path)
        else:
            problems.append(Problem(str(raw), "no such file or directory"))
    texts: list[tuple[str, str]] = []
    for path in files:
        if str(path) == "-":
            import sys

            texts.append(("<stdin>", sys.stdin.read()))
            continue
        try:
            texts.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(path), f"cannot read: {exc}"))
    return _load_all(texts, problems)


def load_text(text: str, source: str = "<input>") -> Manifests:
    return _load_all([(source, text)], [])


def load_texts(texts: Iterable[tuple[str, str]], problems: Iterable[Problem] = ()) -> Manifests:
    """Load (source name, text) pairs as one input, e.g. the files of a git commit.

    `problems` found while reading them (an unreadable file) join those of the texts.
    """
    return _load_all(list(texts), list(problems))


def load_object(data: dict[str, Any], source: str) -> AISemble:
    """Validate a resource that arrives parsed (from the Kubernetes API): problems name the
    field path; there are no lines to give. Fields the API server adds are dropped first."""
    body = {k: data[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in data}
    meta = body.get("metadata")
    name = str(meta.get("name", "?")) if isinstance(meta, Mapping) else "?"
    resource, problems = _validate(body, None, source, None, f"{KIND} {name}")
    if resource is None:
        raise ManifestError(problems)
    return resource


def yaml_files(directory: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(
        p
        for p in directory.glob(pattern)
        if p.is_file() and p.suffix in YAML_SUFFIXES and not p.name.startswith(".")
    )


def _load_all(texts: list[tuple[str, str]], problems: list[Problem]) -> Manifests:
    result = Manifests()
    claims: list[Claims] = []
    for source, text in texts:
        _load_one(source, text, result, problems, claims)
    problems.extend(_across_documents(claims))
    named: dict[str, SecretDocument] = {}
    for sd in result.secrets:
        first = named.setdefault(sd.secret.name, sd)
        if first is not sd:
            twice = f"Secret {sd.secret.name} is declared twice; first at {first.source} "
            twice += f"document {first.index} (line {first.line})"
            problems.append(Problem(sd.source, twice, document=sd.index, line=sd.line))
    if problems:
        files = {p.source: i for i, p in reversed(list(enumerate(problems)))}
        problems.sort(key=lambda p: (files[p.source], p.document or 0, p.line or 0))
        raise ManifestError(problems)
    return result


@dataclass(frozen=True)
class Claims:
    """What an AISemble document claims, read from its data even when that is invalid:
    its stack, and its host ports (expose index, binding, line, column)."""

    source: str
    index: int
    line: int
    name: str
    key: StackKey | None
    ports: list[tuple[int, HostPort, int | None, int | None]]

    @classmethod
    def of(cls, source: str, index: int, name: str, node: Any, data: Mapping) -> Claims:
        meta, spec, key = data.get("metadata"), data.get("spec"), None
        if isinstance(meta, Mapping) and isinstance(meta.get("name"), str):
            namespace = meta.get("namespace", "default")
            key = StackKey(namespace, meta["name"]) if isinstance(namespace, str) else None
        bindings = host_bindings(spec) if isinstance(spec, Mapping) else []
        ports = [(i, b, *_position(node, ("spec", "expose", i, "hostPort"))) for i, b in bindings]
        return cls(source, index, node.start_mark.line + 1, name, key, ports)


def _across_documents(claims: list[Claims]) -> list[Problem]:
    """A stack declared twice, and a host port two stacks claim, whatever else is wrong."""
    problems = []
    seen: dict[StackKey, Claims] = {}
    taken: list[tuple[HostPort, str]] = []  # binding, where it is claimed
    for doc in claims:
        first = seen.setdefault(doc.key, doc) if doc.key is not None else doc
        if first is not doc:  # its host ports are its twin's: one problem says enough
            twice = f"{KIND} {doc.key} is declared twice; first at {first.source} "
            twice += f"document {first.index} (line {first.line})"
            problems.append(Problem(doc.source, twice, document=doc.index, line=doc.line))
            continue
        for i, binding, line, column in doc.ports:
            by = next((where for other, where in taken if host_ports_clash(binding, other)), None)
            if by is not None:
                problems.append(
                    Problem(
                        doc.source,
                        f"host port {binding[1]}/{binding[2]} on {binding[0]} is already "
                        f"claimed by {by}",
                        doc.index,
                        f"{KIND} {doc.name}",
                        f"spec.expose[{i}].hostPort",
                        line,
                        column,
                    )
                )
        for i, binding, line, _ in doc.ports:
            where = f"{doc.source} document {doc.index} ({KIND} {doc.key or doc.name}), "
            where += f"spec.expose[{i}].hostPort" + (f" (line {line})" if line else "")
            taken.append((binding, where))
    return problems


def _load_one(
    source: str, text: str, result: Manifests, problems: list[Problem], claims: list[Claims]
) -> None:
    try:
        for parsed in parsing.documents(text):
            _load_document(source, parsed, result, problems, claims)
    except parsing.YamlError as exc:
        problems.append(
            Problem(
                source,
                f"invalid YAML: {exc.message}",
                document=exc.document,
                line=exc.line,
                column=exc.column,
            )
        )


def _load_document(
    source: str,
    parsed: parsing.Parsed,
    result: Manifests,
    problems: list[Problem],
    claims: list[Claims],
) -> None:
    index, node, data = parsed.index, parsed.node, parsed.data
    if data is None:
        return
    line = node.start_mark.line + 1
    if not isinstance(data, dict):
        problems.append(
            Problem(
                source,
                "a document must be a mapping with apiVersion and kind",
                document=index,
                line=line,
            )
        )
        return
    problems.extend(
        Problem(source, f"duplicate key {d.key!r}", document=index, path=d.path, line=d.line)
        for d in parsed.duplicates
    )
    kind, api_version = data.get("kind"), data.get("apiVersion")
    name = (
        (data.get("metadata") or {}).get("name", "?")
        if isinstance(data.get("metadata"), dict | None)
        else "?"
    )
    if not kind or not api_version:
        missing = "kind" if not kind else "apiVersion"
        problems.append(
            Problem(
                source,
                f"missing {missing}: every document needs apiVersion and kind",
                document=index,
                line=line,
            )
        )
        return
    if kind == "Secret" and api_version == "v1":
        try:
            secret = Secret.model_validate(data)
        except pydantic.ValidationError as exc:
            problems.extend(_explain(exc, node, source, index, f"Secret {name}", Secret))
            return
        result.secrets.append(SecretDocument(source, index, line, secret))
        return
    if kind != KIND:
        result.skipped.append(Skipped(source, index, str(kind), str(name)))
        return
    claims.append(Claims.of(source, index, str(name), node, data))
    if api_version != API_VERSION:
        if str(api_version).startswith(GROUP + "/"):
            message = f"apiVersion {api_version} is not served; use {API_VERSION}"
        else:
            message = f"kind {KIND} belongs to {API_VERSION}, not {api_version}"
        problems.append(
            Problem(
                source,
                message,
                document=index,
                resource=f"{KIND} {name}",
                path="apiVersion",
                line=_line_of(node, ("apiVersion",)),
            )
        )
        data = {**data, "apiVersion": API_VERSION}  # what else is wrong, all the same
    resource, found = _validate(data, node, source, index, f"{KIND} {name}")
    problems.extend(found)
    if resource is not None and api_version == API_VERSION:
        result.documents.append(Document(source, index, line, resource, node))


def _validate(
    data: Mapping[str, Any], node: Any, source: str, index: int | None, resource: str
) -> tuple[AISemble | None, list[Problem]]:
    """The AISemble `data` holds, or None and every problem found in it: the schema's, and
    those the spec's checks find in what parsed (its validator reports only the first)."""
    try:
        parsed: AISemble | None = AISemble.model_validate(data)
        problems: list[Problem] = []
    except pydantic.ValidationError as exc:
        parsed, problems = None, _explain(exc, node, source, index, resource)
        spec = data.get("spec")
        for found in spec_problems(spec) if isinstance(spec, Mapping) else []:
            loc = ("spec", *_parse_path(found.path))
            path = format_path(loc)
            if not any(_within(path, p.path) for p in problems):
                line, column = _position(node, loc)
                problems.append(Problem(source, found.message, index, resource, path, line, column))
    meta = data.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    suspend = annotations.get(SUSPEND_ANNOTATION) if isinstance(annotations, Mapping) else None
    if isinstance(suspend, str) and suspend.strip().lower() not in ("true", "false"):
        # The annotations AI-semble reads must say something it understands.
        loc = ("metadata", "annotations", SUSPEND_ANNOTATION)
        message = f'must be "true" or "false", not {suspend!r}'
        problems.append(
            Problem(source, message, index, resource, format_path(loc), _line_of(node, loc))
        )
    return (parsed if not problems else None), problems


def _within(path: str, broken: str | None) -> bool:
    """`path` is the field `broken` or inside it: the schema's error there says enough."""
    return broken is not None and (path == broken or path.startswith((broken + ".", broken + "[")))


def _explain(
    exc: pydantic.ValidationError,
    node: Any,
    source: str,
    index: int | None,
    resource: str,
    root: type[pydantic.BaseModel] = AISemble,
) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        message = _message(error, loc, root)
        if loc and loc[-1] == "[key]":  # pydantic's mark for a map's key (not its value)
            loc, message = loc[:-1], f"invalid key: {message}"
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, SpecError):
            loc = loc + _parse_path(cause.path)
            message = cause.message
        line, column = _position(node, loc)
        problems.append(
            Problem(
                source,
                message,
                document=index,
                resource=resource,
                path=format_path(loc),
                line=line,
                column=column,
            )
        )
    return problems


def _message(error: dict[str, Any], loc: tuple, root: type[pydantic.BaseModel] = AISemble) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _known_fields(loc[:-1], root)
        text = f"unknown field {loc[-1]!r}"
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            text += f"; did you mean {close[0]!r}?"
        elif known:
            text += f"; known fields: {', '.join(known)}"
        return text
    if kind == "missing":
        return "required field is missing"
    if kind in ("model_type", "dict_type"):  # pydantic names the model class; say what it is
        what = "a mapping of fields" if kind == "model_type" else "a mapping (key: value)"
        return f"must be {what}, not {_what(error.get('input'))}"
    if kind == "string_type" and loc[:2] == ("metadata", "annotations"):
        return 'annotation values are strings: quote it (e.g. "true")'
    message = error["msg"]
    return message.removeprefix("Value error, ")


def _what(value: object) -> str:
    if value is None:
        return "null"
    for types, name in ((bool, "a boolean"), (int | float, "a number"), (str, "a string")):
        if isinstance(value, types):
            return name
    if isinstance(value, bytes):
        return "binary data"
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _known_fields(loc: tuple, root: type[pydantic.BaseModel] = AISemble) -> list[str]:
    """Field names of the model found by following `loc` from the resource."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return []
        model = _inner_model(info.annotation)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parse_path(path: str) -> tuple:
    return tuple(int(idx) if idx else name for name, idx in _PATH_PART.findall(path))


def format_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _position(node: Any, loc: tuple) -> tuple[int | None, int | None]:
    """Line and column of the deepest node `loc` reaches (1-based); None without YAML."""
    if node is None:
        return None, None
    mark = node.start_mark
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    mark, node = key.start_mark, value
                    break
            else:
                break
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    return mark.line + 1, mark.column + 1


def _line_of(node: Any, loc: tuple) -> int | None:
    return _position(node, loc)[0]
