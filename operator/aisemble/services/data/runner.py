"""Runs an operation list: checks each step, hands it to an engine, shapes the answer.

Everything that does not depend on the engine lives here, so that both engines
make the same checks and give the same errors: frames by name, columns that
must exist, expression kinds, join name clashes, paths under the data root,
each error prefixed by the operation that caused it
("operations[2] (filter): unknown column 'x'"). The engines only carry out
steps. They are imported when first used (`Engines`), so the service starts
without pandas or pyspark, and Spark starts on the first Spark run, not before.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import logging
import math
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from aisemble.services.common import ServiceUnavailable
from aisemble.services.data import expressions
from aisemble.services.data.expressions import BOOL, NULL, NUMBER, OTHER, ExpressionError
from aisemble.services.data.files import DataRoot, size_of
from aisemble.services.data.schemas import (
    DataError,
    Derive,
    EngineInfo,
    EnginesResponse,
    Filter,
    Group,
    Join,
    Limit,
    Operation,
    ProcessRequest,
    ProcessResponse,
    Read,
    Select,
    Sort,
    Write,
)
from aisemble.services.data.settings import DataSettings

log = logging.getLogger("aisemble.services.data")

SPARK_START_RETRY_AFTER = 30  # a JVM that failed to start rarely recovers in seconds


class OperationError(Exception):
    """A 400: the operation list cannot run as written. `index` names the step, when one is to blame."""

    def __init__(self, message: str, index: int | None = None, op: str | None = None) -> None:
        self.message, self.index, self.op = message, index, op
        super().__init__(self.detail)

    @property
    def detail(self) -> str:
        if self.index is None:
            return self.message
        return f"operations[{self.index}] ({self.op}): {self.message}"

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "operation": self.index, "op": self.op}


class Run(Protocol):
    """What an engine does for one request; frames are its own (pandas or Spark DataFrames)."""

    def kinds(self, frame: Any) -> dict[str, str]: ...
    def read(self, path: Path, fmt: str) -> Any: ...
    def select(self, frame: Any, columns: list[str]) -> Any: ...
    def filter(self, frame: Any, condition: expressions.Expr) -> Any: ...
    def derive(self, frame: Any, column: str, value: expressions.Expr) -> Any: ...
    def group(self, frame: Any, by: list[str], aggregations: list[Any]) -> Any: ...
    def join(
        self, left: Any, right: Any, on: list[str], how: str, renames: dict[str, str]
    ) -> Any: ...
    def sort(self, frame: Any, by: list[str], descending: list[bool]) -> Any: ...
    def limit(self, frame: Any, n: int) -> Any: ...
    def write(self, frame: Any, path: Path, fmt: str) -> Any: ...
    def preview(self, frame: Any, rows: int) -> tuple[list[str], int, list[dict[str, Any]]]: ...
    def close(self) -> None: ...


class Engine(Protocol):
    name: str

    def open_run(self) -> Run: ...
    def stop(self) -> None: ...


class Engines:
    """The engines, each loaded on first use; Spark started once, under a lock."""

    def __init__(self, settings: DataSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pandas: Engine | None = None
        self._spark: Engine | None = None
        self._java_version: str | None = None

    def get(self, name: str) -> Engine:
        if name == "pandas":
            if self._pandas is None:
                from aisemble.services.data.engine_pandas import PandasEngine

                self._pandas = PandasEngine()
            return self._pandas
        return self._start_spark()

    def warm(self) -> None:
        """Imports the pandas engine ahead of the first request (its libraries take a while)."""
        try:
            self.get("pandas")
        except ImportError as exc:
            log.warning("the pandas engine cannot load: %s", exc)

    def spark_missing(self) -> str | None:
        """Why Spark cannot run here, or None."""
        if importlib.util.find_spec("pyspark") is None:
            return "pyspark is not installed (install aisemble[data])"
        if _java() is None:
            return "Spark needs Java and none was found (set JAVA_HOME or put java on PATH)"
        return None

    def _start_spark(self) -> Engine:
        with self._lock:  # concurrent first runs wait for one start, not start two
            if self._spark is not None:
                return self._spark
            missing = self.spark_missing()
            if missing:
                raise OperationError(f"engine 'spark' is not available: {missing}")
            from aisemble.services.data.engine_spark import SparkEngine

            try:
                self._spark = SparkEngine.start(self.settings)
            except Exception as exc:  # the JVM's reasons are many; all mean "not now"
                log.exception("spark did not start")
                raise ServiceUnavailable(
                    f"spark did not start: {exc}", SPARK_START_RETRY_AFTER
                ) from None
            return self._spark

    def describe(self) -> EnginesResponse:
        s = self.settings
        pandas = EngineInfo(
            available=_installed("pandas") and _installed("pyarrow"),
            version=_version("pandas"),
            detail="in memory, on Arrow-backed frames",
        )
        if not pandas.available:
            pandas.detail = "pandas and pyarrow must be installed (install aisemble[data])"
        missing = self.spark_missing()
        java = _java()
        spark = EngineInfo(
            available=missing is None,
            version=_version("pyspark"),
            detail=missing
            or ("running" if self._spark else "starts on first use, which takes seconds"),
            started=self._spark is not None,
            master=s.spark_master,
            java=f"{java} ({self._java_describe(java)})" if java else None,
        )
        return EnginesResponse(
            default=s.default_engine,
            auto_spark_bytes=s.auto_spark_bytes,
            engines={"pandas": pandas, "spark": spark},
        )

    def _java_describe(self, java: str) -> str:
        if self._java_version is None:
            self._java_version = _java_version(java)
        return self._java_version

    def stop(self) -> None:
        with self._lock:
            engines, self._spark, self._pandas = [self._spark, self._pandas], None, None
        for engine in engines:
            if engine is not None:
                engine.stop()


class DataMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rows = Counter(
            "data_rows_processed_total",
            "Rows in the results of finished operation lists, by engine.",
            ["engine"],
            registry=registry,
        )
        self.duration = Histogram(
            "data_processing_duration_seconds",
            "Time to run an operation list, by engine (failed runs included).",
            ["engine"],
            registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
        )


class Processor:
    """The service's one capability: an operation list in, a result (and files) out."""

    def __init__(self, settings: DataSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.root = DataRoot(settings.root)
        self.engines = Engines(settings)
        self.metrics = DataMetrics(registry)

    def process(self, request: ProcessRequest, preview_rows: int) -> ProcessResponse:
        started = time.perf_counter()
        paths = resolve_paths(request.operations, self.root)
        name = self.choose_engine(request, paths)
        run = self.engines.get(name).open_run()
        try:
            frame, outputs = execute(run, request.operations, paths)
            try:
                columns, count, rows = run.preview(frame, preview_rows)
            except DataError as exc:
                raise OperationError(f"running the operations failed: {exc}") from None
        finally:
            run.close()
            self.metrics.duration.labels(name).observe(time.perf_counter() - started)
        self.metrics.rows.labels(name).inc(count)
        elapsed = (time.perf_counter() - started) * 1000
        log.info(
            "%d operations on %s: %d rows in %.0f ms",
            len(request.operations),
            name,
            count,
            elapsed,
            extra={"fields": {"engine": name, "rows": count, "duration_ms": round(elapsed, 1)}},
        )
        return ProcessResponse(
            engine=name,  # type: ignore[arg-type]
            columns=columns,
            row_count=count,
            rows=[{k: json_safe(v) for k, v in row.items()} for row in rows],
            outputs=[self.root.relative(paths[i]) for i in outputs],
            duration_ms=round(elapsed, 3),
        )

    def choose_engine(self, request: ProcessRequest, paths: Mapping[int, Path]) -> str:
        name = request.engine or self.settings.default_engine
        if name != "auto":
            return name
        inputs = [paths[i] for i, op in enumerate(request.operations) if isinstance(op, Read)]
        size = size_of(inputs)
        if size <= self.settings.auto_spark_bytes:
            return "pandas"
        missing = self.engines.spark_missing()
        if missing:
            log.warning("inputs of %d bytes would run on Spark, but %s", size, missing)
            return "pandas"
        return "spark"

    def close(self) -> None:
        self.engines.stop()


def resolve_paths(operations: list[Operation], root: DataRoot) -> dict[int, Path]:
    """Every read and write path, checked against the root before any work starts.

    A read may name a file that an earlier write of the same list produces.
    """
    paths: dict[int, Path] = {}
    for index, op in enumerate(operations):
        try:
            if isinstance(op, Read):
                paths[index] = root.resolve_input(op.path, written=paths.values())
            elif isinstance(op, Write):
                paths[index] = root.resolve_output(op.path)
        except DataError as exc:
            raise OperationError(str(exc), index, op.op) from None
    return paths


def execute(
    run: Run, operations: list[Operation], paths: Mapping[int, Path]
) -> tuple[Any, list[int]]:
    """Carries out the steps; returns the final frame and the indexes of the writes."""
    frames: dict[str, Any] = {}
    current: str | None = None
    written: list[int] = []
    for index, op in enumerate(operations):
        try:
            if isinstance(op, Read):
                try:
                    frames[op.name] = run.read(paths[index], op.format or "")
                except DataError as exc:
                    raise DataError(f"'{op.path}': {exc}") from None
                current = op.name
                continue
            if current is None:
                raise DataError("there is no frame yet; start with a read")
            frame = frames[current]
            kinds = run.kinds(frame)
            frames[current] = _step(run, op, frame, kinds, frames, paths.get(index))
            if isinstance(op, Write):
                written.append(index)
        except (DataError, ExpressionError) as exc:
            raise OperationError(str(exc), index, op.op) from None
    if current is None:  # pragma: no cover - a list always starts a frame or fails above
        raise OperationError("the operations produce no frame")
    return frames[current], written


def _step(
    run: Run,
    op: Operation,
    frame: Any,
    kinds: dict[str, str],
    frames: dict[str, Any],
    path: Path | None,
) -> Any:
    match op:
        case Select(columns=columns):
            _require(kinds, columns)
            return run.select(frame, columns)
        case Filter(where=where):
            condition = expressions.check(expressions.parse(where), kinds)
            if condition.kind not in (BOOL, NULL):
                raise DataError(f"the condition '{where}' is a {condition.kind}, not true/false")
            return run.filter(frame, condition)
        case Derive(column=column, expr=expr):
            value = expressions.check(expressions.parse(expr), kinds)
            return run.derive(frame, column, value)
        case Group(by=by, aggregations=aggregations):
            _require(kinds, by)
            for a in aggregations:
                if a.column is None:
                    continue
                _require(kinds, [a.column])
                kind = kinds[a.column]
                if a.func in ("sum", "mean") and kind not in (NUMBER, NULL):
                    raise DataError(f"{a.func} needs a number column; '{a.column}' is {kind}")
                if kind == OTHER and a.func != "count":
                    raise DataError(
                        f"{a.func} cannot aggregate '{a.column}' (a nested or binary column)"
                    )
            return run.group(frame, by, aggregations)
        case Join(frame=name, on=on, how=how):
            if name not in frames:
                known = ", ".join(frames) or "none"
                raise DataError(f"unknown frame '{name}' (frames read so far: {known})")
            other = frames[name]
            other_kinds = run.kinds(other)
            _require(kinds, on, "the current frame")
            _require(other_kinds, on, f"frame '{name}'")
            for key in on:
                a, b = kinds[key], other_kinds[key]
                if a != b and NULL not in (a, b):
                    raise DataError(
                        f"key '{key}' is {a} in the current frame but {b} in frame '{name}'"
                    )
            renames = _renames(kinds, other_kinds, on)
            return run.join(frame, other, on, how, renames)
        case Sort(by=by):
            _require(kinds, by)
            for column in by:
                if kinds[column] == OTHER:
                    raise DataError(f"cannot sort by '{column}' (a nested or binary column)")
            return run.sort(frame, by, op.flags())
        case Limit(n=n):
            return run.limit(frame, n)
        case Write(format=fmt):
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            return run.write(frame, path, fmt or "")
    raise DataError(f"unknown operation {op.op!r}")  # pragma: no cover - closed union


def _require(kinds: Mapping[str, str], names: list[str], where: str = "") -> None:
    for name in names:
        if name not in kinds:
            listed = ", ".join(kinds) or "none"
            place = f" in {where}" if where else ""
            raise DataError(f"unknown column '{name}'{place} (columns: {listed})")


def _renames(left: Mapping[str, str], right: Mapping[str, str], on: list[str]) -> dict[str, str]:
    """Non-key columns in both frames get `_right` on the right, so no name is ambiguous."""
    renames = {}
    for name in right:
        if name in left and name not in on:
            new = f"{name}_right"
            if new in left or new in right:
                raise DataError(
                    f"column '{name}' is in both frames and '{new}' is taken too; "
                    "select or derive to rename one first"
                )
            renames[name] = new
    return renames


def json_safe(value: Any) -> Any:
    """A value JSON can carry: NaN and infinities null, dates and times ISO 8601."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date | clock_time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return json_safe(float(value))
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home, "bin", "java"), os.X_OK):
        return str(Path(home, "bin", "java"))
    return shutil.which("java")


def _java_version(java: str) -> str:
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"version unknown: {exc}"
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[0] if lines else "version unknown"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
