"""The vision routes: one endpoint, reached two ways (multipart upload or JSON with base64).

Both forms are read by hand (Starlette's form parser for uploads, pydantic for
JSON) so one route can take either.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from aisemble.services.common import ServiceUnavailable
from aisemble.services.vision.engine import BadImage, VisionEngine
from aisemble.services.vision.schemas import (
    BASE64_WHITESPACE,
    AnalyzeJson,
    AnalyzeOptions,
    AnalyzeResponse,
    Colour,
    InvalidRequest,
    Label,
    Message,
)

router = APIRouter(tags=["vision"])


class VisionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.images = Counter(
            "vision_images_analyzed_total",
            "Images analysed, by file format.",
            ["format"],
            registry=registry,
        )
        self.inference = Histogram(
            "vision_inference_duration_seconds",
            "Time the classification model took for one image.",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )


def get_engine(request: Request) -> VisionEngine:
    return request.app.state.engine


def get_metrics(request: Request) -> VisionMetrics:
    return request.app.state.vision_metrics


EngineDep = Annotated[VisionEngine, Depends(get_engine)]
MetricsDep = Annotated[VisionMetrics, Depends(get_metrics)]

# The body is read by hand (two content types), so OpenAPI is told what it accepts: the
# JSON form's model, and for uploads the same options (their bounds too) beside the file.
_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary"},
        **AnalyzeOptions.model_json_schema()["properties"],
    },
    # The form parser takes only so many fields; the schema says which.
    "additionalProperties": False,
}
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": AnalyzeJson.model_json_schema()},
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": Message, "description": "The body is larger than the service takes"},
    415: {"model": Message, "description": "Neither JSON nor multipart/form-data"},
    422: {
        "model": InvalidRequest,
        "description": "A malformed body or option, or data that is not an image Pillow reads",
    },
    503: {"model": Message, "description": "The classification model is not loaded yet"},
}

_NO_WHITESPACE = str.maketrans("", "", BASE64_WHITESPACE)


@router.post(
    "/analyze", response_model=AnalyzeResponse, responses=_ERRORS, openapi_extra=_REQUEST_BODY
)
async def analyze(request: Request, engine: EngineDep, metrics: MetricsDep) -> AnalyzeResponse:
    """Describe an image (format, size, mode, EXIF, dominant colours) and classify it."""
    data, options = await _read(request)
    if options.classify and engine.configured and not engine.loaded:
        readiness = request.app.state.readiness
        if readiness.state == "failed":
            reason = readiness.detail  # says what failed and why
        else:
            reason = "the classification model is still loading"
        raise ServiceUnavailable(
            f"{reason}; send classify=false to analyse the image without it",
            retry_after=readiness.retry_after,
        )
    try:
        result = await run_in_threadpool(
            engine.analyze, data, options.colours, options.top_k, options.classify
        )
    except BadImage as exc:
        raise _invalid("image", str(exc)) from None
    metrics.images.labels(result.format or "unknown").inc()
    if result.inference_seconds is not None:
        metrics.inference.observe(result.inference_seconds)
    if result.labels is not None:
        note = None
    elif not options.classify:
        note = "classification was not requested"
    else:
        note = "no classification model is configured (set VISION_MODEL_PATH)"
    return AnalyzeResponse(
        format=result.format,
        width=result.width,
        height=result.height,
        mode=result.mode,
        frames=result.frames,
        exif=result.exif,
        dominant_colours=[
            Colour(rgb=rgb, hex="#{:02x}{:02x}{:02x}".format(*rgb), fraction=round(share, 6))
            for rgb, share in result.colours
        ],
        classification=None
        if result.labels is None
        else [Label(label=label, score=score) for label, score in result.labels],
        model=engine.settings.model_label if result.labels is not None else None,
        note=note,
    )


async def _read(request: Request) -> tuple[bytes, AnalyzeOptions]:
    """The image bytes and the options, from whichever of the two forms was sent."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=len(AnalyzeOptions.model_fields) + 1)
        except (MultiPartException, StarletteHTTPException) as exc:
            # Starlette answers a form it cannot parse (or one with too many fields) with a
            # bare 400; like any other malformed body here, it is a 422.
            detail = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
            raise _invalid(None, f"the multipart body cannot be read: {detail}") from None
        image = form.get("image")
        if image is None:
            raise _invalid("image", "the multipart body has no `image` field")
        unknown = sorted(set(form) - {"image", *AnalyzeOptions.model_fields})
        if unknown:
            raise _invalid(unknown[0], "no such field: send `image` and the options only")
        data = await image.read() if isinstance(image, UploadFile) else image.encode()
        options = _validate(
            AnalyzeOptions,
            {
                name: _form_value(name, form[name])
                for name in AnalyzeOptions.model_fields
                if name in form
            },
        )
        return data, options
    if media == "application/json" or media.endswith("+json"):
        try:
            # Strictly: JSON values only of the types the schema names (no 0 for false).
            sent = AnalyzeJson.model_validate_json(await request.body(), strict=True)
        except ValidationError as exc:
            raise _from_pydantic(exc) from None
        options = AnalyzeOptions.model_validate(sent.model_dump(exclude={"image"}))
        return _decode_base64(sent.image), options
    raise HTTPException(
        415,
        "send the image as multipart/form-data (file field `image`) "
        'or as application/json {"image": "<base64>"}',
    )


def _validate(model: type[AnalyzeOptions], values: dict[str, Any]) -> AnalyzeOptions:
    try:
        return model.model_validate(values, strict=True)
    except ValidationError as exc:
        raise _from_pydantic(exc) from None


def _form_value(name: str, value: str | UploadFile) -> Any:
    """An option's form text as the JSON value the schema names: `true`/`false` for a
    boolean, decimal digits for an integer. Anything else stays text, which strict
    validation refuses (pydantic alone would take "0" or "yes" for false and true)."""
    if isinstance(value, UploadFile):
        return value
    kind = AnalyzeOptions.model_fields[name].annotation
    if kind is bool and value in ("true", "false"):
        return value == "true"
    if kind is int and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    return value


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise _invalid("image", "a data: URL must be base64-encoded (data:image/...;base64,)")
    try:
        # Only the whitespace the schema's pattern allows, not all Python strips.
        return base64.b64decode(text.translate(_NO_WHITESPACE), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid("image", f"the image is not valid base64: {exc}") from None


def _invalid(field: str | None, message: str) -> RequestValidationError:
    """A 422 shaped like FastAPI's own, so clients parse one error format."""
    loc = ("body",) if field is None else ("body", field)
    return RequestValidationError(
        [{"type": "value_error", "loc": loc, "msg": message, "input": None}]
    )


def _from_pydantic(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError(
        [
            {**error, "loc": ("body", *error["loc"])}
            # Without the input: a body that is not UTF-8 would be echoed as bytes, which
            # the 422's JSON cannot carry (it failed with a 500).
            for error in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
    )
