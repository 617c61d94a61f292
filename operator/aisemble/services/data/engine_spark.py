"""The Spark engine: runs an operation list with pyspark, for data larger than memory.

One SparkSession per process, started on the first Spark run (it takes
seconds: a JVM starts) and reused by every run after. The session is set up
so that Spark means what the pandas engine means: case-sensitive column names,
timestamps without time zones read as written (UTC session), RFC 4180 CSV
quoting, and expressions guarded so that `x / 0` is null whatever ANSI mode
says. Only built-in Spark functions are used, never Python UDFs, so no Python
worker ever starts.

Spark writes a directory of part files; `write` gathers them into the one file
the operation names (CSV and JSON parts are concatenated, Parquet row groups
copied with pyarrow), so either engine reads what the other wrote.
Imported only when the first Spark run starts.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.parquet as pq
import pyspark
from py4j.protocol import Py4JJavaError
from pyspark import StorageLevel
from pyspark.errors import PySparkException
from pyspark.sql import Column as SparkColumn
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from aisemble.services.data.expressions import (
    BOOL,
    DATETIME,
    NUMBER,
    OTHER,
    STRING,
    Arithmetic,
    Call,
    Column,
    Compare,
    Expr,
    IsIn,
    IsNull,
    Literal,
    Logical,
    Negate,
    Not,
)
from aisemble.services.data.files import json_columns, part_files
from aisemble.services.data.schemas import Aggregation, DataError
from aisemble.services.data.settings import DataSettings

log = logging.getLogger("aisemble.services.data")

R = TypeVar("R")

# What makes Spark agree with the pandas engine. DATA_SPARK_CONF may override.
SESSION_CONF = {
    "spark.sql.caseSensitive": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.timestampType": "TIMESTAMP_NTZ",
    # Overflow wraps, as Arrow's unchecked kernels do, instead of failing the job.
    "spark.sql.ansi.enabled": "false",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",  # progress bars would garble the JSON logs
    "spark.log.level": "WARN",
}
CSV_OPTIONS = {"header": "true", "escape": '"', "mode": "FAILFAST"}
# Spark's CSV writer trims spaces unless told not to; text is written as it is.
CSV_WRITE_OPTIONS = {
    "header": "false",
    "escape": '"',
    "ignoreLeadingWhiteSpace": "false",
    "ignoreTrailingWhiteSpace": "false",
}

_COMPARE: dict[str, Callable[[SparkColumn, SparkColumn], SparkColumn]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_AGGREGATE: dict[str, Callable[[SparkColumn], SparkColumn]] = {
    "sum": F.sum,
    "mean": F.avg,
    "min": F.min,
    "max": F.max,
    "count": F.count,
    "nunique": F.count_distinct,
}


class SparkEngine:
    name = "spark"
    version = pyspark.__version__

    def __init__(self, spark: SparkSession) -> None:
        self.spark = spark

    @classmethod
    def start(cls, settings: DataSettings) -> SparkEngine:
        """A session on `settings.spark_master`; slow (a JVM starts), so done once."""
        builder = SparkSession.builder.master(settings.spark_master).appName("aisemble-data")
        conf = {
            **SESSION_CONF,
            "spark.sql.shuffle.partitions": str(settings.spark_shuffle_partitions),
            **settings.spark_options(),
        }
        for key, value in conf.items():
            builder = builder.config(key, value)
        with warnings.catch_warnings():
            # pyspark warns about pandas >= 3 at start-up; this engine never hands
            # data to pandas (rows come back as Row objects), so it does not apply.
            warnings.simplefilter("ignore", FutureWarning)
            spark = builder.getOrCreate()
        log.info("spark %s started on %s", pyspark.__version__, settings.spark_master)
        return cls(spark)

    def open_run(self) -> SparkRun:
        return SparkRun(self.spark)

    def stop(self) -> None:
        self.spark.stop()


def _spark_errors(method: Callable[..., R]) -> Callable[..., R]:
    """Spark's analysis and job errors about the data are the caller's to fix: DataError.

    A failed job reaches Python as a bare Py4JJavaError. Spark gives the errors
    it means users to see an error class (`[MALFORMED_CSV_RECORD] ...`); those
    become DataError, anything else (out of memory, a lost executor) stays a
    server error.
    """

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> R:
        try:
            return method(*args, **kwargs)
        except PySparkException as exc:
            raise DataError(f"spark: {_first_line(exc)}") from None
        except Py4JJavaError as exc:
            reason = _classified_cause(exc)
            if reason is None:
                raise
            raise DataError(f"spark: {reason}") from None

    return wrapped


def _classified_cause(exc: Py4JJavaError) -> str | None:
    """The innermost cause that carries a Spark error class, if any."""
    found = None
    cause = exc.java_exception
    for _ in range(20):  # cause chains are short; a cycle must not hang the request
        if cause is None:
            break
        message = str(cause.getMessage() or "")
        if message.startswith("["):
            found = message.strip().splitlines()[0]
        cause = cause.getCause()
    return found


class SparkRun:
    """One request's steps: lazy DataFrames, evaluated by `write` and `preview`."""

    def __init__(self, spark: SparkSession) -> None:
        self.spark = spark
        self.persisted: list[DataFrame] = []

    def close(self) -> None:
        for frame in self.persisted:
            frame.unpersist()

    def kinds(self, frame: DataFrame) -> dict[str, str]:
        return {f.name: _kind(f.dataType) for f in frame.schema.fields}

    @_spark_errors
    def read(self, path: Path, fmt: str) -> DataFrame:
        reader = self.spark.read
        if fmt == "csv":
            # inferSchema costs a pass over the data now; a malformed row fails the
            # run (FAILFAST) when the data is used, as pandas' reader would refuse it.
            return reader.options(**CSV_OPTIONS).csv(str(path), inferSchema=True)
        if fmt == "json":
            frame = reader.option("mode", "FAILFAST").json(str(path))
            return frame.select(*[_col(c) for c in json_columns(path, frame.columns)])
        return reader.parquet(str(path))

    def select(self, frame: DataFrame, columns: list[str]) -> DataFrame:
        return frame.select(*[_col(c) for c in columns])

    @_spark_errors
    def filter(self, frame: DataFrame, condition: Expr) -> DataFrame:
        return frame.filter(_compile(condition))

    @_spark_errors
    def derive(self, frame: DataFrame, column: str, value: Expr) -> DataFrame:
        return frame.withColumn(column, _compile(value))

    @_spark_errors
    def group(self, frame: DataFrame, by: list[str], aggregations: list[Aggregation]) -> DataFrame:
        columns = [
            (F.count(F.lit(1)) if a.column is None else _AGGREGATE[a.func](_col(a.column))).alias(
                a.name or ""
            )
            for a in aggregations
        ]
        if not by:
            return frame.agg(*columns)
        return frame.groupBy(*[_col(b) for b in by]).agg(*columns)

    @_spark_errors
    def join(
        self,
        left: DataFrame,
        right: DataFrame,
        on: list[str],
        how: str,
        renames: dict[str, str],
    ) -> DataFrame:
        for old, new in renames.items():
            right = right.withColumnRenamed(old, new)
        # A join on column names gives the keys once, first, then left's and right's columns.
        return left.join(right, on=on, how=how)

    def sort(self, frame: DataFrame, by: list[str], descending: list[bool]) -> DataFrame:
        order = [
            _col(c).desc_nulls_last() if d else _col(c).asc_nulls_last()
            for c, d in zip(by, descending, strict=True)
        ]
        return frame.orderBy(*order)

    def limit(self, frame: DataFrame, n: int) -> DataFrame:
        return frame.limit(n)

    @_spark_errors
    def write(self, frame: DataFrame, path: Path, fmt: str) -> DataFrame:
        # Kept (memory, then disk) for what follows: the row count, the preview, more steps.
        if not frame.is_cached:
            frame = frame.persist(StorageLevel.MEMORY_AND_DISK)
            self.persisted.append(frame)
        token = uuid.uuid4().hex
        parts_dir = path.with_name(f".{path.name}.{token}.parts")
        partial = path.with_name(f".{path.name}.{token}.partial")
        try:
            writer = frame.write.mode("overwrite")
            if fmt == "csv":
                writer.options(**CSV_WRITE_OPTIONS).csv(str(parts_dir))
                _gather_csv(frame.columns, part_files(parts_dir), partial)
            elif fmt == "json":
                writer.option("ignoreNullFields", "false").json(str(parts_dir))
                _gather_bytes(part_files(parts_dir), partial)
            else:
                writer.parquet(str(parts_dir))
                _gather_parquet(part_files(parts_dir), partial)
            os.replace(partial, path)
        except OSError as exc:
            raise DataError(f"cannot write {fmt}: {exc}") from None
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)
            partial.unlink(missing_ok=True)
        return frame

    @_spark_errors
    def preview(self, frame: DataFrame, rows: int) -> tuple[list[str], int, list[dict[str, Any]]]:
        # One row more than shown: when the result is that small, its count is known
        # without a second job (which, after a shuffle, would run the shuffle again).
        head = frame.limit(rows + 1).collect()
        count = len(head) if len(head) <= rows else frame.count()
        head = head[:rows]
        # Rows as dicts keyed by position, since a Row's own dict would merge equal names.
        columns = frame.columns
        return columns, count, [dict(zip(columns, _plain(row), strict=True)) for row in head]


def _plain(row: Any) -> list[Any]:
    return [v.asDict(recursive=True) if isinstance(v, T.Row) else v for v in row]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _col(name: str) -> SparkColumn:
    """A column by its exact name: backquoted, so dots and spaces are not syntax."""
    return F.col("`" + name.replace("`", "``") + "`")


def _kind(data_type: T.DataType) -> str:
    if isinstance(data_type, T.NumericType):
        return NUMBER
    if isinstance(data_type, T.StringType | T.VarcharType | T.CharType):
        return STRING
    if isinstance(data_type, T.BooleanType):
        return BOOL
    if isinstance(data_type, T.DateType | T.TimestampType | T.TimestampNTZType):
        return DATETIME
    if isinstance(data_type, T.NullType):
        return "null"
    return OTHER


def _gather_csv(columns: list[str], parts: list[Path], target: Path) -> None:
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(columns)
    with open(target, "wb") as out:
        out.write(header.getvalue().encode("utf-8"))
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, out)


def _gather_bytes(parts: list[Path], target: Path) -> None:
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, out)


def _gather_parquet(parts: list[Path], target: Path) -> None:
    """Row groups copied one at a time, so the file is assembled in little memory."""
    writer: pq.ParquetWriter | None = None
    try:
        for part in parts:
            source = pq.ParquetFile(part)
            if writer is None:
                writer = pq.ParquetWriter(target, source.schema_arrow)
            for group in range(source.num_row_groups):
                writer.write_table(source.read_row_group(group))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise DataError("spark wrote no parquet part to gather")


# Expressions


def _compile(node: Expr) -> SparkColumn:
    match node:
        case Column(name=name):
            return _col(name)
        case Literal(value=value):
            return F.lit(value)
        case Negate(operand=operand):
            return -_compile(operand)
        case Arithmetic(op=op, left=left, right=right):
            a, b = _compile(left), _compile(right)
            if node.kind == STRING:
                return F.concat(a, b)
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            if op == "/":
                return F.when(b != 0, a.cast("double") / b.cast("double"))
            return F.when(b != 0, a % b)  # Java's %: the sign of the dividend
        case Compare(op=op, left=left, right=right):
            return _COMPARE[op](_compile(left), _compile(right))
        case Logical(op=op, operands=operands):
            parts = [_compile(o) for o in operands]
            return functools.reduce(lambda a, b: (a & b) if op == "and" else (a | b), parts)
        case Not(operand=operand):
            return ~_compile(operand)
        case IsIn(operand=operand, values=values):
            return _compile(operand).isin(list(values))
        case IsNull(operand=operand, negated=negated):
            value = _compile(operand)
            return value.isNotNull() if negated else value.isNull()
        case Call(name=name, args=args):
            return _call(name, args)
    raise DataError(f"cannot compute '{node.text}'")  # pragma: no cover - closed set


def _call(name: str, args: tuple[Expr, ...]) -> SparkColumn:
    values = [_compile(a) for a in args]
    if name == "lower":
        return F.lower(values[0])
    if name == "upper":
        return F.upper(values[0])
    if name == "trim":
        return F.trim(values[0])
    if name == "length":
        return F.length(values[0])
    if name == "concat":
        return F.concat(*values)
    if name == "abs":
        return F.abs(values[0])
    if name == "floor":
        return F.floor(values[0])
    if name == "ceil":
        return F.ceil(values[0])
    if name == "round":
        digits = args[1].value if len(args) == 2 else 0  # type: ignore[attr-defined]
        return F.round(values[0], int(digits))
    if name == "coalesce":
        return F.coalesce(*values)
    if name == "if_else":
        return F.when(values[0], values[1]).otherwise(values[2])
    raise DataError(f"unknown function '{name}'")  # pragma: no cover - closed set
