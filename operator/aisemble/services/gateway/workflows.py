"""Workflows: ordered steps across services, later steps using earlier steps' outputs.

The seed's data flow (request -> orchestrator -> AI services -> data processor
-> aggregated result) as a declaration:

    {"steps": [
       {"name": "summary", "call": "llm.completion", "input": {"prompt": "..."}},
       {"name": "mood", "call": "nlp.analyze",
        "input": {"text": "${steps.summary.output.text}", "tasks": ["sentiment"]}}
    ]}

A string that is exactly one reference takes the referenced value whatever its
type; references inside a longer string are interpolated as text. References
may only point at earlier steps, which is checked before anything runs; a
reference to something the earlier step's output lacks can only be found when
that step has run, and fails the step that refers to it (422 naming both).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CALLS = ("llm.completion", "vision.analyze", "nlp.analyze", "data.process")
_REF = re.compile(r"\$\{steps\.([a-z0-9][a-z0-9_-]*)\.output((?:\.[A-Za-z0-9_-]+|\[\d+\])*)\}")


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Unique name of the step.")
    call: Literal["llm.completion", "vision.analyze", "nlp.analyze", "data.process"] = Field(
        description="The service route the step calls."
    )
    input: dict[str, Any] = Field(
        default_factory=dict,
        description="The request body; strings may hold ${steps.NAME.output.PATH} references.",
    )


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    steps: list[Step] = Field(min_length=1, max_length=50, description="Steps, run in order.")
    run_async: bool = Field(
        False, alias="async", strict=True, description="Answer at once with a job id."
    )

    @model_validator(mode="after")
    def _references_point_back(self) -> Workflow:
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            if step.name in seen:
                raise ValueError(f"steps[{i}].name: duplicate step name {step.name!r}")
            for ref in _references(step.input):
                if ref not in seen:
                    raise ValueError(
                        f"steps[{i}] ({step.name}) refers to step {ref!r}, which does not run "
                        "before it"
                    )
            seen.add(step.name)
        return self


class StepError(BaseModel):
    step: str = Field(description="The name of the step that failed.")
    index: int = Field(description="Its place among the steps, from 0.")
    status: int = Field(description="The status the service answered, or the gateway's for it.")
    error: Any = Field(description="The service's answer, or why the step could not run.")


class StepFailure(BaseModel):
    """The answer when a step fails, with the status of its failure: the service's own
    4xx, 502 when it broke, 503 when it cannot be used, 504 when it took too long, 422
    when the step's input (references resolved) is not what the call takes."""

    detail: StepError


STEP_FAILED: dict[str, Any] = {"model": StepFailure, "description": "A step failed"}


class UnresolvedReference(ValueError):
    """A reference names a key or index the earlier step's output does not have."""


class StepFailed(Exception):
    def __init__(self, step: str, index: int, cause: Exception) -> None:
        super().__init__(f"step {index} ({step}) failed: {cause}")
        self.step = step
        self.index = index
        self.cause = cause


Caller = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def run(workflow: Workflow, call: Caller) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for i, step in enumerate(workflow.steps):
        started = time.perf_counter()
        try:
            body = resolve(step.input, outputs)
            output = await call(step.call, body)
        except Exception as exc:
            raise StepFailed(step.name, i, exc) from exc
        outputs[step.name] = output
        report[step.name] = {
            "call": step.call,
            "output": output,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
    last = workflow.steps[-1].name
    return {"steps": report, "result": outputs[last]}


def resolve(value: Any, outputs: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole:
            return _lookup(outputs, whole.group(1), whole.group(2))
        return _REF.sub(lambda m: _text(_lookup(outputs, m.group(1), m.group(2))), value)
    if isinstance(value, dict):
        return {k: resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, outputs) for v in value]
    return value


def _lookup(outputs: dict[str, Any], step: str, path: str) -> Any:
    value = outputs[step]
    walked = f"steps.{step}.output"
    for part in re.findall(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]", path):
        key, index = part
        try:
            value = value[int(index)] if index else value[key]
        except (KeyError, IndexError, TypeError):
            missing = repr(key) if key else f"[{index}]"
            raise UnresolvedReference(
                f"${{steps.{step}.output{path}}}: {walked} has no {missing}"
            ) from None
        walked += f".{key}" if key else f"[{index}]"
    return value


def _text(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _references(value: Any) -> set[str]:
    if isinstance(value, str):
        return {m.group(1) for m in _REF.finditer(value)}
    if isinstance(value, dict):
        return set().union(*(_references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value)) if value else set()
    return set()


__all__ = [
    "CALLS",
    "STEP_FAILED",
    "Step",
    "StepError",
    "StepFailed",
    "StepFailure",
    "UnresolvedReference",
    "Workflow",
    "resolve",
    "run",
]
