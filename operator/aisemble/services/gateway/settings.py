"""Gateway settings, from GATEWAY_* environment variables."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, field_validator

from aisemble.services.gateway.quotas import parse_key_limits

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def _seconds(value: Any) -> Any:
    """`7d`, `12h`, `30m`, `45s` or a plain number of seconds."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if not match:
            raise ValueError("expected seconds or a duration such as 45s, 30m, 12h or 7d")
        return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    return value


Duration = Annotated[float, BeforeValidator(_seconds)]


class GatewaySettings(BaseModel):
    llm_url: str = Field("http://llm:8000", description="Base URL of the LLM service.")
    vision_url: str = Field("http://vision:8000", description="Base URL of the vision service.")
    nlp_url: str = Field("http://nlp:8000", description="Base URL of the NLP service.")
    data_url: str = Field(
        "http://data-processor:8000", description="Base URL of the data processor."
    )
    jobs_db: str = Field(
        "/var/lib/aisemble-gateway/jobs.db",
        description="SQLite file holding jobs; put it on a volume so jobs survive restarts.",
    )
    backend_timeout_s: float = Field(120.0, gt=0, description="Longest wait for a backend answer.")
    connect_timeout_s: float = Field(3.0, gt=0, description="Longest wait to connect to a backend.")
    ready_timeout_s: float = Field(
        2.0, gt=0, description="Timeout of each backend readiness probe."
    )
    job_workers: int = Field(4, ge=1, le=64, description="Jobs that run at the same time.")
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Largest request body accepted.")
    rerun_interrupted: bool = Field(
        False,
        description="Run again, at start-up, the jobs that were running when the gateway stopped "
        "(instead of reporting them failed).",
    )
    required_backends: str = Field(
        "llm,vision,nlp,data",
        description="Backends /ready waits for, comma separated (empty: none).",
    )

    # -- who may call ------------------------------------------------------------------------
    auth: Literal["required", "none"] = Field(
        "required",
        description="`required`: every route but /health, /ready and /metrics needs an API key; "
        "`none`: no keys, no per-key limits, every caller sees every job.",
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="API keys, separated by newlines or commas; each `KEY` or `NAME:KEY`. The "
        "name (letters, digits, `_.-`) appears in logs and metrics, never the key; an unnamed "
        "key is named `key-` and the start of its sha256. Several keys at once allow rotation.",
    )
    rate_limit_rpm: int = Field(
        600,
        ge=0,
        description="Requests per minute per key (0: unlimited); a key may spend a whole "
        "minute's worth at once, then one per 60/rpm seconds.",
    )
    max_concurrent_per_key: int = Field(
        32,
        ge=0,
        description="Requests a key may have in progress at once, a stream until it ends "
        "(0: unlimited).",
    )
    key_limits: str = Field(
        "",
        description="Per key name overrides, `NAME=rpm:N,concurrent:N;NAME=...` "
        "(e.g. `batch=rpm:6000,concurrent:64;ci=rpm:60`); unnamed limits keep the defaults.",
    )
    docs: bool = Field(
        True, description="Serve /docs, /redoc and /openapi.json (to key holders); false: 404."
    )

    # -- jobs ----------------------------------------------------------------------------------
    max_queued: int = Field(
        1000,
        ge=1,
        description="Jobs that may wait for a worker; beyond, async submissions get 503.",
    )
    max_jobs: int = Field(
        10000,
        ge=1,
        description="Jobs kept; beyond, the oldest finished ones are removed.",
    )
    job_retention_s: Duration = Field(
        7 * 86400.0,
        gt=0,
        description="How long a finished job is kept: seconds or a duration (`7d`, `12h`).",
    )
    prune_interval_s: Duration = Field(
        600.0,
        gt=0,
        description="How often finished jobs past retention or the cap are removed (also at "
        "start-up): seconds or a duration.",
    )

    @field_validator("key_limits")
    @classmethod
    def _limits_parse(cls, value: str) -> str:
        parse_key_limits(value)
        return value

    def backend_urls(self) -> dict[str, str]:
        return {
            "llm": self.llm_url,
            "vision": self.vision_url,
            "nlp": self.nlp_url,
            "data": self.data_url,
        }
