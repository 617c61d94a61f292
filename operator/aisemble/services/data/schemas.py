"""The operation list and the API's request and response bodies.

An operation list is declarative: each step names what to do, never how, so
the pandas and the Spark engine can run the same list to the same result. The
models check everything that can be checked without the data (shapes, names,
expression syntax: 422 naming the field, e.g. `operations.2.filter.where`);
what needs the data (columns, kinds, frames) is checked when running (400).

Requests validate strictly (a JSON value only of the type the schema names),
and the rules the models check beyond types are written into the schema
wherever JSON Schema can say them (a format or a known extension, distinct
names, a column for every aggregation but count); expression syntax and rules
across fields (sort flags per column, distinct result columns) it cannot.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from aisemble.services.data.expressions import parse
from aisemble.services.data.settings import EngineChoice

Format = Literal["csv", "parquet", "json"]

EXTENSIONS: dict[str, Format] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
}
# Read transparently by both engines' readers; never written.
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4", ".snappy")


def _any_case(suffixes: Any) -> str:
    """A regex for any of the suffixes in any letter case, without the flags JSON Schema lacks."""
    return "|".join(
        "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in suffix)
        for suffix in suffixes
    )


# The paths format_of knows, and those Write refuses, as the schema says them.
KNOWN_EXTENSION = f"({_any_case(EXTENSIONS)})({_any_case(COMPRESSIONS)})?/*$"
COMPRESSED = f"({_any_case(COMPRESSIONS)})/*$"


class DataError(Exception):
    """A problem with the operations or the data that the caller must fix (400)."""


def _expression(text: str) -> str:
    parse(text)  # syntax and whitelist now; columns and kinds when running
    return text


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Expression = Annotated[str, AfterValidator(_expression)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
# With strict validation, makes an int field JSON Schema's integer: 3 and 3.0, never true
# or "3". Bounds go before it in the Annotated, or pydantic writes them as `ge` in the schema.
WHOLE = BeforeValidator(_whole_number)
_UNIQUE = {"uniqueItems": True}


def format_of(path: str) -> Format | None:
    """The format a path's extension names (ignoring a compression suffix and trailing
    slashes), if any: the paths KNOWN_EXTENSION matches."""
    name = path.rstrip("/").lower()
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            name = name.removesuffix(compression)
            break
    return next((fmt for suffix, fmt in EXTENSIONS.items() if name.endswith(suffix)), None)


def _format_or_extension(**more: Any) -> dict[str, Any]:
    """JSON Schema for "a format is named, or the path's extension names one"."""
    return {
        "anyOf": [
            {"required": ["format"], "properties": {"format": {"type": "string"}}},
            {"properties": {"path": {"pattern": KNOWN_EXTENSION}}},
        ],
        **more,
    }


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Read(_Step):
    """Read a file (or a directory of part files, as Spark writes) into a named frame, which becomes the current one."""

    model_config = ConfigDict(json_schema_extra=_format_or_extension())

    op: Literal["read"] = Field(description="The kind of step.")
    path: str = Field(min_length=1, description="Relative to the data root.")
    format: Format | None = Field(
        None,
        description="csv (with a header row), parquet or json (JSON Lines: one object per "
        "line). Default: from the extension (.csv, .parquet/.pq, .json/.jsonl/.ndjson, "
        "optionally compressed, e.g. .csv.gz).",
    )
    name: Name = Field(
        "main",
        alias="as",
        description="The frame's name, for `join.with`. Reading into a name replaces that frame.",
    )

    @model_validator(mode="after")
    def _format_from_extension(self) -> Read:
        if self.format is None:
            self.format = format_of(self.path)
            if self.format is None:
                raise ValueError(
                    f"cannot tell the format of '{self.path}' from its extension; "
                    "set format to csv, parquet or json"
                )
        return self


class Select(_Step):
    """Keep these columns, in this order."""

    op: Literal["select"] = Field(description="The kind of step.")
    columns: list[Name] = Field(
        min_length=1, description="Columns of the current frame.", json_schema_extra=_UNIQUE
    )

    @model_validator(mode="after")
    def _unique(self) -> Select:
        _no_duplicates(self.columns, "columns")
        return self


class Filter(_Step):
    """Keep the rows where the condition is true (rows where it is null are dropped, as in SQL)."""

    op: Literal["filter"] = Field(description="The kind of step.")
    where: Expression = Field(
        description="A condition, e.g. `amount > 10 and country in ['fr', 'de']`, "
        "`not (x is None)`; see the expression language."
    )


class Derive(_Step):
    """Add a column computed from an expression (or replace the column of that name)."""

    op: Literal["derive"] = Field(description="The kind of step.")
    column: Name = Field(description="The new (or replaced) column's name.")
    expr: Expression = Field(description="The value, e.g. `upper(first) + ' ' + last`.")


AggregateFunction = Literal["sum", "mean", "min", "max", "count", "nunique"]


class Aggregation(_Step):
    """One aggregated column of a `group`."""

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"func": {"const": "count"}}},
            "else": {"required": ["column"], "properties": {"column": {"type": "string"}}},
        }
    )

    column: Name | None = Field(
        None,
        description="The column aggregated. Only `count` may leave it out, to count rows.",
    )
    func: AggregateFunction = Field(
        description="sum, mean, min, max, count (non-null values, or rows without a "
        "column), nunique (distinct non-null values). Nulls are ignored; the sum or mean "
        "of no values is null."
    )
    name: Name | None = Field(
        None, alias="as", description="The result column's name. Default: `{func}_{column}`."
    )

    @model_validator(mode="after")
    def _defaults(self) -> Aggregation:
        if self.column is None and self.func != "count":
            raise ValueError(f"{self.func} needs a column; only count may leave it out")
        if self.name is None:
            self.name = f"{self.func}_{self.column}" if self.column else "count"
        return self


class Group(_Step):
    """Group rows by key columns and aggregate each group into one row (keys first, then the aggregations)."""

    op: Literal["group"] = Field(description="The kind of step.")
    by: list[Name] = Field(
        description="Key columns; null is a key like any other. Empty: aggregate the "
        "whole frame into one row. Groups come in no particular order: sort after.",
        json_schema_extra=_UNIQUE,
    )
    aggregations: list[Aggregation] = Field(min_length=1, description="The result columns.")

    @model_validator(mode="after")
    def _unique(self) -> Group:
        _no_duplicates(self.by, "by")
        _no_duplicates([*self.by, *(a.name or "" for a in self.aggregations)], "result columns")
        return self


class Join(_Step):
    """Join the current frame with a frame read earlier, on equal key columns.

    The result has the keys first, then the current frame's other columns,
    then the other frame's; a non-key column in both gets `_right` appended on
    the other frame's side. As in SQL, a null key matches nothing.
    """

    op: Literal["join"] = Field(description="The kind of step.")
    frame: Name = Field(alias="with", description="The name given to a `read` with `as`.")
    on: list[Name] = Field(
        min_length=1, description="Key columns present in both frames.", json_schema_extra=_UNIQUE
    )
    how: Literal["inner", "left", "right", "outer"] = Field(
        "inner", description="Which unmatched rows to keep: none, left, right or both."
    )

    @model_validator(mode="after")
    def _unique(self) -> Join:
        _no_duplicates(self.on, "on")
        return self


class Sort(_Step):
    """Sort by columns; nulls come last in either direction. Ties keep no particular order."""

    op: Literal["sort"] = Field(description="The kind of step.")
    by: list[Name] = Field(min_length=1, description="Columns, most significant first.")
    descending: bool | list[bool] = Field(
        False, description="One flag for all columns, or one per column of `by`."
    )

    @model_validator(mode="after")
    def _flags(self) -> Sort:
        if isinstance(self.descending, list) and len(self.descending) != len(self.by):
            raise ValueError(
                f"descending has {len(self.descending)} flags for {len(self.by)} columns"
            )
        return self

    def flags(self) -> list[bool]:
        if isinstance(self.descending, bool):
            return [self.descending] * len(self.by)
        return list(self.descending)


class Limit(_Step):
    """Keep the first n rows (which ones, without a sort before, is up to the engine)."""

    op: Literal["limit"] = Field(description="The kind of step.")
    n: Annotated[int, Field(ge=0), WHOLE] = Field(description="How many rows.")


class Write(_Step):
    """Write the current frame to one file (replaced if it exists). The frame stays current."""

    model_config = ConfigDict(
        json_schema_extra=_format_or_extension(
            **{"not": {"properties": {"path": {"pattern": COMPRESSED}}}}
        )
    )

    op: Literal["write"] = Field(description="The kind of step.")
    path: str = Field(min_length=1, description="Relative to the data root.")
    format: Format | None = Field(
        None, description="csv, parquet or json; default: from the extension."
    )

    @model_validator(mode="after")
    def _format_from_extension(self) -> Write:
        if self.path.rstrip("/").lower().endswith(COMPRESSIONS):
            raise ValueError(f"'{self.path}': compressed output is not supported")
        if self.format is None:
            self.format = format_of(self.path)
            if self.format is None:
                raise ValueError(
                    f"cannot tell the format of '{self.path}' from its extension; "
                    "set format to csv, parquet or json"
                )
        return self


Operation = Annotated[
    Read | Select | Filter | Derive | Group | Join | Sort | Limit | Write,
    Field(discriminator="op"),
]


_EXAMPLE = {
    "operations": [
        {"op": "read", "path": "orders.csv"},
        {"op": "filter", "where": "amount > 10 and not (product is None)"},
        {"op": "derive", "column": "total", "expr": "amount * qty"},
        {
            "op": "group",
            "by": ["product"],
            "aggregations": [{"column": "total", "func": "sum", "as": "revenue"}],
        },
        {"op": "sort", "by": ["revenue"], "descending": True},
        {"op": "limit", "n": 5},
        {"op": "write", "path": "out/top-products.parquet"},
    ],
    "preview_rows": 5,
}


class ProcessRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [_EXAMPLE]}
    )

    operations: list[Operation] = Field(
        min_length=1,
        max_length=1000,
        description="Run in order on the current frame; the first is usually a read.",
    )
    engine: EngineChoice | None = Field(
        None,
        description="pandas, spark, or auto (Spark when the inputs are larger than the "
        "service's auto_spark_bytes). Default: the service's default engine.",
    )
    preview_rows: Annotated[int, Field(ge=0), WHOLE] | None = Field(
        None,
        description="Rows of the result to return. Default: the service's preview_rows; "
        "at most its max_preview_rows.",
    )


class ProcessResponse(BaseModel):
    engine: Literal["pandas", "spark"] = Field(description="The engine that ran the list.")
    columns: list[str] = Field(description="The result's columns, in order.")
    row_count: int = Field(description="Rows in the whole result (not only the preview).")
    rows: list[dict[str, Any]] = Field(
        description="The first rows, as objects. JSON-safe: NaN and infinities are null, "
        "dates and times ISO 8601 strings."
    )
    outputs: list[str] = Field(description="Files written, relative to the data root, in order.")
    duration_ms: float = Field(description="Time to run the list, including starting Spark.")


class ErrorBody(BaseModel):
    detail: str = Field(description="e.g. \"operations[2] (filter): unknown column 'x'\".")
    operation: int | None = Field(None, description="Index of the failing operation.")
    op: str | None = Field(None, description="Its kind, e.g. filter.")


class EngineInfo(BaseModel):
    available: bool = Field(description="Whether a run may ask for this engine here.")
    version: str | None = Field(None, description="The library's version, when installed.")
    detail: str = Field("", description="Why it is unavailable, or how it runs.")
    started: bool | None = Field(None, description="Spark only: whether its session is up.")
    master: str | None = Field(None, description="Spark only: the master URL.")
    java: str | None = Field(None, description="Spark only: the java found, with its version.")


class EnginesResponse(BaseModel):
    default: EngineChoice = Field(description="The engine of requests that name none.")
    auto_spark_bytes: int = Field(
        description="With engine auto, inputs larger than this many bytes run on Spark."
    )
    engines: dict[str, EngineInfo] = Field(description="pandas and spark, by name.")


def _no_duplicates(names: list[str], what: str) -> None:
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    if repeated:
        raise ValueError(f"{what} name {', '.join(repr(n) for n in repeated)} more than once")
